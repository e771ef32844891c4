"""Health tells the truth (DESIGN.md): plugin_up, /readyz and the log name what is
missing; components that fail are restarted and counted while the agent keeps
counting exactly; a slow namespace scan never holds up a scrape."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time

import pytest
import yaml

from tests.conftest import REPO, RunningAgent, require
from tests.otlp_receiver import GrpcReceiver

pytestmark = pytest.mark.kernel

WEB = {"namespace": "shop", "pod": "web-0", "workload_kind": "Deployment", "workload_name": "web"}
PLUGINS = ("forward", "drops", "pods", "tcp", "dns", "http")
ECHO_V4 = 20 + 8 + 56  # ping's default payload


def config(lab, d, **sections) -> str:
    web = lab.pods[0]
    pods = [{"ip": ip, "namespace": WEB["namespace"], "pod": WEB["pod"], "workloadKind": WEB["workload_kind"],
             "workloadName": WEB["workload_name"], "observe": True} for ip in (web.ipv4, web.ipv6)]
    (d / "pods.yaml").write_text(yaml.safe_dump({"pods": pods}))
    cfg = {"staticPods": str(d / "pods.yaml"), "pods": {"interfaces": [lab.prefix + "p*"]}}
    cfg.update(sections)
    (d / "fovea.yaml").write_text(yaml.safe_dump(cfg))
    return str(d / "fovea.yaml")


def counts(agent) -> dict[str, float]:
    m = agent.scrape()
    return {"forward": m.get("fovea_forward_packets_total", direction="egress"),
            "pods": m.get("fovea_pod_packets_total", **WEB, direction="egress")}


def settled_counts(agent) -> dict[str, float]:
    last = counts(agent)
    for _ in range(30):
        now = counts(agent)
        if now == last:
            return now
        last = now
    return last


def ping_world(lab, n: int) -> None:
    out = lab.run(lab.pods[0].netns, "ping", "-4", "-c", str(n), "-i", "0.002", "-q", lab.world.ipv4).stdout
    assert f"{n} received" in out, out


def assert_counts_exactly(lab, agent, up: set[str], n: int = 20) -> None:
    """N pings from the pod to the world: exactly N more in every counting plugin that is up."""
    before = settled_counts(agent)
    ping_world(lab, n)
    after = settled_counts(agent)
    for plugin in ("forward", "pods"):
        if plugin in up:
            assert after[plugin] - before[plugin] == n, (plugin, before, after)


# What each capability the chart grants is for, removed alone (the agent runs as root, so the
# kernel's stand-ins apply: CAP_SYS_ADMIN passes bpf_capable() and perfmon_capable()).
CAPABILITIES = {
    "net_admin": {"forward", "pods", "dns", "http"},  # tc attach; DNS and HTTP count inside their programs
    "sys_admin": {"pods", "tcp", "http"},  # entering pod network namespaces; HTTP counts inside pods
    "bpf": set(),  # CAP_SYS_ADMIN stands in
    "perfmon": set(),  # CAP_SYS_ADMIN stands in
    "sys_ptrace": set(),  # the lab's namespaces are named under /run/netns, not found through /proc
    "sys_resource": set(),  # BPF memory is charged to the cgroup since 5.11: no memlock limit to raise
    "net_raw": set(),  # captures only, which a standalone agent does not run
    "bpf,sys_admin": set(PLUGINS),  # nothing can load a program
}


def test_the_capabilities_tested_are_the_ones_the_chart_grants():
    granted = {c.lower() for c in yaml.safe_load((REPO / "deploy/helm/fovea/values.yaml").read_text())["capabilities"]}
    assert granted == {c for key in CAPABILITIES for c in key.split(",")}


@pytest.mark.parametrize("caps", list(CAPABILITIES))
def test_a_missing_capability_takes_down_exactly_the_plugins_that_need_it(lab, tmp_path, caps):
    require(shutil.which("setpriv") is not None, "setpriv (util-linux) is needed to drop capabilities")
    drop = ",".join(f"-{c}" for c in caps.split(","))
    down = CAPABILITIES[caps]
    names = [f"CAP_{c.upper()}" for c in caps.split(",")]
    agent = RunningAgent("--uplink", lab.uplink, "--config", config(lab, tmp_path),
                         wrapper=("setpriv", f"--bounding-set={drop}", f"--inh-caps={drop}", "--"))
    try:
        time.sleep(2.5)  # a few reads: a plugin that fails after starting shows by now
        m = agent.scrape()
        assert {p for p in PLUGINS if m.get("fovea_agent_plugin_up", plugin=p) == 0} == down
        ready = agent.ready()
        assert ready.status_code == (503 if down else 200), ready.text
        for plugin in down:
            assert f"plugin {plugin} is down" in ready.text
        assert_counts_exactly(lab, agent, set(PLUGINS) - down)
    finally:
        assert agent.stop() == 0
    errors = [ln for ln in agent.output().splitlines() if " ERROR " in ln]
    for plugin in down:
        [line] = [ln for ln in errors if f"plugin {plugin} is down:" in ln]
        # dns counts inside the pods and forward programs: down with them, or for the capability itself
        assert any(name in line for name in names) or (
            plugin == "dns" and "no tc program counts DNS: the pods and forward plugins are down" in line), line
    if not down:
        assert not errors, errors


FAULTS = {"pods.reconcile": 3, "pods.refresh": 2, "forward.refresh": 2, "observe-feed": 2, "otlp-spans": 2}


def test_forced_exceptions_are_counted_and_survived_and_counting_stays_exact(lab, tmp_path):
    receiver = GrpcReceiver()
    cfg = config(lab, tmp_path, flows={"idleTimeout": 1.0},
                 otlp={"enabled": True, "protocol": "grpc", "endpoint": receiver.endpoint})
    agent = RunningAgent("--uplink", lab.uplink, "--config", cfg,
                         env={"FOVEA_TEST_FAULTS": ",".join(f"{k}*{v}" for k, v in FAULTS.items())})
    try:
        deadline = time.monotonic() + 30  # the backoffs after the injected faults add up to a few seconds
        while agent.ready().status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert agent.ready().status_code == 200, agent.ready().text
        follower = socket.socket(socket.AF_UNIX)
        follower.connect(agent.observe_socket)
        follower.sendall(json.dumps({"follow": True, "filter": {"protocol": "icmp"}}).encode() + b"\n")
        streamed = []

        def read():
            for line in follower.makefile("rb"):
                streamed.append(line)

        threading.Thread(target=read, daemon=True).start()

        assert_counts_exactly(lab, agent, {"forward", "pods"}, n=25)
        m = agent.scrape()
        for component, n in FAULTS.items():
            assert m.get("fovea_agent_restarts_total", component=component) == n, component
        assert all(m.get("fovea_agent_plugin_up", plugin=p) == 1 for p in PLUGINS)
        # The restarted exporter threads still carry records: the pings' flow as a span and on the stream.
        spans = receiver.wait(lambda s: s.attributes.get("destination.address") == lab.world.ipv4, timeout=20)
        assert spans
        deadline = time.monotonic() + 20
        while not streamed and time.monotonic() < deadline:
            time.sleep(0.2)
        first = json.loads(streamed[0])
        assert {first["source"]["address"], first["destination"]["address"]} == {lab.pods[0].ipv4, lab.world.ipv4}
        follower.close()
    finally:
        assert agent.stop() == 0, agent.output()
        receiver.stop()
    logged = agent.output()
    for component in FAULTS:
        assert f"{component} failed (restarting in" in logged


def test_a_scrape_never_waits_for_a_slow_namespace_scan(lab, tmp_path):
    """Every scan sleeps 3 s first (test hook), three intervals: scrapes still return
    within one interval, show a snapshot at most about one interval old, and count exactly."""
    agent = RunningAgent("--uplink", lab.uplink, "--config", config(lab, tmp_path),
                         env={"FOVEA_TEST_SCAN_DELAY": "3"})
    try:
        for _ in range(10):
            started = time.monotonic()
            m = agent.scrape(fresh=False)
            took = time.monotonic() - started
            age = time.time() - m.get("fovea_agent_last_read_timestamp_seconds")
            assert took < 1.0, f"a scrape took {took:.2f}s while a scan was slow"
            assert age < 1.0 + 0.5, f"the snapshot was {age:.2f}s old"  # interval 1 s + the read itself
            time.sleep(0.37)
        assert_counts_exactly(lab, agent, {"forward", "pods"}, n=30)
    finally:
        assert agent.stop() == 0, agent.output()
