"""Coexistence with other tc filters, clean exits, restarts, bad input."""

from __future__ import annotations

import os
import re
import subprocess
import time

import pytest
import requests
from pyroute2 import IPRoute

from tests.conftest import FOVEA, TC_MODES, RunningAgent, free_port, tc_filters, tc_mode_config, tcx_program_names

pytestmark = pytest.mark.kernel


def ping(lab, n: int, pod: int = 0) -> None:
    out = lab.run(lab.pods[pod].netns, "ping", "-4", "-c", str(n), "-i", "0.002", "-q", lab.world.ipv4).stdout
    assert f"{n} received" in out


# A stand-in for a CNI's program: counts what it sees and lets it through.
FOREIGN_PROGRAM = rb"""
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
BPF_ARRAY(seen, u64, 1);
int cni_standin(struct __sk_buff *skb) {
    int zero = 0;
    u64 *n = seen.lookup(&zero);
    if (n) __sync_fetch_and_add(n, 1);
    return TC_ACT_OK;
}
"""


class ForeignFilter:
    """Loaded and attached by the test itself: a clsact filter at a later priority than Fovea's,
    or a tcx program at the end of the chain (where a CNI adds itself)."""

    def __init__(self, ifname: str, kind: str):
        from bcc import BPF

        from agent.kernel.headers import find_headers
        from agent.tc import tcx_link

        os.environ.update(find_headers().env)
        self.bpf = BPF(text=FOREIGN_PROGRAM)
        fn = self.bpf.load_func(b"cni_standin", BPF.SCHED_CLS)
        self.ifname, self.kind, self.link = ifname, kind, None
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=ifname)[0]
            if kind == "tcx":
                self.link = tcx_link(fn.fd, idx, "egress", first=False)
                return
            if "clsact" not in tc_qdiscs(ifname):  # Fovea's, when it came first
                ipr.tc("add", "clsact", idx)
            ipr.tc("add-filter", "bpf", idx, 1, fd=fn.fd, name="cni-standin", parent=0xFFFFFFF3,
                   prio=200, classid=1, direct_action=True)

    def packets(self) -> int:
        return self.bpf[b"seen"][0].value

    def attached(self) -> bool:
        if self.kind == "tcx":
            return "cni_standin" in tcx_program_names(self.ifname, "egress")
        return "cni-standin" in tc_filters(self.ifname, "egress")

    def remove(self) -> None:
        if self.link is not None:
            os.close(self.link)
        else:
            subprocess.run(["tc", "qdisc", "del", "dev", self.ifname, "clsact"], check=False)
        self.bpf.cleanup()


def tc_qdiscs(ifname: str) -> str:
    return subprocess.run(["tc", "qdisc", "show", "dev", ifname], capture_output=True, text=True).stdout


def fovea_filter_count(ifname: str) -> int:
    """Fovea's forward programs on the interface, attached either way (clsact filters, tcx links)."""
    clsact = sum(len(re.findall(r"fovea-\S+-forward_", tc_filters(ifname, hook))) for hook in ("ingress", "egress"))
    tcx = sum(name.startswith("forward_") for hook in ("ingress", "egress") for name in tcx_program_names(ifname, hook))
    return clsact + tcx


def mode_agent(tmp_path, mode: str, *args: str) -> RunningAgent:
    agent = RunningAgent(*args, "--config", tc_mode_config(tmp_path, mode))
    assert agent.scrape().get("fovea_agent_attach_mode", mode=mode) == 1
    return agent


# A tcx CNI with Fovea on clsact is not a pairing: tcx runs first, and a program that
# passes the packet (TCX_PASS) skips the clsact filters. On tcx kernels Fovea uses tcx.
@pytest.mark.parametrize("mode,kind", [("tcx", "clsact"), ("tcx", "tcx"), ("clsact", "clsact")])
@pytest.mark.parametrize("order", ["before", "after"])
def test_foreign_program_keeps_counting_exactly(lab, tmp_path, mode, kind, order):
    """A CNI stand-in attached before or after Fovea sees every packet, and so does Fovea."""
    up = lab.uplink
    foreign = ForeignFilter(up, kind) if order == "before" else None
    try:
        agent = mode_agent(tmp_path, mode, "--uplink", up)
        try:
            foreign = foreign or ForeignFilter(up, kind)
            f0 = foreign.packets()
            e0 = agent.settled("fovea_forward_packets_total", direction="egress")
            ping(lab, 15)
            assert agent.settled("fovea_forward_packets_total", direction="egress") - e0 == 15
            assert foreign.packets() - f0 == 15  # ours returned TC_ACT_UNSPEC (TCX_NEXT): theirs still ran
            if mode == "tcx":
                assert tcx_program_names(up, "egress")[0] == "forward_egress"  # first in the chain: sees all
        finally:
            assert agent.stop() == 0, agent.output()
        assert fovea_filter_count(up) == 0
        assert foreign.attached()  # theirs stays (and their qdisc)
        f1 = foreign.packets()
        ping(lab, 5)
        assert foreign.packets() - f1 == 5
    finally:
        if foreign is not None:
            foreign.remove()


@pytest.mark.parametrize("mode", TC_MODES)
def test_clean_exit_removes_what_it_created(lab, tmp_path, mode):
    up = lab.uplink
    agent = mode_agent(tmp_path, mode, "--uplink", up)
    assert fovea_filter_count(up) == 2
    assert agent.stop() == 0
    assert fovea_filter_count(up) == 0
    assert "clsact" not in tc_qdiscs(up)


@pytest.mark.parametrize("first_mode,second_mode", [("clsact", "clsact"), ("tcx", "tcx"), ("clsact", "tcx")])
def test_restart_after_kill_replaces_stale_filters(lab, tmp_path, first_mode, second_mode):
    """kill -9 leaves clsact filters behind, which the successor replaces; a tcx link dies with
    the agent's file descriptor. Either way the successor's count is exact: never stacked."""
    up = lab.uplink
    node = ["--node-name", "restart-test"]  # a restart: the same node
    first = mode_agent(tmp_path, first_mode, "--uplink", up, *node)
    first.stop("KILL")
    assert fovea_filter_count(up) == (2 if first_mode == "clsact" else 0)  # killed: left behind, or not
    second = mode_agent(tmp_path, second_mode, "--uplink", up, *node)
    try:
        assert fovea_filter_count(up) == 2  # replaced, not stacked
        e0 = second.settled("fovea_forward_packets_total", direction="egress")
        ping(lab, 10)
        assert second.settled("fovea_forward_packets_total", direction="egress") - e0 == 10
    finally:
        assert second.stop() == 0
    assert fovea_filter_count(up) == 0
    subprocess.run(["tc", "qdisc", "del", "dev", up, "clsact"], check=False)


def test_vanishing_interface_is_survived(lab):
    extra = lab.prefix + "x"
    with IPRoute() as ipr:
        ipr.link("add", ifname=extra, kind="veth", peer={"ifname": extra + "y"})
    try:
        agent = RunningAgent("--uplink", lab.uplink, "--uplink", extra)
        try:
            with IPRoute() as ipr:
                ipr.link("del", index=ipr.link_lookup(ifname=extra)[0])
            e0 = agent.settled("fovea_forward_packets_total", direction="egress")
            ping(lab, 7)
            assert agent.settled("fovea_forward_packets_total", direction="egress") - e0 == 7
            assert requests.get(agent.url + "/healthz", timeout=5).status_code == 200
            deadline = time.monotonic() + 10  # noticed by the next read loop pass
            while f"uplink {extra} vanished" not in agent.output() and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            assert agent.stop() == 0, agent.output()
        assert f"uplink {extra} vanished" in agent.output()
        assert fovea_filter_count(lab.uplink) == 0
    finally:
        with IPRoute() as ipr:
            for idx in ipr.link_lookup(ifname=extra):
                ipr.link("del", index=idx)


def one_line_error(args: list[str], **kw) -> str:
    r = subprocess.run([FOVEA, "agent", "--standalone", *args], capture_output=True, text=True, timeout=120, **kw)
    assert r.returncode == 1, r.stdout + r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("fovea: error:")]
    assert len(errors) == 1, r.stderr
    return errors[0]


def test_unknown_uplink_is_one_clear_line(root):
    line = one_line_error(["--uplink", "nosuchif0", "--port", str(free_port())])
    assert "uplink 'nosuchif0' does not exist" in line and "--uplink" in line


def test_port_in_use_is_one_clear_line_and_attaches_nothing(lab):
    import socket

    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = one_line_error(["--uplink", lab.uplink, "--port", str(port)])
    assert f"port {port} is already in use" in line
    assert fovea_filter_count(lab.uplink) == 0


def test_not_root_is_one_clear_line(root):
    line = one_line_error(
        ["--port", str(free_port())],
        preexec_fn=lambda: (os.setgid(65534), os.setuid(65534)),
        env={**os.environ, "HOME": "/tmp"},
    )
    assert "must run as root" in line
