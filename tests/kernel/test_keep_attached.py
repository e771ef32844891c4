"""Restarts lose nothing (lifecycle.keepAttached): counters continue exactly across a stop and a
start, the traffic of the gap included; programs are replaced in place, never stacked; a map
whose layout changed starts fresh; `fovea cleanup` removes everything Fovea kept, and nothing else.

`fovea cleanup` acts on the whole host network namespace and /sys/fs/bpf/fovea: like every kernel
test, these run under the shared lock, when no other agent runs here."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from agent import pins
from agent.tc import PROGRAMS
from tests.conftest import FOVEA, TC_MODES, RunningAgent, require, tc_filters, tcx_program_names, unique_prefix
from tests.kernel.test_lifecycle import ForeignFilter, ping

pytestmark = pytest.mark.kernel

WEB = {"namespace": "shop", "pod": "web-0", "workload_kind": "StatefulSet", "workload_name": "web"}
ECHO_V4 = 20 + 8 + 56  # ping's default payload, IP bytes


def write_config(directory: Path, lab, mode: str, **extra) -> str:
    web = lab.pods[0]
    pods = [{"ip": ip, "namespace": WEB["namespace"], "pod": WEB["pod"], "workloadKind": WEB["workload_kind"],
             "workloadName": WEB["workload_name"], "observe": True} for ip in (web.ipv4, web.ipv6)]
    (directory / "pods.yaml").write_text(yaml.safe_dump({"pods": pods}))
    path = directory / f"fovea-{mode}-{len(list(directory.iterdir()))}.yaml"
    path.write_text(yaml.safe_dump({"staticPods": str(directory / "pods.yaml"), "plugins": ["forward", "pods"],
                                    "pods": {"interfaces": [lab.prefix + "p*"]}, "tc": {"mode": mode},
                                    "lifecycle": {"keepAttached": True}, **extra}))
    return str(path)


def counts(agent: RunningAgent) -> dict[str, float]:
    """The pod's and the node's counters, once settled."""
    out = {}
    for d in ("egress", "ingress"):
        out[f"pod {d} packets"] = agent.settled("fovea_pod_packets_total", **WEB, direction=d)
        out[f"pod {d} bytes"] = agent.settled("fovea_pod_bytes_total", **WEB, direction=d)
        out[f"forward {d} packets"] = agent.settled("fovea_forward_packets_total", direction=d)
    return out


def moved(after: dict, before: dict) -> dict:
    return {k: after[k] - before[k] for k in after}


def expected(n: int, pod: bool = True, forward: bool = True) -> dict:
    """A ping of n from the pod to the world: n requests out of the pod and the node, n replies in."""
    p, f = (n if pod else 0), (n if forward else 0)
    return {"pod egress packets": p, "pod egress bytes": p * ECHO_V4, "forward egress packets": f,
            "pod ingress packets": p, "pod ingress bytes": p * ECHO_V4, "forward ingress packets": f}


def fovea_programs(ifname: str) -> dict[str, list[str]]:
    """Fovea's programs on each hook of an interface, either way attached: (tcx program name or
    clsact filter name, with its program id)."""
    out = {}
    for hook in ("ingress", "egress"):
        found = [f"tcx {name}" for name in tcx_program_names(ifname, hook) if name in PROGRAMS]
        found += [f"clsact {m.group(1)} id {m.group(2)}"
                  for m in re.finditer(r"(fovea-\S+?)(?::\[\d+\])? .*?id (\d+)", tc_filters(ifname, hook))]
        out[hook] = found
    return out


def program_ids(ifname: str) -> set[int]:
    from socket import if_nametoindex

    from agent.tc import tcx_program_ids

    ids = {int(m) for hook in ("ingress", "egress") for m in re.findall(r" id (\d+)", tc_filters(ifname, hook))}
    for hook in ("ingress", "egress"):
        ids |= set(tcx_program_ids(if_nametoindex(ifname), hook))
    return ids


def assert_one_per_hook(lab) -> None:
    for ifname in (lab.uplink, lab.pods[0].host_if):
        progs = fovea_programs(ifname)
        assert all(len(p) == 1 for p in progs.values()), f"{ifname}: {progs}"  # nothing stacked


@pytest.fixture
def node(lab):
    """A node name of its own; what its agents kept goes afterwards, whatever happens: its pins
    (a tcx link goes with its pin) and its clsact filters, with the qdisc they made on the lab."""
    from pyroute2 import IPRoute

    from agent.tc import HOOKS, _bpf_filters

    name = "keep-" + unique_prefix()
    yield name
    pins.remove_tree(pins.NodePins(name).dir)
    with IPRoute() as ipr:
        for ifname in (lab.uplink, *(p.host_if for p in lab.pods)):
            for idx in ipr.link_lookup(ifname=ifname):
                for parent in HOOKS.values():
                    for prio, handle, fname in _bpf_filters(ipr, idx, parent):
                        if fname.startswith(f"fovea-{name}-"):
                            ipr.tc("del-filter", "bpf", idx, handle, parent=parent, prio=prio)
                subprocess.run(["tc", "qdisc", "del", "dev", ifname, "clsact"], capture_output=True)


@pytest.mark.parametrize("mode", TC_MODES)
def test_a_restart_loses_no_count_and_stacks_nothing(lab, tmp_path, node, mode):
    cfg = write_config(tmp_path, lab, mode)
    first = RunningAgent("--uplink", lab.uplink, "--config", cfg, "--node-name", node)
    try:
        ping(lab, 4)  # the pod's series exist
        before = counts(first)
    finally:
        assert first.stop() == 0, first.output()
    assert "leaving the tc programs attached" in first.output() and "could not save" not in first.output()
    assert_one_per_hook(lab)  # still attached while no agent runs
    assert pins.NodePins(node).pinned_maps("pods") >= {"flows", "flow_events", "flow_lost"}
    n, m = 17, 9
    ping(lab, n)  # nobody reads: the programs count on into the pinned maps
    second = RunningAgent("--uplink", lab.uplink, "--keep-attached", "--config", cfg, "--node-name", node)
    try:
        assert "took over its maps from the previous agent" in second.output()
        assert_one_per_hook(lab)
        ping(lab, m)
        assert moved(counts(second), before) == expected(n + m)
    finally:
        assert second.stop() == 0, second.output()


def test_a_changed_program_is_replaced_and_counting_stays_exact(lab, tmp_path, node):
    """The second agent's programs differ (DNS compiled in, another NAT window: other -D flags),
    its maps' layout does not: the programs are swapped, the maps kept."""
    first = RunningAgent("--uplink", lab.uplink, "--config", write_config(tmp_path, lab, "auto"), "--node-name", node)
    try:
        ping(lab, 3)
        before = counts(first)
    finally:
        assert first.stop() == 0, first.output()
    old = program_ids(lab.uplink) | program_ids(lab.pods[0].host_if)
    n, m = 11, 6
    ping(lab, n)
    changed = write_config(tmp_path, lab, "auto", plugins=["forward", "pods", "dns"], flows={"idleTimeout": 20.0})
    second = RunningAgent("--uplink", lab.uplink, "--config", changed, "--node-name", node)
    try:
        new = program_ids(lab.uplink) | program_ids(lab.pods[0].host_if)
        assert len(new) == 4 and not new & old  # every program replaced ...
        assert_one_per_hook(lab)  # ... in place
        assert "changed its layout" not in second.output()
        ping(lab, m)
        assert moved(counts(second), before) == expected(n + m)
    finally:
        assert second.stop() == 0, second.output()


def test_a_map_whose_layout_changed_starts_fresh_and_says_so(lab, tmp_path, node):
    """flows.mapSize changes the flow tables' size: they start fresh (the gap's pod traffic was in
    the old table), the pod series go on from the saved state, the forward array is adopted."""
    first = RunningAgent("--uplink", lab.uplink, "--config", write_config(tmp_path, lab, "auto", flows={"mapSize": 4096}),
                         "--node-name", node)
    try:
        ping(lab, 3)
        before = counts(first)
    finally:
        assert first.stop() == 0, first.output()
    n, m = 8, 5
    ping(lab, n)
    second = RunningAgent("--uplink", lab.uplink, "--config", write_config(tmp_path, lab, "auto", flows={"mapSize": 8192}),
                          "--node-name", node)
    try:
        lines = [ln for ln in second.output().splitlines() if "changed its layout" in ln]
        assert len(lines) == 2 and all("map flows" in ln and "max_entries 4096 -> 8192" in ln for ln in lines), lines
        ping(lab, m)
        pod, forward = expected(m, forward=False), expected(n + m, pod=False)
        assert moved(counts(second), before) == {k: pod[k] + forward[k] for k in pod}, second.output()
    finally:
        assert second.stop() == 0, second.output()


def bpftool_links() -> list[dict]:
    require(subprocess.run(["which", "bpftool"], capture_output=True).returncode == 0, "bpftool is not installed")
    out = subprocess.run(["bpftool", "-j", "link", "show"], capture_output=True, text=True, check=True).stdout
    return json.loads(out or "[]")


def prog_name(prog_id: int) -> str:
    out = subprocess.run(["bpftool", "-j", "prog", "show", "id", str(prog_id)], capture_output=True, text=True)
    return json.loads(out.stdout).get("name", "") if out.returncode == 0 else ""


@pytest.mark.parametrize("mode", TC_MODES)
def test_cleanup_removes_what_was_kept_and_nothing_else(lab, tmp_path, node, mode):
    foreign = ForeignFilter(lab.uplink, "tcx" if mode == "tcx" else "clsact")  # a CNI's program
    try:
        cache = tmp_path / "cache"
        config = write_config(tmp_path, lab, mode, kernel={"cacheDir": str(cache)})
        agent = RunningAgent("--uplink", lab.uplink, "--config", config, "--node-name", node)
        assert agent.stop() == 0, agent.output()
        assert_one_per_hook(lab)
        compiled = sorted((cache / "programs").iterdir())
        assert len(compiled) == 2  # pods.c and forward.c
        cleanup = [FOVEA, "cleanup", "--cache-dir", str(cache)]
        r = subprocess.run(cleanup, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        kind = "tcx link" if mode == "tcx" else "clsact filter"
        interfaces = [lab.uplink, *(p.host_if for p in lab.pods)]
        assert sum(kind in ln for ln in r.stdout.splitlines()) == 2 * len(interfaces), r.stdout  # x 2 hooks
        assert f"pin {pins.ROOT}/{node}/state" in r.stdout
        assert all(f"cache {c}" in r.stdout for c in compiled) and not any((cache / "programs").iterdir())
        for ifname in interfaces:
            assert fovea_programs(ifname) == {"ingress": [], "egress": []}
        assert not [ln for ln in bpftool_links() if prog_name(ln.get("prog_id", 0)) in PROGRAMS]
        assert not Path(pins.ROOT).exists() or not any(Path(pins.ROOT).iterdir())
        assert foreign.attached()  # theirs stays, and still sees every packet
        f0 = foreign.packets()
        ping(lab, 5)
        assert foreign.packets() - f0 == 5
        again = subprocess.run(cleanup, capture_output=True, text=True, timeout=60)
        assert again.returncode == 0 and "nothing of Fovea's" in again.stdout
    finally:
        foreign.remove()
