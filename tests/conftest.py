"""Shared fixtures: root checks, the node lab, a running agent."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent
FOVEA = str(Path(sys.executable).parent / "fovea")
IN_CI = os.environ.get("CI", "").lower() == "true"


def require(condition: bool, reason: str) -> None:
    """Skip locally, fail loudly in CI: a missing capability is never a CI skip."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"CI needs this: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def root():
    require(os.geteuid() == 0, "needs root (loads eBPF, builds network namespaces)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unique_prefix() -> str:
    return "fv%05x" % random.randrange(16**5)


def free_octet() -> int:
    """A second octet whose 10.<o>.0.0/16 no route on this host uses yet (labs of
    other test runs on the same host stay apart)."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        used = {route.get_attr("RTA_DST") for route in ipr.get_routes(family=socket.AF_INET)}
    used_octets = {int(dst.split(".")[1]) for dst in used if dst and dst.startswith("10.")}
    free = [o for o in range(100, 200) if o not in used_octets]
    return random.choice(free)


class Metrics:
    """Samples of one scrape: {(name, frozenset(labels)): value}."""

    def __init__(self, text: str):
        self.text = text
        self.samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                self.samples[(s.name, frozenset(s.labels.items()))] = s.value

    def get(self, name: str, **labels) -> float:
        return self.samples.get((name, frozenset(labels.items())), 0.0)


class RunningAgent:
    def __init__(self, *args: str, port: int | None = None, env: dict | None = None, wrapper: tuple[str, ...] = (),
                 ca: str | None = None, token: str | None = None, command: tuple[str, ...] = (FOVEA, "agent")):
        """wrapper: a command the agent runs under (e.g. setpriv); ca: it serves HTTPS with a
        certificate this CA file verifies; token: a bearer token for /metrics; command: how
        the agent is started (e.g. `podman run ... IMAGE agent`)."""
        self.port = port or free_port()
        self.verify = ca or True
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        mode = [] if "--kubeconfig" in args else ["--standalone"]
        # A node name of its own keeps its tc filters apart from any other agent on this host.
        node = [] if "--node-name" in args else ["--node-name", f"test-{self.port}"]
        # A flow stream of its own, too (the defaults are one per host).
        self.observe_port = free_port()
        self.observe_socket = str(Path(os.environ.get("TMPDIR", "/tmp"), f"fovea-observe-{self.port}.sock"))
        stream = [] if "--observe-port" in args else [
            "--observe-port", str(self.observe_port), "--observe-socket", self.observe_socket]
        self.args = [*wrapper, *command, *mode, *node, "--port", str(self.port), "--interval", "1", *stream, *args]
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp"), f"fovea-agent-{self.port}.log"), "w+")
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        self.url = f"{'https' if ca else 'http'}://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited with {self.proc.returncode}:\n{self.output()}")
            try:
                r = requests.get(self.url + "/readyz", timeout=2, verify=self.verify)
                if r.status_code == 200 or (r.status_code == 503 and not r.text.startswith("starting")):
                    break  # started: ready, or saying which plugin is down
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"agent not ready after 60s:\n{self.output()}")
            time.sleep(0.1)

    def output(self) -> str:
        if self.log.closed:
            return self._final_output
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def scrape(self, fresh: bool = True) -> Metrics:
        """The metrics; fresh: from a snapshot the read loop built after this call began (/metrics
        renders the last read, up to one interval old), so what was sent before is in it."""
        since = time.time()
        deadline = time.monotonic() + 30
        while True:
            r = requests.get(self.url + "/metrics", timeout=10, verify=self.verify, headers=self.headers)
            r.raise_for_status()
            m = Metrics(r.text)
            if not fresh or m.get("fovea_agent_last_read_timestamp_seconds") > since or time.monotonic() > deadline:
                return m
            time.sleep(0.1)

    def ready(self) -> requests.Response:
        return requests.get(self.url + "/readyz", timeout=5, verify=self.verify)

    def settled(self, name: str, **labels) -> float:
        """The value once two fresh snapshots agree (packets in flight have landed)."""
        last = self.scrape().get(name, **labels)
        for _ in range(30):
            now = self.scrape().get(name, **labels)
            if now == last:
                return now
            last = now
        return last

    def wait_cached(self, kind: str, n: int = 1, timeout: float = 30) -> None:
        """Until the agent's Kubernetes cache holds n objects of this kind (pods, services, ...)."""
        deadline = time.monotonic() + timeout
        while self.scrape().get("fovea_agent_cache_objects", kind=kind) < n:
            assert time.monotonic() < deadline, f"fewer than {n} {kind} in the agent's cache:\n{self.output()}"
            time.sleep(0.2)

    def stop(self, sig: str = "TERM") -> int:
        if self.proc.poll() is None:
            if sig == "KILL":
                self.proc.kill()
            else:
                self.proc.terminate()
            self.proc.wait(timeout=30)
        if not self.log.closed:
            self._final_output = self.output()
            self.log.close()
            os.unlink(self.log.name)
        return self.proc.returncode


class LabHTTPConnection(http.client.HTTPConnection):
    """http.client over a socket made in a lab namespace (Nagle off: each request goes out at once)."""

    def __init__(self, lab, ep, host: str, port: int, timeout: float = 5):
        super().__init__(host, port, timeout=timeout)
        self.lab, self.ep = lab, ep

    def connect(self):
        self.sock = self.lab.socket(self.ep.netns, socket.AF_INET, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self.sock.connect((self.host, self.port))
        except OSError:
            self.close()
            raise


@contextlib.contextmanager
def node_lab(pods: int = 2, ipv6: bool = True):
    """A NodeLab with a unique prefix and subnet, removed afterwards whatever happens."""
    from agent.lab.netlab import NodeLab

    lab = NodeLab(unique_prefix(), pods=pods, ipv6=ipv6, octet=free_octet())
    try:
        yield lab.up()
    finally:
        lab.down()


@pytest.fixture(scope="module")
def lab(root):
    with node_lab(pods=2) as lab:
        yield lab


@pytest.fixture(scope="module")
def agent(lab):
    a = RunningAgent("--uplink", lab.uplink)
    yield a
    assert a.stop() == 0, a.output()


TC_MODES = ("tcx", "clsact")  # how the agent attaches its tc programs (tc.mode); tests force each


def tc_mode_config(directory: Path, mode: str, **config) -> str:
    """A config file forcing tc.mode (plus any other keys); returns its path."""
    import yaml

    path = Path(directory, f"fovea-{mode}.yaml")
    path.write_text(yaml.safe_dump({**config, "tc": {"mode": mode}}))
    return str(path)


def tcx_program_names(ifname: str, hook: str) -> list[str]:
    """Names of the programs in an interface's tcx chain, in the order they run (bpftool names them)."""
    from agent.tc import tcx_program_ids

    require(shutil.which("bpftool") is not None, "bpftool is not installed (scripts/bootstrap installs it)")
    names = []
    for prog_id in tcx_program_ids(socket.if_nametoindex(ifname), hook):
        out = subprocess.run(["bpftool", "-j", "prog", "show", "id", str(prog_id)], capture_output=True, text=True)
        names.append(json.loads(out.stdout).get("name", "") if out.returncode == 0 else "")
    return names


def tc_programs(ifname: str, hook: str) -> str:
    """What is attached to a hook, either way: tc's listing of clsact filters and the tcx programs' names."""
    return tc_filters(ifname, hook) + "\n" + "\n".join(tcx_program_names(ifname, hook))


def tc_filters(ifname: str, hook: str) -> str:
    return subprocess.run(
        ["tc", "filter", "show", "dev", ifname, hook], capture_output=True, text=True
    ).stdout


def self_signed_cert(directory: Path, name: str = "localhost") -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (the certificate is its own CA)."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "1", "-subj", f"/CN={name}", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def promtool() -> str | None:
    return shutil.which("promtool")
