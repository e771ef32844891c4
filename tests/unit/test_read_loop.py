"""The read loop's bookkeeping with plugins that fail: plugin_up, /readyz and restarts from facts,
and a scrape that renders the last snapshot without calling into any plugin."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily

from agent.config import Config
from agent.metrics import FoveaCollector
from agent.plugins.base import Plugin
from agent.runtime import Agent
from tests.conftest import Metrics


class Counting(Plugin):
    name = "forward"

    def __init__(self):
        self.reads = 0
        self.fail_reads = 0
        self.missing = None

    def refresh(self):
        if self.fail_reads:
            self.fail_reads -= 1
            raise OSError("map read failed")
        self.reads += 1

    def reconcile(self):
        raise RuntimeError("housekeeping bug")

    def problem(self):
        return self.missing

    def metrics(self):
        c = CounterMetricFamily("fovea_forward_packets", "test", labels=["direction"])
        c.add_metric(["egress"], self.reads)
        return [c]


def agent_with(plugin) -> Agent:
    agent = Agent(Config(plugins=("forward", "drops")))
    agent.plugins = {"forward": plugin}
    agent.failed = {"drops": "missing capability CAP_BPF (needed to load eBPF programs and maps)"}
    agent._ready = True
    agent.now = 0.0
    agent.supervisor.clock = lambda: agent.now
    return agent


def scrape(agent) -> Metrics:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FoveaCollector(lambda: agent.snapshot))
    return Metrics(generate_latest(registry).decode())


def test_up_ready_and_restarts_follow_what_the_read_loop_saw():
    plugin = Counting()
    agent = agent_with(plugin)
    agent._housekeeping()  # raises inside: counted, not fatal
    agent._read()
    m = scrape(agent)
    assert m.get("fovea_agent_plugin_up", plugin="forward") == 1
    assert m.get("fovea_agent_plugin_up", plugin="drops") == 0
    assert m.get("fovea_agent_restarts_total", component="forward.reconcile") == 1
    assert m.get("fovea_forward_packets_total", direction="egress") == 1
    ok, why = agent.readiness()
    assert not ok and why == "not ready; plugin drops is down: missing capability CAP_BPF (needed to load eBPF " \
                             "programs and maps)"

    plugin.fail_reads = 1
    agent._read()
    m = scrape(agent)
    assert m.get("fovea_agent_plugin_up", plugin="forward") == 0  # its last read failed
    assert m.get("fovea_agent_restarts_total", component="forward.refresh") == 1
    assert "plugin forward is down: reading its maps failed" in agent.readiness()[1]

    agent.now = 1.0  # past the first backoff (0.5 s)
    plugin.missing = "uplink eth9 does not exist"
    agent._read()
    assert scrape(agent).get("fovea_agent_plugin_up", plugin="forward") == 0
    assert "plugin forward is down: uplink eth9 does not exist" in agent.readiness()[1]

    plugin.missing = None
    agent.failed.clear()
    agent._read()
    m = scrape(agent)
    assert m.get("fovea_agent_plugin_up", plugin="forward") == 1
    assert agent.readiness() == (True, "ready")


def test_a_scrape_never_calls_into_the_plugins():
    plugin = Counting()
    agent = agent_with(plugin)
    agent._read()
    reads = plugin.reads
    for _ in range(3):
        assert scrape(agent).get("fovea_forward_packets_total", direction="egress") == reads
    assert plugin.reads == reads
