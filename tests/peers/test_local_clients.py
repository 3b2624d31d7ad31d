"""gatewayd's local endpoint seen by paho-mqtt (MQTT 3.1.1 and 5) and by the AWS IoT Device
SDK's MQTT clients, over TLS with the gateway-local CA and over plain TCP: the return and reason
codes a device library reports for what the front door allows and refuses, and commands a local
application sends reaching a child. Starts the real daemon (no cloud needed: READY does not
wait for it) and registers children with gatewayctl."""
import os
import pathlib
import socket
import ssl
import subprocess
import threading
import time

import paho.mqtt.client as paho
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
TARGET = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
GWD, CTL = TARGET / "debug" / "gatewayd", TARGET / "debug" / "gatewayctl"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


@pytest.fixture
def gw(tmp_path):
    if not GWD.exists():
        pytest.fail(f"{GWD} is missing: build it with `cargo build -p gatewayd`")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-keyout", tmp_path / "claim.key",
                    "-out", tmp_path / "claim.crt", "-days", "30", "-subj", "/CN=claim"],
                   check=True, capture_output=True)
    tls, tcp = free_port(), free_port()
    sock = tmp_path / "status.sock"
    (tmp_path / "gatewayd.toml").write_text(f"""
[cloud]
endpoint = "localhost"
port = 1
root_ca = "{tmp_path}/claim.crt"
[provisioning]
template = "T"
claim_cert = "{tmp_path}/claim.crt"
claim_key = "{tmp_path}/claim.key"
[daemon]
state_dir = "{tmp_path}/state"
status_socket = "{sock}"
log_target = "stderr"
[local]
tls_listen = ["127.0.0.1:{tls}"]
tcp_listen = ["127.0.0.1:{tcp}"]
onboarding_username = "onboarding"
onboarding_password_file = "{tmp_path}/onboarding.pw"
[local.clients.ops]
publish = ["cmd/+/#"]
""")
    (tmp_path / "onboarding.pw").write_text("factory-secret\n")
    proc = subprocess.Popen([GWD, "run", "--config", tmp_path / "gatewayd.toml"],
                            stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / "gatewayd.log", "w"))
    deadline = time.time() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", tcp), 0.2).close()
            break
        except OSError:
            assert time.time() < deadline and proc.poll() is None, "gatewayd did not start"
            time.sleep(0.05)

    def ctl(*args):
        return subprocess.run([CTL, "--socket", sock, *args], capture_output=True, text=True,
                              check=True).stdout

    ca = tmp_path / "local-ca.pem"
    ca.write_text(ctl("local", "ca"))
    g = type("Gw", (), {})()
    g.tls, g.tcp, g.ctl, g.ca = tls, tcp, ctl, str(ca)
    g.password = lambda cid: ctl("children", "add", cid, "--password").split("): ")[1].strip()
    yield g
    proc.terminate()
    proc.wait(10)


class Client:
    def __init__(self, gw, cid, user, pw, v5, tls):
        self.connack = threading.Event()
        self.code = None
        self.pubacks = {}
        self.acked = threading.Event()
        self.closed = threading.Event()
        self.c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=cid,
                             protocol=paho.MQTTv5 if v5 else paho.MQTTv311)
        self.c.username_pw_set(user, pw)
        if tls:
            self.c.tls_set(ca_certs=gw.ca, cert_reqs=ssl.CERT_REQUIRED)
        self.c.on_connect = self.on_connect
        self.c.on_publish = self.on_publish
        self.c.on_disconnect = lambda *a: self.closed.set()
        self.c.reconnect_delay_set(60, 60)
        self.c.connect("localhost", gw.tls if tls else gw.tcp, keepalive=30)
        self.c.loop_start()
        assert self.connack.wait(10)

    def on_connect(self, c, userdata, flags, rc, props):
        self.code = rc
        self.connack.set()

    def on_publish(self, c, userdata, mid, rc, props):
        self.pubacks[mid] = rc
        self.acked.set()

    def publish(self, topic):
        self.acked.clear()
        info = self.c.publish(topic, b"21.5", qos=1)
        self.acked.wait(5)
        return self.pubacks.get(info.mid)

    def stop(self):
        self.c.loop_stop()
        self.c.disconnect()


@pytest.mark.parametrize("v5", [False, True])
@pytest.mark.parametrize("tls", [False, True])
def test_a_child_publishes_as_itself_and_nothing_else(gw, v5, tls):
    pw = gw.password("c1")
    gw.password("c2")
    c = Client(gw, "c1", "c1", pw, v5, tls)
    assert not c.code.is_failure, c.code
    assert c.publish("dt/c1/temp") == 0
    if v5:
        # Another child's topic and AWS's reserved topics: PUBACK 0x87, the session stays.
        assert c.publish("dt/c2/temp") == 0x87
        assert c.publish("$aws/things/c1/shadow/update") == 0x87
        assert c.publish("dt/c1/temp") == 0
    else:
        # 3.1.1 has no negative PUBACK: the client is disconnected.
        assert c.publish("dt/c2/temp") is None
        assert c.closed.wait(5)
    c.stop()


@pytest.mark.parametrize("v5", [False, True])
def test_connect_refusals_carry_the_right_code(gw, v5):
    pw = gw.password("c1")
    # paho reports a 3.1.1 return code as its MQTT 5 equivalent (2 -> 0x85, 4 -> 0x86).
    cases = [("c2", "c1", pw, 0x85),            # spoofed client id
             ("c1", "c1", "wrong", 0x86),       # wrong password
             ("ghost", "ghost", pw, 0x86)]      # unknown child: same answer as a bad password
    for cid, user, p, code in cases:
        c = Client(gw, cid, user, p, v5, tls=False)
        assert c.code.value == code, (cid, user, c.code)
        c.stop()


def test_every_acknowledged_publish_is_in_the_outbox(gw):
    pw = gw.password("c1")
    c = Client(gw, "c1", "c1", pw, True, False)
    for _ in range(20):
        assert c.publish("dt/c1/burst") == 0
    c.stop()
    assert "c1: 20" in gw.ctl("outbox")


def cert_child(gw, tmp_path, cid):
    """A device with its own self-signed certificate (as a device from the factory has),
    registered by pinning its certificateId."""
    key, crt = tmp_path / f"{cid}.key", tmp_path / f"{cid}.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-keyout", key, "-out", crt,
                    "-days", "30", "-subj", f"/CN={cid}"], check=True, capture_output=True)
    gw.ctl("children", "add", cid, "--cert", str(crt))
    return str(crt), str(key)


def test_the_aws_sdk_mqtt311_client_is_a_child(gw, tmp_path):
    from types import SimpleNamespace
    from awscrt import mqtt
    import sdk
    crt, key = cert_child(gw, tmp_path, "dev1")
    conn = sdk.connect_v311(SimpleNamespace(port=gw.tls, root_ca=gw.ca), crt, key,
                            client_id="dev1")
    got = threading.Event()
    received = []

    def on_message(topic, payload, **kw):
        received.append((topic, payload))
        got.set()

    sub, _ = conn.subscribe("cmd/dev1/#", mqtt.QoS.AT_LEAST_ONCE, on_message)
    assert sub.result(sdk.TIMEOUT)["qos"] == mqtt.QoS.AT_LEAST_ONCE
    pub, _ = conn.publish("dt/dev1/temp", b"21.5", mqtt.QoS.AT_LEAST_ONCE)
    pub.result(sdk.TIMEOUT)  # PUBACK: stored in the outbox
    # A local application's command reaches the SDK client through the local router.
    ops = Client(gw, "ops", "ops", gw.password("ops"), True, False)
    assert ops.publish("cmd/dev1/setpoint") == 0
    assert got.wait(sdk.TIMEOUT), "command not delivered"
    assert received == [("cmd/dev1/setpoint", b"21.5")]
    ops.stop()
    conn.disconnect().result(sdk.TIMEOUT)
    assert "dev1: 1" in gw.ctl("outbox")


def test_the_aws_sdk_mqtt5_client_gets_reason_codes(gw, tmp_path):
    from types import SimpleNamespace
    from awscrt import mqtt5
    import sdk
    crt, key = cert_child(gw, tmp_path, "dev2")
    c = sdk.V5(SimpleNamespace(port=gw.tls, root_ca=gw.ca), crt, key, client_id="dev2")
    try:
        def publish(topic):
            p = mqtt5.PublishPacket(topic=topic, payload=b"1", qos=mqtt5.QoS.AT_LEAST_ONCE)
            return c.client.publish(p).result(sdk.TIMEOUT).puback.reason_code

        def subscribe(flt):
            s = mqtt5.SubscribePacket(subscriptions=[
                mqtt5.Subscription(topic_filter=flt, qos=mqtt5.QoS.AT_LEAST_ONCE)])
            return c.client.subscribe(s).result(sdk.TIMEOUT).reason_codes[0]

        assert publish("dt/dev2/temp") == mqtt5.PubackReasonCode.SUCCESS
        assert publish("dt/dev1/temp") == mqtt5.PubackReasonCode.NOT_AUTHORIZED
        assert publish("$aws/things/dev2/shadow/update") == mqtt5.PubackReasonCode.NOT_AUTHORIZED
        assert subscribe("cmd/dev2/#") == mqtt5.SubackReasonCode.GRANTED_QOS_1
        assert subscribe("cmd/dev1/#") == mqtt5.SubackReasonCode.NOT_AUTHORIZED
        ops = Client(gw, "ops", "ops", gw.password("ops"), False, True)
        assert ops.publish("cmd/dev2/go") == 0
        got = c.wait_for(lambda p: p.topic == "cmd/dev2/go")
        assert got is not None and got.payload == b"21.5"
        ops.stop()
        assert not c.disconnects, c.disconnects
    finally:
        c.stop()
    assert "dev2: 1" in gw.ctl("outbox")


def test_a_paho_constrained_device_announces_itself_and_connects_with_its_credential(gw):
    """A constrained device with only the shared onboarding credential: subscribes to its
    onboarding topic, announces itself, gets its own password, and connects with it as a child."""
    import json
    got = threading.Event()
    answer = {}
    dev = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="th-77",
                      protocol=paho.MQTTv311)
    dev.username_pw_set("onboarding", "factory-secret")
    subscribed = threading.Event()
    dev.on_subscribe = lambda *a: subscribed.set()

    def on_message(c, userdata, msg):
        answer[msg.topic] = json.loads(msg.payload)
        got.set()

    dev.on_message = on_message
    dev.connect("127.0.0.1", gw.tcp, keepalive=30)
    dev.loop_start()
    dev.subscribe("onboarding/th-77/#", qos=1)
    assert subscribed.wait(10)
    dev.publish("onboarding/th-77/announce",
                json.dumps({"serial": "TH-77", "model": "TH-1"}), qos=1).wait_for_publish(10)
    assert got.wait(10), "no answer to the announcement"
    dev.loop_stop()
    dev.disconnect()
    cred = answer["onboarding/th-77/credential"]
    assert cred["username"] == "th-77"
    child = Client(gw, "th-77", cred["username"], cred["password"], False, False)
    assert not child.code.is_failure, child.code
    assert child.publish("dt/th-77/temp") == 0
    child.stop()
    assert "th-77  password" in gw.ctl("children", "list")
