"""The tcp plugin's user-space arithmetic, on hand-built state (no kernel)."""

from prometheus_client.core import Metric

from agent.plugins.tcp import BUCKETS, TcpPlugin


def plugin_with(snapshot, since) -> TcpPlugin:
    p = TcpPlugin()
    p.snapshot = snapshot
    p.since = since
    return p


def test_gauge_is_the_dump_plus_transitions_since_and_time_wait_from_dumps_only():
    p = plugin_with({1: {1: 5, 10: 2, 6: 7}, 2: {1: 1}}, {1: {1: 3, 6: 4}, 2: {1: -1, 2: 1}})
    c = p.connections()
    assert c["ESTABLISHED"] == 5 + 3 + 1 - 1
    assert c["LISTEN"] == 2
    assert c["TIME_WAIT"] == 7  # transitions never report TIME_WAIT: whatever is there is ignored
    assert c["SYN_SENT"] == 1
    assert "CLOSE" not in c


def test_gauge_never_goes_negative():
    p = plugin_with({1: {1: 0}}, {1: {1: -3}})
    assert p.connections()["ESTABLISHED"] == 0


def histogram(families: list[Metric], name: str) -> dict:
    fam = next(f for f in families if f.name == name)
    return {(s.name, s.labels.get("le")): s.value for s in fam.samples}


def test_histogram_buckets_are_cumulative_from_10_microseconds():
    p = TcpPlugin()
    counts = [0] * (len(BUCKETS) + 1)
    counts[0], counts[3], counts[-1] = 2, 1, 1  # <=10us, <=80us, beyond the last bound
    p.hist["connect"] = [counts, 2 * 5_000 + 70_000 + 20_000_000_000]

    class NoSeries:
        def counter(self, name, doc):
            return Metric(name, doc, "counter")

    p.pod_retransmits = p.pod_resets = NoSeries()
    h = histogram(list(p.metrics()), "fovea_tcp_connect_duration_seconds")
    assert h[("fovea_tcp_connect_duration_seconds_bucket", "1e-05")] == 2
    assert h[("fovea_tcp_connect_duration_seconds_bucket", "4e-05")] == 2
    assert h[("fovea_tcp_connect_duration_seconds_bucket", "8e-05")] == 3
    assert h[("fovea_tcp_connect_duration_seconds_bucket", "10.4858")] == 3
    assert h[("fovea_tcp_connect_duration_seconds_bucket", "+Inf")] == 4
    assert h[("fovea_tcp_connect_duration_seconds_count", None)] == 4
    assert h[("fovea_tcp_connect_duration_seconds_sum", None)] == 20.00008
