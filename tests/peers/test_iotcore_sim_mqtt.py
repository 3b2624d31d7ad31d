"""iotcore-sim as an MQTT broker, seen by paho-mqtt (a client nobody here wrote): CBOR
provisioning, AWS broker semantics (QoS 2 unsupported, duplicate client ids, persistent
sessions, retained messages), limits, and a registry that survives restarts."""
import json
import ssl
import threading
import time
import uuid

import cbor2
import paho.mqtt.client as paho
import pytest

from sdk import make_csr
from test_iotcore_sim_sdk import APP_POLICY, TEMPLATE, wait


class Paho:
    def __init__(self, sim, cert, key, client_id=None, clean=True, v5=False):
        self.msgs = []
        self.subacks = {}
        self.pubacks = set()
        self.disconnected = threading.Event()
        self.connected = threading.Event()
        self.session_present = None
        proto = paho.MQTTv5 if v5 else paho.MQTTv311
        kw = {} if v5 else {"clean_session": clean}
        self.c = paho.Client(paho.CallbackAPIVersion.VERSION2,
                             client_id=client_id or f"paho-{uuid.uuid4().hex[:8]}",
                             protocol=proto, **kw)
        self.c.tls_set(ca_certs=sim.root_ca, certfile=cert, keyfile=key)
        self.c.on_message = lambda c, u, m: self.msgs.append(m)
        self.c.on_subscribe = lambda c, u, mid, rcs, props: self.subacks.__setitem__(
            mid, [int(getattr(r, "value", r)) for r in rcs])
        self.c.on_publish = lambda c, u, mid, rc, props: self.pubacks.add(mid)

        def on_connect(c, u, flags, rc, props):
            self.session_present = flags.session_present
            self.connected.set()

        self.c.on_connect = on_connect
        self.c.on_disconnect = lambda *a: self.disconnected.set()
        self.c.connect("localhost", sim.port, keepalive=30,
                       **({"clean_start": clean} if v5 else {}))
        self.c.loop_start()
        assert self.connected.wait(10), "paho did not connect"

    def sub(self, topic, qos=1):
        _, mid = self.c.subscribe(topic, qos)
        wait(lambda: mid in self.subacks, 3)
        return self.subacks.get(mid)

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


def app_cert(sim, tmp_path, name="app"):
    doc = tmp_path / "app-policy.json"
    doc.write_text(json.dumps(APP_POLICY))
    if "AppPolicy" not in sim.cli("policies", "list"):
        sim.cli("policies", "add", "--name", "AppPolicy", "--document", str(doc))
    out = sim.cli("certs", "create", "--out", str(tmp_path / name), "--policy", "AppPolicy")
    kv = dict(l.split("=", 1) for l in out.splitlines())
    return kv["cert"], kv["key"]


def test_cbor_provisioning_with_paho(sim, tmp_path):
    sim.add_template("GatewayTemplate", TEMPLATE)
    sim.start()
    c = Paho(sim, sim.claim_cert, sim.claim_key)
    for t in ("$aws/certificates/create-from-csr/cbor/+",
              "$aws/provisioning-templates/GatewayTemplate/provision/cbor/+"):
        assert c.sub(t) == [1]
    _, csr = make_csr(tmp_path, "ec521")
    c.c.publish("$aws/certificates/create-from-csr/cbor",
                cbor2.dumps({"certificateSigningRequest": csr}), qos=1)
    assert wait(lambda: c.msgs)
    m = c.msgs.pop(0)
    assert m.topic == "$aws/certificates/create-from-csr/cbor/accepted", m.payload
    created = cbor2.loads(m.payload)
    c.c.publish("$aws/provisioning-templates/GatewayTemplate/provision/cbor",
                cbor2.dumps({"certificateOwnershipToken": created["certificateOwnershipToken"],
                             "parameters": {"SerialNumber": "C001"}}), qos=1)
    assert wait(lambda: c.msgs)
    m = c.msgs.pop(0)
    assert m.topic.endswith("/provision/cbor/accepted"), cbor2.loads(m.payload)
    assert cbor2.loads(m.payload)["thingName"] == "gw-C001"
    c.close()


def test_replies_go_only_to_the_requesting_connection(sim, tmp_path):
    sim.start()
    a = Paho(sim, sim.claim_cert, sim.claim_key)
    b = Paho(sim, sim.claim_cert, sim.claim_key)
    for c in (a, b):
        assert c.sub("$aws/certificates/create/json/+") == [1]
    a.c.publish("$aws/certificates/create/json", b"", qos=1)
    assert wait(lambda: a.msgs)
    assert a.msgs[0].topic == "$aws/certificates/create/json/accepted"
    time.sleep(0.5)
    assert b.msgs == [], "another subscriber saw a provisioning reply"
    a.close()
    b.close()


def test_aws_broker_semantics(sim, tmp_path):
    sim.start()
    cert, key = app_cert(sim, tmp_path)
    sub = Paho(sim, cert, key)
    assert sub.sub("dt/#") == [1]
    # QoS 2 subscribe: AWS sends no SUBACK at all.
    assert sub.sub("other/topic", qos=2) is None
    pub = Paho(sim, cert, key)
    info = pub.c.publish("dt/q2", b"two", qos=2)
    time.sleep(0.5)
    assert info.mid not in pub.pubacks, "QoS 2 publish was acknowledged"
    pub.c.publish("dt/q1", b"one", qos=1).wait_for_publish(5)
    assert wait(lambda: any(m.topic == "dt/q1" for m in sub.msgs))
    assert not any(m.topic == "dt/q2" for m in sub.msgs), "QoS 2 message was delivered"
    # '#' does not match the parent level on AWS.
    pub.c.publish("dt", b"parent", qos=1).wait_for_publish(5)
    time.sleep(0.3)
    assert not any(m.topic == "dt" for m in sub.msgs)
    # Retained message delivered to a later exact-topic subscriber, not to a wildcard one.
    pub.c.publish("state/x", b"kept", qos=1, retain=True).wait_for_publish(5)
    late = Paho(sim, cert, key)
    late.sub("state/+")
    late.sub("state/x")
    assert wait(lambda: late.msgs)
    time.sleep(0.3)
    assert [m.payload for m in late.msgs] == [b"kept"]
    # A duplicate client id disconnects the older connection.
    first = Paho(sim, cert, key, client_id="dup-1")
    time.sleep(1.1)  # AWS allows one CONNECT per second per client id
    second = Paho(sim, cert, key, client_id="dup-1")
    assert first.disconnected.wait(5), "older connection was not disconnected"
    assert not second.disconnected.is_set()
    for c in (sub, pub, late, first, second):
        c.close()


def test_persistent_session_queues_qos1_while_offline(sim, tmp_path):
    sim.start()
    cert, key = app_cert(sim, tmp_path)
    dev = Paho(sim, cert, key, client_id="persist-1", clean=False)
    assert dev.session_present is False
    assert dev.sub("cmd/persist-1") == [1]
    dev.close()
    app = Paho(sim, cert, key)
    app.c.publish("cmd/persist-1", b"while-away", qos=1).wait_for_publish(5)
    time.sleep(1.1)  # AWS allows one CONNECT per second per client id
    back = Paho(sim, cert, key, client_id="persist-1", clean=False)
    assert back.session_present is True
    assert wait(lambda: back.msgs)
    assert back.msgs[0].payload == b"while-away"
    back.close()
    app.close()


def test_mqtt5_client_gets_reason_codes(sim, tmp_path):
    sim.start()
    c = Paho(sim, sim.claim_cert, sim.claim_key, v5=True)
    assert c.sub("dt/not-allowed") == [0x87]  # Not authorized
    assert c.sub("$aws/certificates/create/json/accepted") == [1]
    c.close()


def test_template_limits_and_bad_templates_are_named(sim, tmp_path):
    huge = dict(TEMPLATE, DeviceConfiguration={"Pad": "x" * 11000})
    r = sim.cli("template", "add", "--name", "Huge", "--body",
                str(_write(tmp_path / "huge.json", json.dumps(huge))), check=False)
    assert r.returncode != 0 and "10240" in r.stderr.replace(",", ""), r.stderr
    bad = dict(TEMPLATE, Resources={"thing": {"Type": "AWS::IoT::Thing",
                                              "Properties": {"ThingName": {"Fn::If": []}}}})
    r = sim.cli("template", "add", "--name", "Bad", "--body",
                str(_write(tmp_path / "bad.json", json.dumps(bad))), check=False)
    assert r.returncode != 0 and "Fn::If" in r.stderr, r.stderr
    r = sim.cli("template", "add", "--name", "bad name!", "--body",
                str(_write(tmp_path / "ok.json", json.dumps(TEMPLATE))), check=False)
    assert r.returncode != 0 and "invalid template name" in r.stderr


def _write(p, text):
    p.write_text(text)
    return p


def test_registry_survives_restart(sim, tmp_path):
    sim.add_template("GatewayTemplate", TEMPLATE)
    sim.start()
    c = Paho(sim, sim.claim_cert, sim.claim_key)
    c.sub("$aws/certificates/create-from-csr/json/+")
    c.sub("$aws/provisioning-templates/GatewayTemplate/provision/json/+")
    key, csr = make_csr(tmp_path, "rsa2048")
    c.c.publish("$aws/certificates/create-from-csr/json",
                json.dumps({"certificateSigningRequest": csr}), qos=1)
    assert wait(lambda: c.msgs)
    created = json.loads(c.msgs.pop(0).payload)
    c.c.publish("$aws/provisioning-templates/GatewayTemplate/provision/json",
                json.dumps({"certificateOwnershipToken": created["certificateOwnershipToken"],
                            "parameters": {"SerialNumber": "R001"}}), qos=1)
    assert wait(lambda: c.msgs)
    assert json.loads(c.msgs.pop(0).payload)["thingName"] == "gw-R001"
    c.close()
    port = sim.port
    sim.stop()
    sim.start(port=port)
    assert "gw-R001" in [t["thingName"] for t in sim.json("things", "list")]
    (tmp_path / "r.pem").write_text(created["certificatePem"])
    dev = Paho(sim, str(tmp_path / "r.pem"), key, client_id="gw-R001")
    dev.c.publish("dt/gw-R001/x", b"1", qos=1).wait_for_publish(5)
    assert not dev.disconnected.is_set()
    dev.close()


def policy_cert(sim, tmp_path, name, statements):
    doc = tmp_path / f"{name}.json"
    doc.write_text(json.dumps({"Version": "2012-10-17", "Statement": statements}))
    sim.cli("policies", "add", "--name", name, "--document", str(doc))
    out = sim.cli("certs", "create", "--out", str(tmp_path / name), "--policy", name)
    kv = dict(l.split("=", 1) for l in out.splitlines())
    return kv["cert"], kv["key"], kv["certificate_id"]


ARN = "arn:aws:iot:us-east-1:123456789012"


def test_policy_governs_every_delivery_path(sim, tmp_path):
    # Absence is shown without sleeping: a delivery on one connection keeps its order, so once a
    # later, allowed sentinel has arrived, a refused message that was sent before it would have
    # arrived first.
    sim.start()
    cert, key, _ = policy_cert(sim, tmp_path, "ReadOk", [
        {"Effect": "Allow", "Action": "iot:Connect", "Resource": "*"},
        {"Effect": "Allow", "Action": "iot:Subscribe", "Resource": f"{ARN}:topicfilter/a/*"},
        {"Effect": "Allow", "Action": "iot:Receive", "Resource": f"{ARN}:topic/a/ok"}])
    acert, akey = app_cert(sim, tmp_path)
    app = Paho(sim, acert, akey)

    def sentinel(client, tag):
        app.c.publish("a/ok", tag, qos=1).wait_for_publish(5)
        assert wait(lambda: any(m.payload == tag for m in client.msgs), 10), client.msgs
        return [(m.topic, m.payload) for m in client.msgs]

    # Live delivery.
    dev = Paho(sim, cert, key, client_id="reader-1", clean=False)
    assert dev.sub("a/#") == [1]
    for t in ("a/ok", "a/secret"):
        app.c.publish(t, t.encode(), qos=1).wait_for_publish(5)
    assert sentinel(dev, b"end-live") == [("a/ok", b"a/ok"), ("a/ok", b"end-live")]
    # Messages stored for the offline persistent session.
    dev.close()
    for t in ("a/ok", "a/secret"):
        app.c.publish(t, b"stored", qos=1).wait_for_publish(5)
    app.c.publish("a/ok", b"end-stored", qos=1).wait_for_publish(5)
    time.sleep(1.1)  # AWS allows one CONNECT per second per client id
    back = Paho(sim, cert, key, client_id="reader-1", clean=False)
    assert back.session_present
    assert wait(lambda: any(m.payload == b"end-stored" for m in back.msgs), 10), back.msgs
    assert [(m.topic, m.payload) for m in back.msgs] == [("a/ok", b"stored"), ("a/ok", b"end-stored")]
    back.msgs.clear()
    # Retained messages.
    app.c.publish("a/secret", b"kept", qos=1, retain=True).wait_for_publish(5)
    assert back.sub("a/secret") == [1]
    assert sentinel(back, b"end-retained") == [("a/ok", b"end-retained")]
    back.close()
    app.close()


def test_answer_and_event_topics_are_the_services_alone(sim, tmp_path):
    sim.start()
    victim = Paho(sim, sim.claim_cert, sim.claim_key)
    assert victim.sub("$aws/certificates/create/json/accepted") == [1]
    forger = Paho(sim, sim.claim_cert, sim.claim_key)
    forger.c.publish("$aws/certificates/create/json/accepted", b'{"certificateId": "fake"}', qos=1)
    assert forger.disconnected.wait(5), "publishing on an answer topic was not refused"
    time.sleep(0.3)
    assert victim.msgs == [], "a forged answer reached another device"
    acert, akey = app_cert(sim, tmp_path)
    app = Paho(sim, acert, akey)
    app.c.publish("$aws/events/certificates/registered/x", b"{}", qos=1)
    assert app.disconnected.wait(5), "publishing a registry event was not refused"
    victim.close()


def test_session_takeover_needs_the_same_certificate(sim, tmp_path):
    sim.start()
    acert, akey = app_cert(sim, tmp_path, "owner")
    bcert, bkey = app_cert(sim, tmp_path, "other")
    owner = Paho(sim, acert, akey, client_id="shared-id", clean=False)
    assert owner.sub("t/#") == [1]
    time.sleep(1.1)
    other = Paho(sim, bcert, bkey, client_id="shared-id", clean=False)
    assert owner.disconnected.wait(5)
    assert other.session_present is False, "another certificate resumed the session"
    pub = Paho(sim, acert, akey)
    pub.c.publish("t/1", b"x", qos=1).wait_for_publish(5)
    time.sleep(0.5)
    assert other.msgs == [], "another certificate inherited the subscriptions"
    other.close()
    pub.close()


def test_deactivating_a_certificate_disconnects_it(sim, tmp_path):
    sim.start()
    cert, key, cert_id = policy_cert(sim, tmp_path, "Any", [
        {"Effect": "Allow", "Action": "iot:*", "Resource": "*"}])
    dev = Paho(sim, cert, key)
    sim.cli("certs", "deactivate", "--id", cert_id)
    assert dev.disconnected.wait(5), "a deactivated certificate stayed connected"
    assert wait(lambda: "certificate no longer ACTIVE" in sim.serve_log())


def test_resumed_session_delivers_everything_stored(sim, tmp_path):
    sim.start()
    cert, key = app_cert(sim, tmp_path)
    dev = Paho(sim, cert, key, client_id="store-1", clean=False)
    assert dev.sub("s/#") == [1]
    dev.close()
    app = Paho(sim, cert, key)
    for i in range(30):
        app.c.publish("s/x", str(i), qos=1)
    assert wait(lambda: len(app.pubacks) == 30)
    time.sleep(1.1)
    back = Paho(sim, cert, key, client_id="store-1", clean=False)
    # AWS resends stored messages at 10 per second.
    assert wait(lambda: len(back.msgs) == 30, 10), len(back.msgs)
    assert sorted(int(m.payload) for m in back.msgs) == list(range(30))
    back.close()
    app.close()
