"""A rig for the children suites (tests/slow/children-crash, tests/bench/children): a real
iotcore-sim with the README's gateway and child templates as written, and a real gatewayd
configured for it, driven over its status socket. Standard library only."""
import json, os, pathlib, re, signal, socket, subprocess, sys, tempfile, time

ROOT = pathlib.Path(__file__).resolve().parents[2]


def readme_block(marker):
    text = (ROOT / "README.md").read_text()
    block = text[text.index(marker):]
    body = block[block.index("```json") + 7:]
    return body[:body.index("```")]


def wait_for(what, timeout, f, every=0.05):
    end = time.monotonic() + timeout
    while True:
        v = f()
        if v:
            return v
        if time.monotonic() > end:
            raise SystemExit(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


class Sim:
    def __init__(self, bins, dir):
        self.bin, self.dir = bins / "iotcore-sim", dir
        self.proc, self.port = None, 0
        out = subprocess.run([self.bin, "init", "--dir", dir], check=True, capture_output=True,
                             text=True).stdout
        self.paths = dict(l.split("=", 1) for l in out.splitlines() if "=" in l)
        for name, marker in (("ReadmeTemplate", "<!-- gateway-template"),
                             ("ChildTemplate", "<!-- child-template")):
            body = dir / f"{name}.json"
            body.write_text(readme_block(marker))
            subprocess.run([self.bin, "template", "add", "--dir", dir, "--name", name,
                            "--body", body], check=True, capture_output=True)

    def serve(self, *extra):
        log = open(self.dir / "sim.log", "a")
        self.proc = subprocess.Popen([self.bin, "serve", "--dir", self.dir, "--listen",
                                      f"127.0.0.1:{self.port}", *extra],
                                     stdout=subprocess.PIPE, stderr=log, text=True)
        line = self.proc.stdout.readline()
        self.port = int(line.strip().rsplit(":", 1)[1])

    def stop(self):
        if self.proc:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def admin(self, *args):
        return subprocess.run([self.bin, *args, "--dir", self.dir], check=True,
                              capture_output=True, text=True).stdout

    def things(self):
        return json.loads(self.admin("things", "list"))

    def certs(self):
        return json.loads(self.admin("certs", "list"))

    def counters(self):
        return json.loads(self.admin("counters"))

    def fault(self, *args):
        self.admin("fault", *args)


class Gateway:
    def __init__(self, bins, dir, sim, children="", uplink=""):
        self.bin, self.ctl, self.dir = bins / "gatewayd", bins / "gatewayctl", dir
        self.sock, self.proc = dir / "status.sock", None
        dir.mkdir(parents=True, exist_ok=True)
        (dir / "gatewayd.toml").write_text(f"""
[cloud]
endpoint = "localhost"
port = {sim.port}
root_ca = "{sim.paths['root_ca']}"
[provisioning]
template = "ReadmeTemplate"
claim_cert = "{sim.paths['claim_cert']}"
claim_key = "{sim.paths['claim_key']}"
call_timeout_secs = 5
[provisioning.serial]
value = "0001"
[daemon]
state_dir = "{dir}/state"
status_socket = "{self.sock}"
log_level = "info,rustls=warn,rumqttc=warn"
log_target = "stderr"
shutdown_grace_secs = 5
[local]
tls_listen = ["127.0.0.1:0"]
[uplink]
backoff_initial_ms = 200
backoff_max_secs = 1
connect_floor_ms = 200
{uplink}
[children]
template = "ChildTemplate"
admission = "auto"
retry_initial_ms = 200
retry_max_secs = 2
{children}
""")

    def start(self):
        log = open(self.dir / "gatewayd.log", "a")
        env = {k: v for k, v in os.environ.items()
               if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "JOURNAL_STREAM")}
        self.proc = subprocess.Popen([self.bin, "run", "--config", self.dir / "gatewayd.toml"],
                                     stdout=subprocess.DEVNULL, stderr=log, env=env)
        wait_for("the status socket", 20, lambda: self.status() is not None)

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=15)

    def request(self, req):
        try:
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(10)
            s.connect(str(self.sock))
            s.sendall((json.dumps(req) + "\n").encode())
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
            s.close()
            return json.loads(buf)
        except (OSError, ValueError):
            return None

    def status(self):
        r = self.request({"cmd": "status"})
        return r and r.get("status")

    def active(self):
        s = self.status()
        u = s and s.get("uplink") or {}
        return bool(s and s["identity"]["stage"] == "active" and u.get("state") == "connected"
                    and u.get("role") == "thing") and s

    def children(self):
        s = self.status()
        return s and s.get("children")

    def offer(self, id, serial, found_by="manual"):
        r = self.request({"cmd": "children-offer", "id": id, "serial": serial,
                          "vendor": "Acme", "model": "PM-5", "found_by": found_by})
        if not (r and r["ok"]):
            raise SystemExit(f"offer {id}: {r}")

    def queue(self):
        r = self.request({"cmd": "children-queue"})
        return r["data"]

    def rss_kib(self):
        for line in open(f"/proc/{self.proc.pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
