"""Every provisioning-template shape AWS publishes (developer guide fleet, JITP and bulk examples,
CloudFormation, Terraform, the Device SDK sample, Greengrass) provisions a device through the
emulator, driven by AWS's Device SDK v2 for Python; the device then connects with what it got.
The fixtures and where each is documented: tests/peers/templates/README.md."""
import json
import pathlib
import uuid

import pytest
from awscrt import mqtt
from awsiot import V2ServiceException, iotidentity

from sdk import TIMEOUT, V5, connect_v311, make_csr
from test_iotcore_sim_paths import device_cert, maker_ca
from test_iotcore_sim_sdk import wait

TEMPLATES = pathlib.Path(__file__).resolve().parent / "templates"

CONNECT_ONLY = {"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Action": "iot:Connect", "Resource": "*"}]}


def fixture(name):
    return (TEMPLATES / name).read_text()


def write(path, text):
    path.write_text(text)
    return str(path)


def add_policy(sim, tmp_path, name, document):
    sim.cli("policies", "add", "--name", name, "--document",
            write(tmp_path / f"{name}.json", json.dumps(document)))


def provision(sim, tmp_path, template, parameters, keys=False, claim=None):
    """A device's fleet provisioning by claim through IotIdentityClientV2: a certificate (from a
    CSR, or CreateKeysAndCertificate with `keys`), then RegisterThing. Returns the certificate id,
    certificate and key paths, and the RegisterThing response."""
    cert, key = claim or (sim.claim_cert, sim.claim_key)
    c = V5(sim, cert, key)
    try:
        ident = c.identity()
        if keys:
            created = ident.create_keys_and_certificate(
                iotidentity.CreateKeysAndCertificateRequest()).result(TIMEOUT)
            key_path = write(tmp_path / f"{created.certificate_id[:12]}.key", created.private_key)
        else:
            key_path, csr = make_csr(tmp_path, "ec256")
            created = ident.create_certificate_from_csr(iotidentity.CreateCertificateFromCsrRequest(
                certificate_signing_request=csr)).result(TIMEOUT)
        response = ident.register_thing(iotidentity.RegisterThingRequest(
            template_name=template, certificate_ownership_token=created.certificate_ownership_token,
            parameters=parameters)).result(TIMEOUT)
    finally:
        c.stop()
    cert_path = write(tmp_path / f"{created.certificate_id[:12]}.pem", created.certificate_pem)
    return created.certificate_id, cert_path, key_path, response


def registered(sim, cert_id):
    certs = {c["certificateId"]: c for c in sim.json("certs", "list")}
    return certs[cert_id]


def things(sim):
    return {t["thingName"]: t for t in sim.json("things", "list")}


def publishes(sim, cert, key, topic, client_id=None):
    """The device connects with its new certificate and publishes at QoS 1 (PUBACK awaited)."""
    dev = connect_v311(sim, cert, key, client_id=client_id)
    dev.publish(topic, b"{}", mqtt.QoS.AT_LEAST_ONCE)[0].result(TIMEOUT)
    dev.disconnect().result(TIMEOUT)


def allow_connect(sim, tmp_path, cert_id):
    """The documented examples' policies allow iot:Publish on foo/bar and nothing else, so a device
    could not even connect; the operator attaches a connect-only policy beside it."""
    if "ConnectOnly" not in sim.cli("policies", "list"):
        add_policy(sim, tmp_path, "ConnectOnly", CONNECT_ONLY)
    sim.cli("certs", "activate", "--id", cert_id, "--policy", "ConnectOnly")


def test_cloudformation_template_body_provisions(sim, tmp_path):
    """Issue 9: the TemplateBody of an AWS::IoT::ProvisioningTemplate refers to
    AWS::IoT::Certificate::Id without declaring it; AWS fills it in all the same."""
    stack = json.loads(fixture("cloudformation-provisioning-template.json"))
    props = stack["Resources"]["FleetProvisioningTemplate"]["Properties"]
    assert "AWS::IoT::Certificate::Id" not in json.loads(props["TemplateBody"])["Parameters"]
    sim.add_template(props["TemplateName"], props["TemplateBody"])
    sim.start()
    cert_id, cert, key, reg = provision(sim, tmp_path, props["TemplateName"],
                                        {"SerialNumber": "cf-1"})
    assert reg.thing_name == "device-cf-1"
    assert registered(sim, cert_id)["status"] == "ACTIVE"
    assert things(sim)["device-cf-1"]["principals"] == [cert_id]
    publishes(sim, cert, key, "device/cf-1/telemetry")


def test_developer_guide_fleet_example(sim, tmp_path):
    for kind, name in (("thing-types", "ThingPrefix_123"), ("thing-groups", "v1-lightbulbs"),
                       ("thing-groups", "WA"), ("billing-groups", "LightBulbBillingGroup")):
        sim.cli(kind, "add", "--name", name)
    sim.add_template("FleetTemplate", fixture("devguide-fleet.json"))
    sim.start()
    cert_id, cert, key, reg = provision(sim, tmp_path, "FleetTemplate",
                                        {"SerialNumber": "123", "DeviceLocation": "Seattle"},
                                        keys=True)
    assert reg.thing_name == "ThingPrefix_123"
    assert reg.device_configuration == {"FallbackUrl": "https://www.example.com/test-site",
                                        "LocationUrl": "https://example.aws"}
    thing = things(sim)["ThingPrefix_123"]
    assert thing["thingTypeName"] == "ThingPrefix_123"
    assert thing["thingGroups"] == ["v1-lightbulbs", "WA"]
    assert thing["billingGroup"] == "LightBulbBillingGroup"
    assert thing["attributes"] == {"version": "v1", "serialNumber": "serialNumber"}
    assert registered(sim, cert_id)["status"] == "ACTIVE"
    allow_connect(sim, tmp_path, cert_id)
    publishes(sim, cert, key, "foo/bar")


def test_terraform_example_without_a_thing(sim, tmp_path):
    # The example's DevicePolicy allows iot:Subscribe; iot:Connect is added so the device can
    # show the certificate works.
    add_policy(sim, tmp_path, "DevicePolicy", {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["iot:Subscribe", "iot:Connect"], "Resource": ["*"]}]})
    sim.add_template("FleetTemplate", fixture("terraform-fleet.json"))
    sim.start()
    cert_id, cert, key, reg = provision(sim, tmp_path, "FleetTemplate", {"SerialNumber": "tf-1"})
    assert not reg.thing_name
    c = registered(sim, cert_id)
    assert (c["status"], c["policyNames"], c["thingNames"]) == ("ACTIVE", ["DevicePolicy"], [])
    dev = connect_v311(sim, cert, key)
    suback, _ = dev.subscribe("any/topic", mqtt.QoS.AT_LEAST_ONCE)
    assert suback.result(TIMEOUT)["qos"] == mqtt.QoS.AT_LEAST_ONCE
    dev.disconnect().result(TIMEOUT)


def test_device_sdk_sample_template_with_a_trusted_user_claim(sim, tmp_path):
    sim.add_template("SampleTemplate", fixture("sdk-fleet-provisioning.json"))
    kv = dict(l.split("=", 1) for l in
              sim.cli("claim", "create", "--template", "SampleTemplate").splitlines())
    sim.start()
    cert_id, cert, key, reg = provision(
        sim, tmp_path, "SampleTemplate", {"SerialNumber": "1", "DeviceLocation": "Seattle"},
        keys=True, claim=(kv["claim_cert"], kv["claim_key"]))
    assert reg.thing_name == "ThingPrefix_1"
    assert reg.device_configuration["LocationUrl"] == "https://example.aws"
    assert registered(sim, cert_id)["status"] == "ACTIVE"
    publishes(sim, cert, key, "sample/topic", client_id=f"mqtt5-sample-{uuid.uuid4().hex[:8]}")


GREENGRASS_THING_POLICY = {"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow",
     "Action": ["iot:Publish", "iot:Subscribe", "iot:Receive", "iot:Connect", "greengrass:*"],
     "Resource": ["*"]},
    {"Effect": "Allow", "Action": "iot:AssumeRoleWithCertificate",
     "Resource": "arn:aws:iot:us-east-1:123456789012:rolealias/GreengrassCoreTokenExchangeRoleAlias"}]}

GREENGRASS_CLAIM_POLICY = {"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Action": "iot:Connect", "Resource": "*"},
    {"Effect": "Allow", "Action": ["iot:Publish", "iot:Receive"], "Resource": [
        "arn:aws:iot:us-east-1:123456789012:topic/$aws/certificates/create/*",
        "arn:aws:iot:us-east-1:123456789012:topic/$aws/provisioning-templates/"
        "GreengrassFleetProvisioningTemplate/provision/*"]},
    {"Effect": "Allow", "Action": "iot:Subscribe", "Resource": [
        "arn:aws:iot:us-east-1:123456789012:topicfilter/$aws/certificates/create/*",
        "arn:aws:iot:us-east-1:123456789012:topicfilter/$aws/provisioning-templates/"
        "GreengrassFleetProvisioningTemplate/provision/*"]}]}


def test_greengrass_fleet_provisioning_template(sim, tmp_path):
    add_policy(sim, tmp_path, "GreengrassV2IoTThingPolicy", GREENGRASS_THING_POLICY)
    add_policy(sim, tmp_path, "GreengrassProvisioningClaimPolicy", GREENGRASS_CLAIM_POLICY)
    sim.cli("thing-groups", "add", "--name", "GreengrassCoreGroup")
    sim.add_template("GreengrassFleetProvisioningTemplate",
                     fixture("greengrass-fleet-provisioning.json"))
    # The guide's claim: create-keys-and-certificate --set-as-active, then its claim policy.
    kv = dict(l.split("=", 1) for l in sim.cli(
        "certs", "create", "--out", str(tmp_path / "claim"),
        "--policy", "GreengrassProvisioningClaimPolicy").splitlines())
    sim.start()
    cert_id, cert, key, reg = provision(
        sim, tmp_path, "GreengrassFleetProvisioningTemplate",
        {"ThingName": "GreengrassCore-1", "ThingGroupName": "GreengrassCoreGroup"},
        keys=True, claim=(kv["cert"], kv["key"]))
    assert reg.thing_name == "GreengrassCore-1"
    thing = things(sim)["GreengrassCore-1"]
    assert (thing["thingGroups"], thing["attributes"]) == (["GreengrassCoreGroup"], {})
    assert registered(sim, cert_id)["policyNames"] == ["GreengrassV2IoTThingPolicy"]
    publishes(sim, cert, key, "greengrass/core/1", client_id="GreengrassCore-1")


def jitp_setup(sim, tmp_path, body):
    sim.cli("thing-types", "add", "--name", "lightBulb-versionA")
    for group in ("v1-lightbulbs", "US"):
        sim.cli("thing-groups", "add", "--name", group)
    sim.add_template("JitpTemplate", body)
    sim.cli("ca", "register", "--ca", maker_ca(tmp_path), "--template", "JitpTemplate")
    sim.start()


def jitp_connect(sim, tmp_path, name, subject):
    """A device certificate signed by the registered CA: its first connection is dropped while
    JITP provisions it. Returns its certificate and key paths."""
    cert, key = device_cert(tmp_path, name, subject)
    with pytest.raises(Exception):
        connect_v311(sim, cert, key, client_id=name)
    return cert, key


def cert_of(sim, thing):
    return next(c for c in sim.json("certs", "list") if thing in c["thingNames"])


def test_developer_guide_jitp_example(sim, tmp_path):
    config = json.loads(fixture("devguide-jitp-registration-config.json"))
    jitp_setup(sim, tmp_path, config["templateBody"])
    cert, key = jitp_connect(sim, tmp_path, "bulb-7", "/C=US/O=Acme/CN=bulb-7/serialNumber=SN7")
    thing = things(sim)["bulb-7"]
    assert thing["attributes"] == {"version": "v1", "serialNumber": "SN7"}
    assert (thing["thingTypeName"], thing["thingGroups"]) == ("lightBulb-versionA",
                                                              ["v1-lightbulbs", "US"])
    c = cert_of(sim, "bulb-7")
    assert c["status"] == "ACTIVE" and len(c["policyNames"]) == 1
    allow_connect(sim, tmp_path, c["certificateId"])
    publishes(sim, cert, key, "foo/bar", client_id="bulb-7")


SUBJECT_FIELDS = ["CommonName", "Country", "Organization", "OrganizationalUnit",
                  "DistinguishedNameQualifier", "StateName", "SerialNumber", "Id"]


def test_jitp_fills_undeclared_subject_pseudo_parameters(sim, tmp_path):
    """AWS fills JITP's pseudo-parameters whether or not the template declares them."""
    body = json.loads(json.loads(fixture("devguide-jitp-registration-config.json"))["templateBody"])
    del body["Parameters"]
    body["Resources"]["thing"]["Properties"]["AttributePayload"] = {
        f.lower(): {"Ref": f"AWS::IoT::Certificate::{f}"} for f in SUBJECT_FIELDS}
    jitp_setup(sim, tmp_path, json.dumps(body))
    jitp_connect(sim, tmp_path, "bulb-8",
                 "/C=US/ST=WA/O=Acme/OU=Lighting/CN=bulb-8/serialNumber=SN8/dnQualifier=dq8")
    attributes = things(sim)["bulb-8"]["attributes"]
    c = cert_of(sim, "bulb-8")
    assert attributes == {"commonname": "bulb-8", "country": "US", "organization": "Acme",
                          "organizationalunit": "Lighting", "distinguishednamequalifier": "dq8",
                          "statename": "WA", "serialnumber": "SN8", "id": c["certificateId"]}
    # As with a declared one, a subject without the field fails, and nothing is created.
    jitp_connect(sim, tmp_path, "bulb-9", "/C=US/ST=WA/O=Acme/CN=bulb-9/serialNumber=SN9")
    assert wait(lambda: "Cannot resolve reference value: {Ref=AWS::IoT::Certificate::"
                        "DistinguishedNameQualifier}" in sim.serve_log())
    assert "bulb-9" not in things(sim)


def test_developer_guide_bulk_example(sim, tmp_path):
    sim.cli("thing-types", "add", "--name", "lightBulb-versionA")
    for group in ("v1-lightbulbs", "WA"):
        sim.cli("thing-groups", "add", "--name", group)
    keys = {}
    lines = []
    for name, serial in (("foo", "123"), ("bar", "456")):
        key, csr = make_csr(tmp_path, "ec256")
        keys[name] = write(tmp_path / f"{name}.key", pathlib.Path(key).read_text())
        lines.append(json.dumps({"ThingName": name, "SerialNumber": serial, "CSR": csr}))
    out = json.loads(sim.cli(
        "bulk-register", "--template", write(tmp_path / "bulk.json", fixture("devguide-bulk.json")),
        "--input", write(tmp_path / "input.ndjson", "\n".join(lines) + "\n"),
        "--out", str(tmp_path / "report")))
    assert (out["successCount"], out["failureCount"]) == (2, 0)
    results = [json.loads(l) for l in open(out["results"])]
    sim.start()
    for (name, serial), result in zip((("foo", "123"), ("bar", "456")), results):
        thing = things(sim)[name]
        assert thing["thingGroups"] == ["v1-lightbulbs", "WA"]
        assert thing["attributes"] == {"version": "v1", "serialNumber": serial}
        cert_id = result["response"]["resourceArns"]["certificate"].rsplit("/", 1)[1]
        assert registered(sim, cert_id)["status"] == "ACTIVE"
        allow_connect(sim, tmp_path, cert_id)
        cert = write(tmp_path / f"{name}.pem", result["response"]["certificatePem"])
        publishes(sim, cert, keys[name], "foo/bar", client_id=name)


def test_pseudo_parameters_a_flow_does_not_fill_are_clear_errors(sim, tmp_path):
    # Fleet provisioning fills in the certificate id only: a subject field is JITP's.
    sim.add_template("ByName", {"Resources": {"thing": {"Type": "AWS::IoT::Thing", "Properties": {
        "ThingName": {"Ref": "AWS::IoT::Certificate::CommonName"}}}}})
    sim.start()
    with pytest.raises(V2ServiceException) as e:
        provision(sim, tmp_path, "ByName", {})
    err = e.value.modeled_error
    assert (err.status_code, err.error_code) == (400, "InvalidRequestException")
    assert err.error_message.startswith(
        "Invalid registration template. Cannot resolve reference value: "
        "{Ref=AWS::IoT::Certificate::CommonName}"), err.error_message
    assert "just-in-time provisioning" in err.error_message, err.error_message
    # The control-plane RegisterThing API fills in none.
    r = sim.cli("register-thing", "--template", write(tmp_path / "cp.json", json.dumps(
        {"Resources": {"certificate": {"Type": "AWS::IoT::Certificate", "Properties": {
            "CertificateId": {"Ref": "AWS::IoT::Certificate::Id"}}}}})), check=False)
    assert r.returncode == 1
    assert "Cannot resolve reference value: {Ref=AWS::IoT::Certificate::Id}" in r.stderr, r.stderr
    assert "RegisterThing API" in r.stderr, r.stderr
