"""Fixtures for peer tests: a real `iotcore-sim serve` process in a temp dir, on a free port."""
import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def sim_bin():
    b = os.environ.get("IOTCORE_SIM_BIN") or str(ROOT / "target" / "debug" / "iotcore-sim")
    if not os.path.exists(b):
        pytest.fail(f"{b} is missing: build it with `cargo build -p iotcore-sim`")
    return b


# Command groups whose verb comes before --dir (`iotcore-sim certs list --dir D`).
NESTED = {"template", "things", "certs", "policies", "thing-types", "thing-groups",
          "billing-groups", "ca", "claim", "fault"}


class Sim:
    """One emulator directory and (optionally) a running server."""

    def __init__(self, tmp):
        self.dir = pathlib.Path(tmp) / "sim"
        out = self.cli("init")
        paths = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
        self.root_ca, self.claim_cert, self.claim_key = (
            paths["root_ca"], paths["claim_cert"], paths["claim_key"])
        self.proc = None
        self.port = None
        self.log = None

    def cli(self, *args, check=True):
        words = 2 if args[0] in NESTED else 1
        r = subprocess.run([sim_bin(), *args[:words], "--dir", str(self.dir), *args[words:]],
                           capture_output=True, text=True, timeout=60)
        if check and r.returncode != 0:
            raise AssertionError(f"iotcore-sim {args} failed: {r.stderr}")
        return r.stdout if check else r

    def json(self, *args):
        return json.loads(self.cli(*args))

    def add_template(self, name, body, *extra):
        f = self.dir / f"{name}.json"
        f.write_text(body if isinstance(body, str) else json.dumps(body))
        return self.cli("template", "add", "--name", name, "--body", str(f), *extra)

    def start(self, *extra, port=0):
        self.log = open(self.dir / "serve.log", "ab")
        self.proc = subprocess.Popen(
            [sim_bin(), "serve", "--dir", str(self.dir), "--listen", f"127.0.0.1:{port}", *extra],
            stdout=subprocess.PIPE, stderr=self.log)
        line = self.proc.stdout.readline().decode()
        assert line.startswith("listening on "), f"unexpected first line {line!r}"
        self.port = int(line.rsplit(":", 1)[1])
        return self

    def stop(self):
        if self.proc:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None
        if self.log:
            self.log.close()

    def serve_log(self):
        return (self.dir / "serve.log").read_text(errors="replace")

    def alive(self):
        return self.proc is not None and self.proc.poll() is None


@pytest.fixture
def sim(tmp_path):
    s = Sim(tmp_path)
    yield s
    s.stop()
    if os.environ.get("SIM_SHOW_LOG"):
        sys.stderr.write(s.serve_log())
