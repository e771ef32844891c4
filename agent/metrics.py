"""The Prometheus collector: plugin metrics and the agent's own health."""

from __future__ import annotations

import logging
import os
import time

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

from agent import __version__

log = logging.getLogger(__name__)


class FoveaCollector:
    """Reads the kernel maps at scrape time, so a scrape sees current counts."""

    def __init__(self, agent):
        self.agent = agent

    def describe(self):
        return []  # families depend on the plugins running; collect() at register time is avoided

    def collect(self):
        # Families are built under the lock and written out after it is released:
        # formatting a large scrape must not hold up the read loop.
        return self._families()

    def _families(self) -> list:
        agent = self.agent
        start = time.monotonic()
        families = []
        with agent.lock:
            running = agent.refresh_all()
            for plugin in running:
                families.extend(plugin.metrics())

            up = GaugeMetricFamily("fovea_agent_plugin_up", "1 if the plugin is loaded and attached", labels=["plugin"])
            fill = GaugeMetricFamily("fovea_agent_map_fill_ratio", "Entries in a BPF map over its size", labels=["map"])
            lost = CounterMetricFamily(
                "fovea_agent_lost_events", "Events the agent could not keep in detail, by source", labels=["source"]
            )
            series = GaugeMetricFamily("fovea_agent_series", "Series exported, per metric", labels=["metric"])
            overflow = CounterMetricFamily(
                "fovea_agent_series_overflow", "Increments that went to an overflow series past the series cap",
                labels=["metric"],
            )
            records = CounterMetricFamily(
                "fovea_agent_records", "Records (flows, drop events) published for spans and the flow stream",
                labels=["kind"],
            )
            for name in agent.config.plugins:
                up.add_metric([name], 1.0 if name in agent.plugins else 0.0)
            for plugin in running:
                health = plugin.health()
                for m, v in health.map_fill.items():
                    fill.add_metric([m], v)
                for s, v in health.lost.items():
                    lost.add_metric([s], v)
                for m, v in health.series.items():
                    series.add_metric([m], v)
                for m, v in health.overflowed.items():
                    overflow.add_metric([m], v)
                for k, v in health.records.items():
                    records.add_metric([k], v)
            for subscriber, n in sorted(agent.events.dropped().items()):
                lost.add_metric([f"records_{subscriber}_queue_full"], n)
            cache = GaugeMetricFamily("fovea_agent_cache_objects", "Objects in the pod source, per kind",
                                      labels=["kind"])
            if agent.pod_source is not None:
                for kind, n in sorted(agent.pod_source.stats().items()):
                    cache.add_metric([kind], n)
        attach = GaugeMetricFamily("fovea_agent_attach_mode", "1 for how the tc programs attach: tcx or clsact",
                                   labels=["mode"])
        if agent.tc is not None:
            attach.add_metric([agent.tc.mode], 1.0)
        info = InfoMetricFamily("fovea_agent_build", "Agent version and kernel")
        info.add_metric([], {"version": __version__, "kernel": os.uname().release})
        duration = GaugeMetricFamily(
            "fovea_agent_scrape_collect_seconds",
            "Time this scrape spent reading kernel maps and building metric families (not writing them)",
        )
        duration.add_metric([], time.monotonic() - start)
        return families + [up, fill, lost, series, overflow, records, cache, attach, info, duration] + agent.extra_metrics()
