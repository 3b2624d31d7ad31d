"""A pymodbus 3.16.1 simulator for the Modbus plugin's tests, started by them as a real process.

    sim.py SPEC.json                  TCP on 127.0.0.1, port chosen by the kernel
    sim.py SPEC.json --serial PATH    RTU on a serial device (one end of a socat pty pair)

Prints "READY <port>" (TCP) or "READY" (serial) on stdout once it serves, then runs until killed.

SPEC is a JSON object mapping unit id (as a string) to a unit:
    {"holding": [..words from address 0..], "input": [..], "coils": [..], "discrete": [..],
     "identity": {"0": "Vendor", "1": "Product code", "2": "1.0", "128": "SN-1"} or null,
     "slow": {"address": 100, "seconds": 1.0},   # holding reads at this address answer late
     "silent": true}                               # never answers anything
A unit whose identity is null answers Read Device Identification with exception 1 (Illegal
Function), as devices without 0x2B/0x0E do. Units not in SPEC get exception 0x0B.
pymodbus keeps one identity per server; this helper swaps it per unit just before pymodbus
answers, which is synchronous, so concurrent requests cannot see another unit's identity.
"""

import asyncio
import json
import logging
import sys

from pymodbus.constants import ExcCodes
from pymodbus.datastore import (
    ModbusDeviceContext,
    ModbusSequentialDataBlock,
    ModbusServerContext,
)
from pymodbus.pdu.device import ModbusControlBlock
from pymodbus.pdu.exceptionresponse import ExceptionResponse
from pymodbus.pdu.mei_message import ReadDeviceInformationRequest
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.server.requesthandler import ServerRequestHandler

logging.getLogger("pymodbus").setLevel(logging.CRITICAL)


def block(values, default):
    # pymodbus: a block starting at 1 serves PDU address 0.
    return ModbusSequentialDataBlock(1, list(values) if values else [default] * 16)


def main():
    spec = {int(k): v for k, v in json.load(open(sys.argv[1])).items()}
    serial = sys.argv[3] if len(sys.argv) > 3 and sys.argv[2] == "--serial" else None
    devices = {
        uid: ModbusDeviceContext(
            hr=block(u.get("holding"), 0),
            ir=block(u.get("input"), 0),
            co=block(u.get("coils"), False),
            di=block(u.get("discrete"), False),
        )
        for uid, u in spec.items()
    }
    context = ModbusServerContext(devices=devices, single=False)

    original_rdi = ReadDeviceInformationRequest.datastore_update

    async def rdi(self, ctx, device_id):
        unit = spec.get(device_id)
        if unit is None:
            # pymodbus answers 0x2B for any unit id: make a missing unit look missing.
            return ExceptionResponse(self.function_code, ExcCodes.GATEWAY_NO_RESPONSE)
        if unit.get("identity") is None:
            return ExceptionResponse(self.function_code, ExcCodes.ILLEGAL_FUNCTION)
        ident = ModbusControlBlock().Identity
        for k in range(0, 256):
            ident[k] = ""
        ident.update({int(k): v for k, v in unit["identity"].items()})
        return await original_rdi(self, ctx, device_id)

    ReadDeviceInformationRequest.datastore_update = rdi

    original_handle = ServerRequestHandler.handle_request

    async def handle(self):
        pdu = self.last_pdu
        unit = spec.get(pdu.dev_id) if pdu is not None else None
        if unit is not None and unit.get("silent"):
            return
        slow = unit.get("slow") if unit is not None else None
        if slow and pdu.function_code == 3 and pdu.address == slow["address"]:
            # Hold this request's answer; the handler must not see the next request meanwhile
            # (it keeps the current request in self.last_pdu), so the sleep is inside it.
            await asyncio.sleep(slow["seconds"])
            self.last_pdu = pdu
        await original_handle(self)

    ServerRequestHandler.handle_request = handle

    async def run():
        if serial:
            server = ModbusSerialServer(context, port=serial, baudrate=19200)
            await server.serve_forever(background=True)
            print("READY", flush=True)
        else:
            server = ModbusTcpServer(context, address=("127.0.0.1", 0))
            await server.serve_forever(background=True)
            port = server.transport.sockets[0].getsockname()[1]
            print(f"READY {port}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(run())


if __name__ == "__main__":
    main()
