"""What a stopping agent saves for the next one (lifecycle.keepAttached), on fakes: the next
agent's counters continue exactly from the same kernel table, open flows go on, nothing twice."""

from __future__ import annotations

import json
import subprocess

from agent import pins
from agent.attribution import Attribution
from agent.config import FlowsConfig
from agent.flows import ACK, FlowTracker
from agent.series import SeriesStore
from tests.conftest import FOVEA
from tests.unit.test_flow_tracker import DB, WEB, Clock, FakeTable, Names, S, fid


def across_restart(state: dict) -> dict:
    """What the next agent reads back: the state goes through JSON (agent/pins.py)."""
    return json.loads(json.dumps(state))


def new_tracker(table, clock, out):
    return FlowTracker(table, FlowsConfig(idleTimeout=5.0, reportInterval=20.0), out.append, Names((WEB, DB)),
                       clock=clock)


def test_counts_continue_exactly_from_the_same_table_and_open_flows_go_on():
    table, clock, first_out = FakeTable(), Clock(), []
    first = new_tracker(table, clock, first_out)
    c, s = fid(WEB, 40000, DB, 5432), fid(DB, 5432, WEB, 40000)
    table.add(c, 10, 1000, clock.now, ACK)
    table.add(s, 4, 400, clock.now, ACK, cpu=1)
    assert sum(p for p, _ in first.read().values()) == 14
    table.add(c, 3, 300, clock.now)  # after the last read: the next agent counts it
    saved = across_restart(first.save())
    first.close()
    assert first_out == []  # the open flow was not ended: it goes on in the next agent

    clock.now += S
    table.add(c, 5, 500, clock.now)  # while no agent runs: the programs keep counting
    second_out = []
    second = new_tracker(table, clock, second_out)
    second.restore(saved)
    gained = second.read()
    assert sum(p for p, _ in gained.values()) == 3 + 5 and sum(b for _, b in gained.values()) == 800
    clock.now += 30 * S  # idle: the flow ends, one record for the whole connection's rest
    second.read()
    [record] = second_out
    assert (record.packets, record.reply_packets) == (10 + 3 + 5, 4)  # nothing was reported before the stop
    assert record.final and record.end_reason == "idle"


def test_a_flow_reported_before_the_stop_is_not_reported_twice():
    table, clock, out = FakeTable(), Clock(), []
    first = new_tracker(table, clock, out)
    c = fid(WEB, 40001, DB, 80)
    table.add(c, 7, 700, clock.now, ACK)
    first.read()
    clock.now += 21 * S  # a report interval: the first agent reports a window
    table.add(c, 1, 100, clock.now)
    first.read()
    assert [r.packets for r in out] == [8]
    saved = across_restart(first.save())
    table.add(c, 2, 200, clock.now)
    second = new_tracker(table, clock, out)
    second.restore(saved)
    second.read()
    clock.now += 30 * S
    second.read()
    assert [r.packets for r in out] == [8, 2] and out[1].flow_id == out[0].flow_id and out[1].window == 1


def test_ring_buffer_records_held_in_memory_are_carried_over():
    table, clock, out = FakeTable(), Clock(), []
    first = new_tracker(table, clock, out)
    from agent.flows import FlowEvent

    e = FlowEvent()
    e.id = fid(WEB, 40002, DB, 53, proto=17)
    e.stats.packets, e.stats.bytes, e.stats.first_ns, e.stats.last_ns = 2, 120, clock.now, clock.now
    table.ring.append(e)
    assert sum(p for p, _ in first.read().values()) == 2
    second = new_tracker(table, clock, out)
    second.restore(across_restart(first.save()))
    assert second.read() == {}  # held, already counted: never twice


def test_series_and_waiting_traffic_continue():
    series = SeriesStore(("namespace", "pod", "direction"), max_series=10, ttl=60)
    series.add(("shop", "web", "egress"), 5, 500)
    restored = SeriesStore(("namespace", "pod", "direction"), max_series=10, ttl=60)
    restored.restore(across_restart(series.save()))
    restored.add(("shop", "web", "egress"), 1, 100)
    assert restored.values == {("shop", "web", "egress"): [6, 600]}

    attribution = Attribution(None, "node", pending_window=30.0)
    waiting = attribution.pending("pod_packets")
    waiting.add({(7, 1): (3, 300), ("10.0.0.1", "10.0.0.2", "tcp", True): (1, 60)})
    again = Attribution(None, "node", pending_window=30.0).pending("pod_packets")
    again.restore(across_restart(waiting.save()))
    seen = {}
    again.drain(lambda key, p, b: seen.setdefault(key, (p, b)) is not None)
    assert seen == {(7, 1): (3, 300), ("10.0.0.1", "10.0.0.2", "tcp", True): (1, 60)}


def test_node_names_become_safe_directory_names():
    assert pins.node_dir_name("node-1.example.com") == "node-1.example.com"
    assert pins.node_dir_name('a"b/c\\d') == "a_b_c_d"
    assert pins.NodePins("x", root="/r").link_path(4, "egress").as_posix() == "/r/x/links/4-egress"


def test_bpffs_is_read_from_the_mount_table(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text("sysfs /sys sysfs rw 0 0\nbpf /sys/fs/bpf bpf rw,mode=700 0 0\n")
    assert pins.bpffs_mounted("/sys/fs/bpf", str(mounts))
    mounts.write_text("sysfs /sys sysfs rw 0 0\n")
    assert not pins.bpffs_mounted("/sys/fs/bpf", str(mounts))


def test_remove_tree_lists_what_it_removed(tmp_path):
    (tmp_path / "n" / "pods").mkdir(parents=True)
    (tmp_path / "n" / "pods" / "flows").write_text("")
    (tmp_path / "n" / "state").write_text("")
    removed = pins.remove_tree(tmp_path / "n")
    assert sorted(removed) == sorted([str(tmp_path / "n" / "pods" / "flows"), str(tmp_path / "n" / "state")])
    assert not (tmp_path / "n").exists() and pins.remove_tree(tmp_path / "n") == []


def test_cleanup_help_says_what_it_removes():
    out = subprocess.run([FOVEA, "cleanup", "--help"], capture_output=True, text=True, check=True).stdout
    for what in ("clsact filters", "tcx links", "/sys/fs/bpf/fovea", "exits 0", "uninstalled"):
        assert what in out.replace("\n", " ").replace("  ", " "), what
