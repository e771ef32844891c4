"""SeriesStore: monotonic series, TTL, overflow."""

from __future__ import annotations

from agent.series import OVERFLOW, SeriesStore


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def store(max_series=10, ttl=60.0, clock=None) -> SeriesStore:
    return SeriesStore(("namespace", "pod", "direction"), max_series, ttl,
                       keep_on_overflow=("direction",), clock=clock or Clock())


def test_increments_add_up_per_label_set():
    s = store()
    s.add(("a", "p1", "egress"), 3, 300)
    s.add(("a", "p1", "egress"), 2, 200)
    s.add(("a", "p1", "ingress"), 1, 10)
    assert s.values == {("a", "p1", "egress"): [5, 500], ("a", "p1", "ingress"): [1, 10]}


def test_series_of_a_gone_owner_disappear_after_the_ttl():
    clock = Clock()
    s = store(ttl=60, clock=clock)
    s.add(("a", "p1", "egress"), 1, 1)
    s.add(("a", "p2", "egress"), 1, 1)
    clock.now = 59
    s.touch(lambda labels: labels[1] == "p2")  # p1 deleted at 0
    assert len(s) == 2
    clock.now = 61
    s.touch(lambda labels: labels[1] == "p2")
    assert list(s.values) == [("a", "p2", "egress")]


def test_recreated_owner_within_ttl_adds_to_the_same_series():
    clock = Clock()
    s = store(ttl=60, clock=clock)
    s.add(("a", "web-0", "egress"), 10, 100)
    clock.now = 30
    s.touch(lambda labels: False)  # the pod is gone...
    s.add(("a", "web-0", "egress"), 1, 10)  # ...and back with the same labels
    clock.now = 80
    s.touch(lambda labels: True)
    assert s.values == {("a", "web-0", "egress"): [11, 110]}  # one series, never backwards


def test_past_the_cap_new_label_sets_go_to_overflow_and_totals_stay_right():
    s = store(max_series=2)
    s.add(("a", "p1", "egress"), 1, 1)
    s.add(("a", "p2", "egress"), 1, 1)
    s.add(("a", "p3", "egress"), 4, 40)
    s.add(("b", "p4", "ingress"), 5, 50)
    s.add(("a", "p1", "egress"), 1, 1)  # an existing series still counts as itself
    assert s.values == {
        ("a", "p1", "egress"): [2, 2],
        ("a", "p2", "egress"): [1, 1],
        (OVERFLOW, OVERFLOW, "egress"): [4, 40],
        (OVERFLOW, OVERFLOW, "ingress"): [5, 50],
    }
    assert s.overflowed == 2
    assert sum(v[0] for v in s.values.values()) == 1 + 1 + 4 + 5 + 1


def test_overflow_series_never_expire():
    clock = Clock()
    s = store(max_series=1, ttl=1, clock=clock)
    s.add(("a", "p1", "egress"), 1, 1)
    s.add(("a", "p2", "egress"), 1, 1)
    clock.now = 100
    s.touch(lambda labels: False)
    assert list(s.values) == [(OVERFLOW, OVERFLOW, "egress")]


def test_families_export_packets_and_bytes_in_label_order():
    s = store()
    s.add(("b", "p2", "ingress"), 2, 20)
    s.add(("a", "p1", "egress"), 1, 10)
    packets, nbytes = s.families("fovea_pod", "of observed pods")
    assert (packets.name, nbytes.name) == ("fovea_pod_packets", "fovea_pod_bytes")
    assert [(x.name, x.labels, x.value) for x in packets.samples] == [
        ("fovea_pod_packets_total", {"namespace": "a", "pod": "p1", "direction": "egress"}, 1),
        ("fovea_pod_packets_total", {"namespace": "b", "pod": "p2", "direction": "ingress"}, 2),
    ]
    assert [x.value for x in nbytes.samples] == [10, 20]
