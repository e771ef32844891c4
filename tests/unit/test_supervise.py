"""Supervision (restart with backoff, counted, rate-limited logs), fault injection, capability names."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from agent import capabilities, supervise
from agent.supervise import InjectedFault, Supervisor


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_a_failing_component_backs_off_doubling_and_resets_after_success(caplog):
    clock = Clock()
    sup = Supervisor(clock)
    calls = []

    def boom():
        calls.append(clock.now)
        raise ValueError("bad record")

    with caplog.at_level(logging.ERROR):
        assert sup.call("pods.reconcile", boom) is False
        assert sup.call("pods.reconcile", boom) is None  # backing off: not run
        clock.now = 0.5
        assert sup.call("pods.reconcile", boom) is False
        clock.now = 1.0
        assert sup.call("pods.reconcile", boom) is None  # the second backoff is 1 s
        clock.now = 1.5
        assert sup.call("pods.reconcile", boom) is False
    assert calls == [0.0, 0.5, 1.5]
    assert sup.counts() == {"pods.reconcile": 3}
    assert len([r for r in caplog.records if "pods.reconcile failed" in r.getMessage()]) == 1  # rate-limited
    clock.now = 10
    assert sup.call("pods.reconcile", lambda: None) is True
    sup.call("pods.reconcile", boom)
    clock.now = 10.6
    assert sup.call("pods.reconcile", lambda: None) is True  # after a success the backoff starts over at 0.5 s


def test_a_supervised_thread_is_restarted_and_counted():
    sup = Supervisor()
    stop = threading.Event()
    runs = []

    def body():
        runs.append(1)
        if len(runs) < 3:
            raise RuntimeError("exporter bug")
        stop.wait()

    t = sup.thread("otlp-spans", body, stop)
    deadline = time.monotonic() + 10
    while len(runs) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(runs) == 3 and t.is_alive()
    assert sup.counts() == {"otlp-spans": 2}
    stop.set()
    t.join(5)
    assert not t.is_alive()


def test_fault_injection_raises_as_many_times_as_asked(monkeypatch):
    monkeypatch.setattr(supervise, "_faults", supervise._parse_faults("forward.refresh*2,observe-feed"))
    for _ in range(2):
        with pytest.raises(InjectedFault, match="forward.refresh"):
            supervise.fault("forward.refresh")
    supervise.fault("forward.refresh")  # used up
    with pytest.raises(InjectedFault):
        supervise.fault("observe-feed")
    supervise.fault("tcp.refresh")  # never asked for


def test_capabilities_from_the_status_file(tmp_path):
    status = tmp_path / "status"
    # CAP_NET_ADMIN (12) and CAP_BPF (39) only
    status.write_text(f"Name:\tx\nCapEff:\t{(1 << 12 | 1 << 39):016x}\n")
    held = capabilities.effective(str(status))
    assert held == {"CAP_NET_ADMIN", "CAP_BPF"}
    assert capabilities.missing(["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"], held) == ["CAP_PERFMON"]
    assert capabilities.missing(["CAP_PERFMON"], held | {"CAP_SYS_ADMIN"}) == []  # the kernel's stand-in
    assert capabilities.describe_missing(["CAP_NET_ADMIN"]) == \
        "missing capability CAP_NET_ADMIN (needed to attach tc programs to interfaces)"


def test_the_chart_grants_every_capability_fovea_names():
    import yaml

    from tests.unit.test_chart import CHART

    granted = {f"CAP_{c}" for c in yaml.safe_load((CHART / "values.yaml").read_text())["capabilities"]}
    assert granted == set(capabilities.BITS)
