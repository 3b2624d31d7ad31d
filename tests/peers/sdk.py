"""Small helpers around the AWS IoT Device SDK v2 for Python, used as a real peer."""
import threading
import time
import uuid
from concurrent.futures import Future

from awscrt import mqtt, mqtt5, mqtt_request_response
from awsiot import iotidentity, mqtt5_client_builder, mqtt_connection_builder

TIMEOUT = 10


def connect_v311(sim, cert, key, client_id=None, clean_session=True, on_interrupted=None):
    """MQTT 3.1.1 connection the way the SDK's samples build it, pointed at the emulator."""
    conn = mqtt_connection_builder.mtls_from_path(
        endpoint="localhost", port=sim.port, cert_filepath=cert, pri_key_filepath=key,
        ca_filepath=sim.root_ca, client_id=client_id or f"test-{uuid.uuid4().hex}",
        clean_session=clean_session, keep_alive_secs=30,
        on_connection_interrupted=on_interrupted,
        reconnect_min_timeout_secs=30, reconnect_max_timeout_secs=60)
    conn.connect().result(TIMEOUT)
    return conn


class V5:
    """An MQTT 5 client started and waited for, as the current SDK samples do."""

    def __init__(self, sim, cert, key, client_id=None):
        self.connected = Future()
        self.stopped = Future()
        self.disconnects = []
        self.received = []
        self.cond = threading.Condition()

        def on_success(data):
            if not self.connected.done():
                self.connected.set_result(data)

        def on_failure(data):
            if not self.connected.done():
                self.connected.set_exception(data.exception)

        def on_disconnect(data):
            self.disconnects.append(data)

        def on_publish(data):
            with self.cond:
                self.received.append(data.publish_packet)
                self.cond.notify_all()

        self.client = mqtt5_client_builder.mtls_from_path(
            endpoint="localhost", port=sim.port, cert_filepath=cert, pri_key_filepath=key,
            ca_filepath=sim.root_ca, client_id=client_id or f"mqtt5-sample-{uuid.uuid4().hex}",
            on_lifecycle_connection_success=on_success,
            on_lifecycle_connection_failure=on_failure,
            on_lifecycle_disconnection=on_disconnect,
            on_lifecycle_stopped=lambda d: self.stopped.set_result(True),
            on_publish_received=on_publish)
        self.client.start()
        self.connected.result(TIMEOUT)

    def identity(self):
        opts = mqtt_request_response.ClientOptions(
            max_request_response_subscriptions=2, max_streaming_subscriptions=0,
            operation_timeout_in_seconds=TIMEOUT)
        return iotidentity.IotIdentityClientV2(self.client, opts)

    def wait_for(self, pred, timeout=TIMEOUT):
        end = time.time() + timeout
        with self.cond:
            while not any(pred(p) for p in self.received):
                left = end - time.time()
                if left <= 0:
                    return None
                self.cond.wait(left)
            return next(p for p in self.received if pred(p))

    def stop(self):
        self.client.stop()
        self.stopped.result(TIMEOUT)


def make_csr(tmp, kind="ec256"):
    """A key and CSR made with openssl, as a device would."""
    import subprocess
    key = f"{tmp}/{kind}.key"
    csr = f"{tmp}/{kind}.csr"
    if kind.startswith("ec"):
        curve = {"ec256": "prime256v1", "ec384": "secp384r1", "ec521": "secp521r1",
                 "ec192": "prime192v1", "k256": "secp256k1"}[kind]
        subprocess.run(["openssl", "ecparam", "-name", curve, "-genkey", "-noout", "-out", key],
                       check=True)
    else:
        bits = kind.removeprefix("rsa")
        subprocess.run(["openssl", "genrsa", "-out", key, bits], check=True,
                       capture_output=True)
    subprocess.run(["openssl", "req", "-new", "-key", key, "-subj", "/CN=device", "-out", csr],
                   check=True)
    return key, open(csr).read()
