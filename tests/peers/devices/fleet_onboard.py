"""A device onboarding through gatewayd's local fleet-provisioning endpoint with the AWS IoT
Device SDK v2 for Python, unmodified: the SDK's MQTT 5 client and its fleet-provisioning client
(IotIdentityClientV2) pointed at the gateway instead of AWS. It connects with its onboarding
(factory) certificate, gets a certificate for a key it made (CreateCertificateFromCsr) and its
thing (RegisterThing), then connects to the gateway again with the new certificate as a child and
publishes one QoS 1 message. Prints one JSON line with what it got.

  fleet_onboard.py PORT LOCAL_CA CERT KEY CLIENT_ID TEMPLATE SERIAL WORKDIR [--cbor]
"""
import json
import sys
from types import SimpleNamespace

sys.path.insert(0, __import__("os").path.join(__import__("os").path.dirname(__file__), ".."))
import sdk  # noqa: E402
from awscrt import mqtt5  # noqa: E402
from awsiot import iotidentity  # noqa: E402

port, ca, cert, key, cid, template, serial, work = sys.argv[1:9]
target = SimpleNamespace(port=int(port), root_ca=ca)

dev = sdk.V5(target, cert, key, client_id=cid)
ident = dev.identity()
new_key, csr = sdk.make_csr(work)
created = ident.create_certificate_from_csr(
    iotidentity.CreateCertificateFromCsrRequest(certificate_signing_request=csr)).result(sdk.TIMEOUT)
reg = ident.register_thing(iotidentity.RegisterThingRequest(
    template_name=template, certificate_ownership_token=created.certificate_ownership_token,
    parameters={"SerialNumber": serial, "ParentThing": "gw-somebody-else"})).result(sdk.TIMEOUT)
dev.stop()

new_cert = f"{work}/device.crt"
open(new_cert, "w").write(created.certificate_pem)
child = sdk.V5(target, new_cert, new_key, client_id=cid)
p = mqtt5.PublishPacket(topic=f"dt/{cid}/hello", payload=b"onboarded",
                        qos=mqtt5.QoS.AT_LEAST_ONCE)
code = child.client.publish(p).result(sdk.TIMEOUT).puback.reason_code
child.stop()
print(json.dumps({"certificate_id": created.certificate_id, "thing_name": reg.thing_name,
                  "device_configuration": reg.device_configuration,
                  "puback": code.name}))
