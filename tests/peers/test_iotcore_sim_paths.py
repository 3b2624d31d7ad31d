"""Every way onto AWS IoT the emulator offers besides claim provisioning (trusted-user claims,
JITP, JITR), its quotas, fault injection and counters, driven by the AWS SDK and paho-mqtt."""
import json
import subprocess
import time

import cbor2  # noqa: F401  (kept with the other peers)
import pytest
from awscrt import mqtt
from awsiot import iotidentity

from sdk import TIMEOUT, V5, connect_v311, make_csr
from test_iotcore_sim_mqtt import Paho, app_cert
from test_iotcore_sim_sdk import TEMPLATE, THING_POLICY, wait


def openssl(*args):
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def maker_ca(tmp):
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{tmp}/maker.key", "-out", f"{tmp}/maker.pem", "-subj", "/CN=Maker CA",
            "-days", "30", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign")
    return f"{tmp}/maker.pem"


def device_cert(tmp, name, subject):
    openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{tmp}/{name}.key", "-out", f"{tmp}/{name}.csr", "-subj", subject)
    # An X.509 v3 certificate (the emulator's TLS stack refuses v1 client certificates).
    with open(f"{tmp}/v3.ext", "w") as f:
        f.write("basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n")
    openssl("x509", "-req", "-in", f"{tmp}/{name}.csr", "-CA", f"{tmp}/maker.pem",
            "-CAkey", f"{tmp}/maker.key", "-CAcreateserial", "-days", "30",
            "-extfile", f"{tmp}/v3.ext", "-out", f"{tmp}/{name}.pem")
    return f"{tmp}/{name}.pem", f"{tmp}/{name}.key"


JITP_TEMPLATE = {
    "Parameters": {
        "AWS::IoT::Certificate::CommonName": {"Type": "String"},
        "AWS::IoT::Certificate::Country": {"Type": "String"},
        "AWS::IoT::Certificate::SerialNumber": {"Type": "String"},
        "AWS::IoT::Certificate::Id": {"Type": "String"},
    },
    "Resources": {
        "thing": {"Type": "AWS::IoT::Thing", "Properties": {
            "ThingName": {"Ref": "AWS::IoT::Certificate::CommonName"},
            "AttributePayload": {"country": {"Ref": "AWS::IoT::Certificate::Country"},
                                 "serial": {"Ref": "AWS::IoT::Certificate::SerialNumber"}}}},
        "certificate": {"Type": "AWS::IoT::Certificate", "Properties": {
            "CertificateId": {"Ref": "AWS::IoT::Certificate::Id"}, "Status": "ACTIVE"}},
        # JITP documents give the policy as an escaped string.
        "policy": {"Type": "AWS::IoT::Policy",
                   "Properties": {"PolicyDocument": json.dumps(THING_POLICY)}},
    },
}


def test_jitp_first_connection_dropped_then_works(sim, tmp_path):
    sim.add_template("JitpTemplate", JITP_TEMPLATE)
    ca_id = sim.cli("ca", "register", "--ca", maker_ca(tmp_path), "--template",
                    "JitpTemplate").strip().split("=", 1)[1]
    sim.start()
    cert, key = device_cert(tmp_path, "meter", "/C=DE/O=Acme/CN=meter-17/serialNumber=SN17")
    with pytest.raises(Exception):
        connect_v311(sim, cert, key, client_id="meter-17")
    things = {t["thingName"]: t for t in sim.json("things", "list")}
    assert things["meter-17"]["attributes"] == {"country": "DE", "serial": "SN17"}
    time.sleep(1.1)  # one CONNECT per second per client id
    dev = connect_v311(sim, cert, key, client_id="meter-17")
    dev.publish("dt/meter-17/kwh", b"1", mqtt.QoS.AT_LEAST_ONCE)[0].result(TIMEOUT)
    dev.disconnect().result(TIMEOUT)
    # A subject lacking a field the template declares is a clear failure, and nothing is created.
    bad, bad_key = device_cert(tmp_path, "nocountry", "/O=Acme/CN=meter-18/serialNumber=SN18")
    with pytest.raises(Exception):
        connect_v311(sim, bad, bad_key, client_id="meter-18")
    assert wait(lambda: "Cannot resolve reference value: {Ref=AWS::IoT::Certificate::Country}"
                in sim.serve_log())
    assert f"CA {ca_id}" in sim.serve_log()
    assert "meter-18" not in [t["thingName"] for t in sim.json("things", "list")]


def test_jitr_event_then_activation_by_the_customer_rule(sim, tmp_path):
    ca_id = sim.cli("ca", "register", "--ca", maker_ca(tmp_path)).strip().split("=", 1)[1]
    doc = tmp_path / "thing-policy.json"
    doc.write_text(json.dumps(THING_POLICY))
    sim.cli("policies", "add", "--name", "ThingPolicy", "--document", str(doc))
    sim.start()
    acert, akey = app_cert(sim, tmp_path)
    app = Paho(sim, acert, akey)
    assert app.sub(f"$aws/events/certificates/registered/{ca_id}") == [1]
    cert, key = device_cert(tmp_path, "sensor", "/CN=sensor-5")
    with pytest.raises(Exception):
        connect_v311(sim, cert, key, client_id="sensor-5")
    assert wait(lambda: app.msgs), "no registration event"
    event = json.loads(app.msgs[0].payload)
    assert event["caCertificateId"] == ca_id
    assert event["certificateStatus"] == "PENDING_ACTIVATION"
    assert event["awsAccountId"] == "123456789012"
    certs = {c["certificateId"]: c for c in sim.json("certs", "list")}
    assert certs[event["certificateId"]]["status"] == "PENDING_ACTIVATION"
    # The customer's rule and Lambda activate it, attach a thing and a policy.
    sim.cli("certs", "activate", "--id", event["certificateId"], "--thing", "sensor-5",
            "--policy", "ThingPolicy")
    time.sleep(1.1)
    dev = connect_v311(sim, cert, key, client_id="sensor-5")
    dev.publish("dt/sensor-5/t", b"1", mqtt.QoS.AT_LEAST_ONCE)[0].result(TIMEOUT)
    dev.disconnect().result(TIMEOUT)
    app.close()


def test_trusted_user_claim_within_its_window(sim, tmp_path):
    sim.add_template("GatewayTemplate", TEMPLATE)
    sim.add_template("Other", TEMPLATE)
    out = sim.cli("claim", "create", "--template", "GatewayTemplate")
    kv = dict(l.split("=", 1) for l in out.splitlines())
    assert kv["certificate_id"] not in [c["certificateId"] for c in sim.json("certs", "list")]
    sim.start()
    c = V5(sim, kv["claim_cert"], kv["claim_key"])
    ident = c.identity()
    _, csr = make_csr(tmp_path, "ec256")
    created = ident.create_certificate_from_csr(
        iotidentity.CreateCertificateFromCsrRequest(certificate_signing_request=csr)).result(TIMEOUT)
    reg = ident.register_thing(iotidentity.RegisterThingRequest(
        template_name="GatewayTemplate", certificate_ownership_token=created.certificate_ownership_token,
        parameters={"SerialNumber": "TU1"})).result(TIMEOUT)
    assert reg.thing_name == "gw-TU1"
    c.stop()
    # The claim's implicit policy covers its own template only.
    c = Paho(sim, kv["claim_cert"], kv["claim_key"])
    assert c.sub("$aws/provisioning-templates/Other/provision/json/+") == [0x80]
    c.close()
    # A claim whose window runs out: the connection is dropped, and it no longer connects.
    out = sim.cli("claim", "create", "--template", "GatewayTemplate", "--ttl-secs", "2")
    short = dict(l.split("=", 1) for l in out.splitlines())
    assert abs(int(short["expiration"]) - (time.time() + 2)) < 2
    p = Paho(sim, short["claim_cert"], short["claim_key"])
    assert p.disconnected.wait(5), "temporary claim outlived its window"
    with pytest.raises(Exception):
        connect_v311(sim, short["claim_cert"], short["claim_key"])
    assert wait(lambda: f"certificate {short['certificate_id']} is outside its validity period"
                in sim.serve_log())


def counters(sim, reset=False):
    return json.loads(sim.cli("counters", *(["--reset"] if reset else [])))


def csr_requests(client, tmp_path, n):
    _, csr = make_csr(tmp_path, "ec256")
    for _ in range(n):
        client.c.publish("$aws/certificates/create-from-csr/json",
                         json.dumps({"certificateSigningRequest": csr}), qos=1)
    assert wait(lambda: len(client.msgs) >= n), f"{len(client.msgs)} of {n} answers"
    return [json.loads(m.payload) | {"_topic": m.topic} for m in client.msgs[:n]]


def test_provisioning_tps_quota_throttles(sim, tmp_path):
    sim.start("--create-from-csr-tps", "2")
    c = Paho(sim, sim.claim_cert, sim.claim_key)
    c.sub("$aws/certificates/create-from-csr/json/+")
    answers = csr_requests(c, tmp_path, 6)
    throttled = [a for a in answers if a["_topic"].endswith("/rejected")]
    assert all(a["statusCode"] == 429 and a["errorCode"] == "ThrottlingException" for a in throttled)
    assert 3 <= len(throttled) <= 4, answers
    assert counters(sim)["throttled_provisioning_calls"] == len(throttled)
    c.close()


def test_per_connection_limits(sim, tmp_path):
    sim.start("--publishes-per-second", "10")
    cert, key = app_cert(sim, tmp_path)
    pub = Paho(sim, cert, key)
    for i in range(30):
        pub.c.publish("dt/burst", str(i), qos=1)
    assert wait(lambda: len(pub.pubacks) == 30)
    n = counters(sim)
    assert n["publishes_received"] + n["throttled_publishes"] == 30
    assert n["throttled_publishes"] >= 15, n
    assert n["publishes_by_topic"]["dt/burst"] == n["publishes_received"]
    # At most 8 filters per SUBSCRIBE: the ninth is refused.
    _, mid = pub.c.subscribe([(f"f/{i}", 1) for i in range(9)])
    assert wait(lambda: mid in pub.subacks)
    assert pub.subacks[mid] == [1] * 8 + [0x80]
    # One CONNECT per second per client id.
    Paho(sim, cert, key, client_id="rate-1")
    Paho(sim, cert, key, client_id="rate-1")
    assert counters(sim)["throttled_connects"] == 1
    pub.close()


def test_faults_and_counters(sim, tmp_path):
    sim.start()
    cert, key = app_cert(sim, tmp_path)
    a = Paho(sim, cert, key)
    a.sub("dt/#")
    # Drop every connection.
    sim.cli("fault", "drop-all")
    assert a.disconnected.wait(5)
    a.close()
    # Refuse connections for a while.
    sim.cli("fault", "refuse", "--seconds", "1.5")
    with pytest.raises(Exception):
        connect_v311(sim, cert, key)
    time.sleep(1.6)
    connect_v311(sim, cert, key).disconnect().result(TIMEOUT)
    # Reject the next fleet-provisioning call with a chosen error, then serve normally.
    c = Paho(sim, sim.claim_cert, sim.claim_key)
    c.sub("$aws/certificates/create-from-csr/json/+")
    sim.cli("fault", "reject-next", "--count", "1", "--status", "500",
            "--code", "InternalFailureException", "--message", "boom")
    sim.cli("fault", "delay", "--ms", "600")
    t0 = time.time()
    answers = csr_requests(c, tmp_path, 2)
    assert time.time() - t0 >= 1.2, "responses were not delayed"
    assert answers[0]["errorCode"] == "InternalFailureException" and answers[0]["errorMessage"] == "boom"
    assert answers[1]["_topic"].endswith("/accepted")
    sim.cli("fault", "clear")
    # Stop acknowledging publishes: delivered, but no PUBACK until the stall ends.
    sub = Paho(sim, cert, key)
    sub.sub("dt/#")
    pub = Paho(sim, cert, key)
    sim.cli("fault", "stall-acks", "--seconds", "60")
    info = pub.c.publish("dt/stalled", b"x", qos=1)
    assert wait(lambda: any(m.topic == "dt/stalled" for m in sub.msgs))
    time.sleep(0.5)
    assert info.mid not in pub.pubacks
    n = counters(sim, reset=True)
    assert n["unacknowledged_publishes"] == 1
    assert n["publishes_by_topic"]["dt/stalled"] == 1
    assert n["injected_rejections"] == 1
    assert n["refused_connections"] >= 1
    assert counters(sim)["publishes_received"] == 0, "reset did not zero the counters"
    for x in (c, sub, pub):
        x.close()


def test_orphaned_certificates_are_counted(sim, tmp_path):
    sim.start("--token-ttl", "1")
    c = Paho(sim, sim.claim_cert, sim.claim_key)
    c.sub("$aws/certificates/create-from-csr/json/+")
    created = csr_requests(c, tmp_path, 1)[0]
    time.sleep(1.2)
    assert created["certificateId"] in counters(sim)["orphaned_certificates"]
    c.close()


def test_subscription_and_throughput_limits(sim, tmp_path):
    sim.start("--bytes-per-second", "100000")
    cert, key = app_cert(sim, tmp_path)
    c = Paho(sim, cert, key)
    # 50 subscriptions per connection: the 51st is refused.
    codes = []
    for chunk in range(7):
        _, mid = c.c.subscribe([(f"s/{chunk}/{i}", 1) for i in range(8)])
        assert wait(lambda: mid in c.subacks)
        codes += c.subacks[mid]
    assert codes[:50] == [1] * 50 and set(codes[50:]) == {0x80}, codes
    # 512 KiB/s per connection (here 100 kB/s): excess is delayed, not dropped.
    t0 = time.time()
    for i in range(4):
        c.c.publish("dt/big", b"x" * 100_000, qos=1)
    assert wait(lambda: len(c.pubacks) == 4, 15)
    assert time.time() - t0 >= 1.5, "400 kB at 100 kB/s were not slowed down"
    n = counters(sim)
    assert n["publishes_by_topic"]["dt/big"] == 4 and n["throttled_publishes"] == 0
    c.close()
