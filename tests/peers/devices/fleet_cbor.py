"""A device using the CBOR flavour of AWS's fleet-provisioning topic API through gatewayd's local
endpoint, with paho-mqtt and cbor2 (the AWS SDK speaks JSON only): CreateCertificateFromCsr and
RegisterThing on `.../cbor` topics, answers decoded from CBOR. Prints one JSON line.

  fleet_cbor.py PORT LOCAL_CA CERT KEY CLIENT_ID TEMPLATE SERIAL WORKDIR
"""
import json
import os
import queue
import ssl
import sys

import cbor2
import paho.mqtt.client as paho

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import sdk  # noqa: E402

port, ca, cert, key, cid, template, serial, work = sys.argv[1:9]
answers = queue.Queue()
c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=cid, protocol=paho.MQTTv311)
c.tls_set(ca_certs=ca, certfile=cert, keyfile=key, cert_reqs=ssl.CERT_REQUIRED)
c.on_message = lambda cl, u, m: answers.put((m.topic, cbor2.loads(m.payload)))
c.connect("localhost", int(port), keepalive=30)
c.loop_start()


def call(topic, body):
    c.subscribe(topic + "/+", qos=1)
    c.publish(topic, cbor2.dumps(body), qos=1).wait_for_publish(10)
    return answers.get(timeout=20)


new_key, csr = sdk.make_csr(work)
t, created = call("$aws/certificates/create-from-csr/cbor", {"certificateSigningRequest": csr})
assert t.endswith("/accepted"), (t, created)
t, reg = call(f"$aws/provisioning-templates/{template}/provision/cbor",
              {"certificateOwnershipToken": created["certificateOwnershipToken"],
               "parameters": {"SerialNumber": serial}})
assert t.endswith("/accepted"), (t, reg)
# A malformed CBOR request: rejected with AWS's shape, in CBOR.
c.subscribe("$aws/certificates/create/cbor/+", qos=1)
c.publish("$aws/certificates/create/cbor", b"\xff\x00", qos=1).wait_for_publish(10)
t, bad = answers.get(timeout=20)
c.loop_stop()
c.disconnect()
print(json.dumps({"certificate_id": created["certificateId"], "thing_name": reg["thingName"],
                  "bad_topic": t, "bad": bad}))
