"""The Prometheus side: a snapshot of metric families built on the read loop
after each read, and the collector that hands the latest one to each scrape."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

from agent import __version__, compiler

log = logging.getLogger(__name__)


class FoveaCollector:
    """Renders the latest snapshot: a scrape never reads the kernel or waits for the read loop."""

    def __init__(self, snapshot: Callable[[], list]):
        self.snapshot = snapshot

    def describe(self):
        return []  # families depend on the plugins running; collect() at register time is avoided

    def collect(self):
        return self.snapshot()


def build_snapshot(agent) -> list:
    """Every metric family, from the state the read loop just read (call it on the read loop)."""
    start = time.monotonic()
    families = []
    up = GaugeMetricFamily("fovea_agent_plugin_up", "1 while the plugin is loaded, attached everywhere it "
                           "should be, and its last read succeeded", labels=["plugin"])
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
    for name in agent.config.enabled_plugins:
        up.add_metric([name], 0.0 if name in agent.down or name not in agent.plugins else 1.0)
    for name, plugin in agent.plugins.items():
        try:
            plugin_families = list(plugin.metrics())
            health = plugin.health()
        except Exception as e:  # one plugin's bug never empties the scrape
            agent.supervisor.failed(f"{name}.metrics", e)
            continue
        families.extend(plugin_families)
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
    cache = GaugeMetricFamily("fovea_agent_cache_objects", "Objects in the pod source, per kind", labels=["kind"])
    if agent.pod_source is not None:
        for kind, n in sorted(agent.pod_source.stats().items()):
            cache.add_metric([kind], n)
    restarts = CounterMetricFamily("fovea_agent_restarts", "Components that failed and were restarted, "
                                   "by component (plugin.reconcile, plugin.refresh, exporter threads...)",
                                   labels=["component"])
    for component, n in sorted(agent.supervisor.counts().items()):
        restarts.add_metric([component], n)
    attach = GaugeMetricFamily("fovea_agent_attach_mode", "1 for how the tc programs attach: tcx or clsact",
                               labels=["mode"])
    if agent.datapath is not None:
        attach.add_metric([agent.datapath.tc.mode], 1.0)
    programs = CounterMetricFamily("fovea_agent_bpf_programs_loaded", "eBPF objects loaded, by where their "
                                   "compiled form came from: compiled (a compiler process ran) or cache",
                                   labels=["source"])
    programs.add_metric(["compiled"], compiler.stats["compiles"])
    programs.add_metric(["cache"], compiler.stats["cache_hits"])
    compiler_peak = GaugeMetricFamily("fovea_agent_compiler_peak_rss_bytes", "The largest resident memory a "
                                      "compiler process of this agent reached (0: none ran)")
    compiler_peak.add_metric([], compiler.stats["peak_rss_bytes"])
    info = InfoMetricFamily("fovea_agent_build", "Agent version and kernel")
    info.add_metric([], {"version": __version__, "kernel": os.uname().release})
    read_time = GaugeMetricFamily("fovea_agent_last_read_timestamp_seconds",
                                  "When the read loop read the kernel maps this snapshot shows (Unix time)")
    read_time.add_metric([], time.time())
    duration = GaugeMetricFamily("fovea_agent_snapshot_build_seconds",
                                 "Time the read loop spent building this snapshot's metric families")
    duration.add_metric([], time.monotonic() - start)
    return families + [up, fill, lost, series, overflow, records, cache, restarts, attach, programs, compiler_peak,
                       info, read_time, duration, *consumer_metrics(agent)]


def consumer_metrics(agent) -> list:
    """Self-metrics of the record consumers (fovea_agent_*)."""
    out = []
    if agent.attribution is not None:
        unattributed = CounterMetricFamily(
            "fovea_agent_unattributed", "Traffic of a pod address still unknown after podLevel.pendingWindow "
            "(or past the pending store's bound), in the signal's unit", labels=["signal"])
        for signal, n in sorted(agent.attribution.unattributed_counts().items()):
            unattributed.add_metric([signal], n)
        out.append(unattributed)
    if agent.traces is not None:
        c = agent.traces.counts()
        exported = CounterMetricFamily("fovea_agent_spans_exported", "Spans the OTLP collector accepted")
        exported.add_metric([], c["exported"])
        failed = CounterMetricFamily("fovea_agent_spans_failed",
                                     "Spans whose export failed (collector down, slow or refusing)")
        failed.add_metric([], c["failed"])
        dropped = CounterMetricFamily("fovea_agent_spans_dropped", "Spans never sent, by why", labels=["reason"])
        for reason in ("queue_full", "rate_limit"):
            dropped.add_metric([reason], c[reason])
        sampled = CounterMetricFamily("fovea_agent_spans_sampled_out", "Records left out by otlp.sampleRatio")
        sampled.add_metric([], c["sampled_out"])
        queued = GaugeMetricFamily("fovea_agent_spans_queued", "Spans waiting for the collector")
        queued.add_metric([], c["queued"])
        out += [exported, failed, dropped, sampled, queued]
    if agent.observe is not None:
        s = agent.observe.stats()
        followers = GaugeMetricFamily("fovea_agent_observe_clients", "Clients following the flow stream")
        followers.add_metric([], s["followers"])
        lost = CounterMetricFamily("fovea_agent_observe_lost_records",
                                   "Records flow-stream clients could not keep up with")
        lost.add_metric([], s["lost"] + s["hub_full"])
        refused = CounterMetricFamily("fovea_agent_observe_refused_requests",
                                      "Flow-stream requests refused (malformed, or past the follower cap)")
        refused.add_metric([], s["refused"])
        out += [followers, lost, refused]
    if agent.captures is not None:
        from capture.service import capture_metrics

        out += capture_metrics(agent.captures)  # fovea_capture_*
    return out
