"""iotcore-sim driven by AWS's own Device SDK v2 for Python: both provisioning flows end to end,
the rejections a device can meet, and bad input that must not take the emulator down."""
import json
import os
import socket
import ssl
import time
import uuid

import pytest
from awscrt import mqtt, mqtt5
from awsiot import V2ServiceException, iotidentity

from sdk import TIMEOUT, V5, connect_v311, make_csr

THING_POLICY = {
    "Version": "2012-10-17",
    "Statement": [
        {"Effect": "Allow", "Action": "iot:Connect",
         "Resource": "arn:aws:iot:us-east-1:123456789012:client/${iot:Connection.Thing.ThingName}"},
        {"Effect": "Allow", "Action": ["iot:Publish", "iot:Receive"],
         "Resource": "arn:aws:iot:us-east-1:123456789012:topic/dt/${iot:Connection.Thing.ThingName}/*"},
        {"Effect": "Allow", "Action": "iot:Subscribe",
         "Resource": "arn:aws:iot:us-east-1:123456789012:topicfilter/dt/${iot:Connection.Thing.ThingName}/*"},
    ],
}

TEMPLATE = {
    "Parameters": {
        "SerialNumber": {"Type": "String"},
        "Site": {"Type": "String", "Default": "plant-1"},
        "AWS::IoT::Certificate::Id": {"Type": "String"},
    },
    "Mappings": {"SiteTable": {"plant-1": {"Url": "https://plant-1.example"}}},
    "Resources": {
        "thing": {
            "Type": "AWS::IoT::Thing",
            "Properties": {
                "ThingName": {"Fn::Join": ["", ["gw-", {"Ref": "SerialNumber"}]]},
                "AttributePayload": {"site": {"Ref": "Site"}},
            },
        },
        "certificate": {
            "Type": "AWS::IoT::Certificate",
            "Properties": {"CertificateId": {"Ref": "AWS::IoT::Certificate::Id"}, "Status": "ACTIVE"},
        },
        "policy": {"Type": "AWS::IoT::Policy", "Properties": {"PolicyDocument": THING_POLICY}},
    },
    "DeviceConfiguration": {
        "SiteUrl": {"Fn::FindInMap": ["SiteTable", {"Ref": "Site"}, "Url"]},
        "Serial": {"Ref": "SerialNumber"},
    },
}

APP_POLICY = {"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Action": "iot:*", "Resource": "*"}]}


def app_client(sim, tmp_path):
    """A 'cloud application' connection that may read and write every topic."""
    doc = tmp_path / "app-policy.json"
    doc.write_text(json.dumps(APP_POLICY))
    if "AppPolicy" not in sim.cli("policies", "list"):
        sim.cli("policies", "add", "--name", "AppPolicy", "--document", str(doc))
    out = sim.cli("certs", "create", "--out", str(tmp_path / f"app-{uuid.uuid4().hex[:6]}"),
                  "--policy", "AppPolicy")
    kv = dict(l.split("=", 1) for l in out.splitlines())
    return connect_v311(sim, kv["cert"], kv["key"], client_id=f"app-{uuid.uuid4().hex[:8]}")


def subscribe(conn, topic, qos=mqtt.QoS.AT_LEAST_ONCE):
    got = []
    fut, _ = conn.subscribe(topic, qos, callback=lambda topic, payload, **kw: got.append((topic, payload)))
    result = fut.result(TIMEOUT)
    return got, result


def wait(pred, timeout=TIMEOUT):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(0.05)
    return False


def publish_as_thing(sim, tmp_path, cert_pem, key_path, thing):
    """Reconnect with the issued certificate as the thing and publish under the thing's policy;
    a cloud application must receive it."""
    cert = tmp_path / f"{thing}.pem"
    cert.write_text(cert_pem)
    app = app_client(sim, tmp_path)
    got, _ = subscribe(app, f"dt/{thing}/#")
    dev = connect_v311(sim, str(cert), key_path, client_id=thing)
    dev.publish(f"dt/{thing}/temp", b'{"t": 21.5}', mqtt.QoS.AT_LEAST_ONCE)[0].result(TIMEOUT)
    assert wait(lambda: got), "cloud application did not receive the thing's publish"
    assert got[0] == (f"dt/{thing}/temp", b'{"t": 21.5}')
    dev.disconnect().result(TIMEOUT)
    app.disconnect().result(TIMEOUT)


def test_csr_flow_with_identity_client_v2_then_thing_publishes(sim, tmp_path):
    sim.add_template("GatewayTemplate", TEMPLATE)
    sim.start()
    key, csr = make_csr(tmp_path, "ec256")
    c = V5(sim, sim.claim_cert, sim.claim_key)
    ident = c.identity()
    created = ident.create_certificate_from_csr(
        iotidentity.CreateCertificateFromCsrRequest(certificate_signing_request=csr)).result(TIMEOUT)
    assert len(created.certificate_id) == 64
    assert created.certificate_pem.startswith("-----BEGIN CERTIFICATE-----")
    certs = {x["certificateId"]: x for x in sim.json("certs", "list")}
    assert certs[created.certificate_id]["status"] == "PENDING_ACTIVATION"
    reg = ident.register_thing(iotidentity.RegisterThingRequest(
        template_name="GatewayTemplate",
        certificate_ownership_token=created.certificate_ownership_token,
        parameters={"SerialNumber": "0001"})).result(TIMEOUT)
    assert reg.thing_name == "gw-0001"
    assert reg.device_configuration == {"SiteUrl": "https://plant-1.example", "Serial": "0001"}
    c.stop()
    things = {t["thingName"]: t for t in sim.json("things", "list")}
    assert things["gw-0001"]["attributes"] == {"site": "plant-1"}
    assert things["gw-0001"]["principals"] == [created.certificate_id]
    certs = {x["certificateId"]: x for x in sim.json("certs", "list")}
    assert certs[created.certificate_id]["status"] == "ACTIVE"
    publish_as_thing(sim, tmp_path, created.certificate_pem, key, "gw-0001")


def v1_call(conn, subscribe_accepted, subscribe_rejected, publish):
    """One V1 IotIdentityClient call the way the older SDK sample does it: subscribe to accepted
    and rejected, wait for both SUBACKs, publish at QoS 1, wait for one answer."""
    answer = {}
    done = __import__("threading").Event()

    def on(kind):
        def cb(resp):
            answer[kind] = resp
            done.set()
        return cb

    fa, _ = subscribe_accepted(on("accepted"))
    fr, _ = subscribe_rejected(on("rejected"))
    fa.result(TIMEOUT)
    fr.result(TIMEOUT)
    publish().result(TIMEOUT)
    assert done.wait(TIMEOUT), "no answer on accepted or rejected"
    return answer


def test_keys_flow_with_identity_client_v1_over_mqtt311(sim, tmp_path):
    sim.add_template("GatewayTemplate", TEMPLATE)
    sim.start()
    conn = connect_v311(sim, sim.claim_cert, sim.claim_key)
    ident = iotidentity.IotIdentityClient(conn)
    q = mqtt.QoS.AT_LEAST_ONCE
    ans = v1_call(
        conn,
        lambda cb: ident.subscribe_to_create_keys_and_certificate_accepted(
            iotidentity.CreateKeysAndCertificateSubscriptionRequest(), q, cb),
        lambda cb: ident.subscribe_to_create_keys_and_certificate_rejected(
            iotidentity.CreateKeysAndCertificateSubscriptionRequest(), q, cb),
        lambda: ident.publish_create_keys_and_certificate(
            iotidentity.CreateKeysAndCertificateRequest(), q))
    keys = ans["accepted"]
    assert keys.private_key.startswith("-----BEGIN RSA PRIVATE KEY-----")
    ans = v1_call(
        conn,
        lambda cb: ident.subscribe_to_register_thing_accepted(
            iotidentity.RegisterThingSubscriptionRequest(template_name="GatewayTemplate"), q, cb),
        lambda cb: ident.subscribe_to_register_thing_rejected(
            iotidentity.RegisterThingSubscriptionRequest(template_name="GatewayTemplate"), q, cb),
        lambda: ident.publish_register_thing(iotidentity.RegisterThingRequest(
            template_name="GatewayTemplate",
            certificate_ownership_token=keys.certificate_ownership_token,
            parameters={"SerialNumber": "0002", "Site": "plant-1"}), q))
    assert ans["accepted"].thing_name == "gw-0002"
    conn.disconnect().result(TIMEOUT)
    key = tmp_path / "rsa.key"
    key.write_text(keys.private_key)
    publish_as_thing(sim, tmp_path, keys.certificate_pem, str(key), "gw-0002")


def rejected(fut):
    with pytest.raises(V2ServiceException) as e:
        fut.result(TIMEOUT)
    err = e.value.modeled_error
    assert err is not None, f"no modeled error in {e.value}"
    return err


def test_rejections_seen_through_the_sdk(sim, tmp_path):
    sim.add_template("GatewayTemplate", TEMPLATE)
    sim.add_template("Off", TEMPLATE, "--disabled")
    deny = tmp_path / "deny.sh"
    deny.write_text('#!/bin/sh\ncat > "$0.input"\necho \'{"allowProvisioning": false}\'\n')
    deny.chmod(0o755)
    sim.add_template("Hooked", TEMPLATE, "--hook", str(deny))
    sim.start("--token-ttl", "2")
    c = V5(sim, sim.claim_cert, sim.claim_key)
    ident = c.identity()

    def csr_cert():
        _, csr = make_csr(tmp_path, "ec256")
        return ident.create_certificate_from_csr(
            iotidentity.CreateCertificateFromCsrRequest(certificate_signing_request=csr)
        ).result(TIMEOUT)

    def register(token, template="GatewayTemplate", serial="0100"):
        return ident.register_thing(iotidentity.RegisterThingRequest(
            template_name=template, certificate_ownership_token=token,
            parameters={"SerialNumber": serial}))

    err = rejected(register(""))
    assert (err.status_code, err.error_code) == (400, "InvalidCertificateOwnershipToken")
    assert err.error_message == "Certificate ownership token cannot be empty."

    created = csr_cert()
    assert register(created.certificate_ownership_token).result(TIMEOUT).thing_name == "gw-0100"
    err = rejected(register(created.certificate_ownership_token, serial="0101"))
    assert err.error_code == "InvalidCertificateOwnershipToken", "a token is single-use"

    stale = csr_cert()
    time.sleep(2.5)
    err = rejected(register(stale.certificate_ownership_token, serial="0102"))
    assert err.error_code == "InvalidCertificateOwnershipToken"
    assert "expired" in err.error_message
    ids = [x["certificateId"] for x in sim.json("certs", "list")]
    assert stale.certificate_id not in ids, "an unregistered certificate vanishes with its token"

    for kind in ("rsa1024", "ec192"):
        _, weak = make_csr(tmp_path, kind)
        err = rejected(ident.create_certificate_from_csr(
            iotidentity.CreateCertificateFromCsrRequest(certificate_signing_request=weak)))
        assert err.error_code == "InvalidCsr", kind
        assert "unsupported key" in err.error_message, err.error_message
    err = rejected(ident.create_certificate_from_csr(
        iotidentity.CreateCertificateFromCsrRequest(certificate_signing_request="not a csr")))
    assert err.error_code == "InvalidCsr" and "not PEM" in err.error_message

    err = rejected(register(csr_cert().certificate_ownership_token, template="Off"))
    assert err.error_code == "InvalidRequestException" and "not enabled" in err.error_message

    hooked = csr_cert()
    err = rejected(register(hooked.certificate_ownership_token, template="Hooked", serial="0103"))
    assert err.status_code == 403 and err.error_code == "AccessDeniedException"
    hook_input = json.loads((tmp_path / "deny.sh.input").read_text())
    assert hook_input["certificateId"] == hooked.certificate_id
    assert hook_input["parameters"] == {"SerialNumber": "0103"}
    assert hook_input["templateArn"].endswith(":provisioningtemplate/Hooked")
    assert "gw-0103" not in [t["thingName"] for t in sim.json("things", "list")]

    err = rejected(register(csr_cert().certificate_ownership_token, template="Nope"))
    assert err.error_code == "ResourceNotFoundException"
    c.stop()


def test_claim_publishing_outside_provisioning_topics_is_disconnected(sim):
    sim.start()
    interrupted = []
    conn = connect_v311(sim, sim.claim_cert, sim.claim_key,
                        on_interrupted=lambda connection, error, **kw: interrupted.append(error))
    # The claim may subscribe to its provisioning topics but not elsewhere: SUBACK failure code.
    fut, _ = conn.subscribe("dt/elsewhere", mqtt.QoS.AT_LEAST_ONCE, callback=lambda **kw: None)
    with pytest.raises(mqtt.SubscribeError):  # awscrt raises it when SUBACK carries 0x80
        fut.result(TIMEOUT)
    ok, _ = conn.subscribe("$aws/certificates/create/json/accepted", mqtt.QoS.AT_LEAST_ONCE,
                           callback=lambda **kw: None)
    assert ok.result(TIMEOUT)["qos"] == mqtt.QoS.AT_LEAST_ONCE
    conn.publish("dt/elsewhere", b"x", mqtt.QoS.AT_LEAST_ONCE)
    assert wait(lambda: interrupted), "claim was not disconnected after a denied publish"
    assert wait(lambda: "iot:Publish denied on dt/elsewhere" in sim.serve_log()), "iot:Publish denied on dt/elsewhere"
    conn.disconnect()


def test_unknown_and_inactive_certificates_cannot_connect(sim, tmp_path):
    sim.start()
    claim_id = next(c["certificateId"] for c in sim.json("certs", "list") if c["origin"] == "claim")
    sim.cli("certs", "deactivate", "--id", claim_id)
    with pytest.raises(Exception):
        connect_v311(sim, sim.claim_cert, sim.claim_key)
    assert wait(lambda: f"certificate {claim_id} is Inactive" in sim.serve_log()), f"certificate {claim_id} is Inactive"
    # A certificate from a CA the emulator never heard of.
    key, _ = make_csr(tmp_path, "ec256")
    import subprocess
    subprocess.run(["openssl", "req", "-x509", "-key", key, "-subj", "/CN=stranger", "-days", "2",
                    "-out", str(tmp_path / "stranger.pem")], check=True)
    with pytest.raises(Exception):
        connect_v311(sim, str(tmp_path / "stranger.pem"), key)
    assert wait(lambda: "is not registered" in sim.serve_log()), "is not registered"


def tls_socket(sim):
    ctx = ssl.create_default_context(cafile=sim.root_ca)
    ctx.load_cert_chain(sim.claim_cert, sim.claim_key)
    raw = socket.create_connection(("127.0.0.1", sim.port), timeout=5)
    return ctx.wrap_socket(raw, server_hostname="localhost")


def mqtt_connect_bytes(client_id=b"raw"):
    body = b"\x00\x04MQTT\x04\x02\x00\x1e" + len(client_id).to_bytes(2, "big") + client_id
    return bytes([0x10, len(body)]) + body


def send(sock, data):
    """Send, tolerating the server closing first (it may refuse a packet from its header)."""
    try:
        sock.sendall(data)
    except (ConnectionError, ssl.SSLError):
        pass


def closes(sock):
    try:
        while True:
            if not sock.recv(4096):
                return True
    except (ConnectionError, ssl.SSLError, socket.timeout) as e:
        return not isinstance(e, socket.timeout)


def test_bad_input_never_takes_the_emulator_down(sim, tmp_path):
    sim.add_template("GatewayTemplate", TEMPLATE)
    sim.start()
    # Plain-TCP garbage where TLS is expected.
    s = socket.create_connection(("127.0.0.1", sim.port), timeout=5)
    send(s, os.urandom(512))
    assert closes(s)
    # A silent socket must not block other clients' handshakes.
    silent = socket.create_connection(("127.0.0.1", sim.port), timeout=5)
    # Malformed MQTT: bad protocol level, garbage after TLS, a huge remaining length.
    # A CONNECT type byte with a reserved flag set and a length never sent must be refused at its
    # first byte (random bytes made this case now and then).
    for payload in (b"\x10\x0c\x00\x04MQTT\x09\x02\x00\x1e\x00\x00",
                    b"\x11\x78" + bytes(20),
                    os.urandom(64),
                    mqtt_connect_bytes() + b"\x30\xff\xff\xff\x7f"):
        t = tls_socket(sim)
        send(t, payload)
        assert closes(t), payload[:16]
    # Oversized payload (over 128 KB) on a connected claim: disconnected.
    t = tls_socket(sim)
    t.sendall(mqtt_connect_bytes(b"big"))
    assert t.recv(4) == b"\x20\x02\x00\x00"
    topic = b"$aws/certificates/create/json"
    body = len(topic).to_bytes(2, "big") + topic + b"\x00\x01" + b"x" * (129 * 1024)
    rl, n = b"", len(body)
    while True:
        byte, n = n % 128, n // 128
        rl += bytes([byte | (0x80 if n else 0)])
        if not n:
            break
    send(t, b"\x32" + rl + body)
    assert closes(t)
    for line in ("TLS handshake failed", "unsupported protocol level 9", "exceeds the"):
        assert wait(lambda: line in sim.serve_log()), line
    # Invalid JSON and CBOR requests get a clear rejection on the same connection.
    c = V5(sim, sim.claim_cert, sim.claim_key)
    for fmt, bad in (("json", b"{not json"), ("cbor", b"\xff\xfe")):
        topic = f"$aws/certificates/create-from-csr/{fmt}"
        c.client.subscribe(mqtt5.SubscribePacket(subscriptions=[
            mqtt5.Subscription(topic_filter=topic + "/rejected", qos=mqtt5.QoS.AT_LEAST_ONCE)])
        ).result(TIMEOUT)
        c.client.publish(mqtt5.PublishPacket(topic=topic, payload=bad,
                                             qos=mqtt5.QoS.AT_LEAST_ONCE)).result(TIMEOUT)
        got = c.wait_for(lambda p: p.topic == topic + "/rejected")
        assert got is not None, f"no rejection for invalid {fmt}"
        if fmt == "json":
            err = json.loads(got.payload)
            assert err["errorCode"] == "InvalidPayload" and "Invalid JSON" in err["errorMessage"]
    # The emulator still serves a full provisioning run.
    ident = c.identity()
    _, csr = make_csr(tmp_path, "ec384")
    created = ident.create_certificate_from_csr(
        iotidentity.CreateCertificateFromCsrRequest(certificate_signing_request=csr)).result(TIMEOUT)
    assert ident.register_thing(iotidentity.RegisterThingRequest(
        template_name="GatewayTemplate", certificate_ownership_token=created.certificate_ownership_token,
        parameters={"SerialNumber": "0200"})).result(TIMEOUT).thing_name == "gw-0200"
    c.stop()
    silent.close()
    assert sim.alive()


def test_keys_flow_with_v2_and_csr_flow_with_v1(sim, tmp_path):
    """Both identity clients drive both create calls."""
    sim.add_template("GatewayTemplate", TEMPLATE)
    sim.start()
    c = V5(sim, sim.claim_cert, sim.claim_key)
    ident = c.identity()
    keys = ident.create_keys_and_certificate(
        iotidentity.CreateKeysAndCertificateRequest()).result(TIMEOUT)
    assert keys.private_key.startswith("-----BEGIN RSA PRIVATE KEY-----")
    reg = ident.register_thing(iotidentity.RegisterThingRequest(
        template_name="GatewayTemplate", certificate_ownership_token=keys.certificate_ownership_token,
        parameters={"SerialNumber": "0300"})).result(TIMEOUT)
    assert reg.thing_name == "gw-0300"
    c.stop()

    conn = connect_v311(sim, sim.claim_cert, sim.claim_key)
    v1 = iotidentity.IotIdentityClient(conn)
    q = mqtt.QoS.AT_LEAST_ONCE
    key, csr = make_csr(tmp_path, "rsa2048")
    ans = v1_call(
        conn,
        lambda cb: v1.subscribe_to_create_certificate_from_csr_accepted(
            iotidentity.CreateCertificateFromCsrSubscriptionRequest(), q, cb),
        lambda cb: v1.subscribe_to_create_certificate_from_csr_rejected(
            iotidentity.CreateCertificateFromCsrSubscriptionRequest(), q, cb),
        lambda: v1.publish_create_certificate_from_csr(
            iotidentity.CreateCertificateFromCsrRequest(certificate_signing_request=csr), q))
    created = ans["accepted"]
    ans = v1_call(
        conn,
        lambda cb: v1.subscribe_to_register_thing_accepted(
            iotidentity.RegisterThingSubscriptionRequest(template_name="GatewayTemplate"), q, cb),
        lambda cb: v1.subscribe_to_register_thing_rejected(
            iotidentity.RegisterThingSubscriptionRequest(template_name="GatewayTemplate"), q, cb),
        lambda: v1.publish_register_thing(iotidentity.RegisterThingRequest(
            template_name="GatewayTemplate",
            certificate_ownership_token=created.certificate_ownership_token,
            parameters={"SerialNumber": "0301"}), q))
    assert ans["accepted"].thing_name == "gw-0301"
    conn.disconnect().result(TIMEOUT)
    publish_as_thing(sim, tmp_path, created.certificate_pem, key, "gw-0301")
