"""Node forward counters: what crosses the node's uplinks (DESIGN.md)."""

from __future__ import annotations

import logging

from prometheus_client.core import CounterMetricFamily
from pyroute2 import IPRoute

from agent.errors import FoveaError
from agent.flows import FlowTracker, KernelFlowTable, flow_cflags, flow_fill, flow_lost, flow_records
from agent.maps import read_percpu_array
from agent.plugins.base import Plugin, PluginContext, PluginHealth

log = logging.getLogger(__name__)

DIRECTIONS = ("ingress", "egress")  # index in forward_counts, relative to the node
ARPHRD_ETHER = 1


class ForwardPlugin(Plugin):
    name = "forward"
    capabilities = ("CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN")

    def __init__(self):
        self._bpf = None
        self._ctx: PluginContext | None = None
        self._uplinks: list[str] = []
        self._attached: dict[str, int] = {}  # uplink name -> ifindex
        self._missing: dict[str, str] = {}  # uplink name -> why it is not counted
        self._totals = [(0, 0), (0, 0)]
        self.flows: FlowTracker | None = None

    def start(self, ctx: PluginContext) -> None:
        self._ctx = ctx
        self._uplinks = list(ctx.uplinks)
        with IPRoute() as ipr:
            for name in self._uplinks:
                idx = ipr.link_lookup(ifname=name)
                if not idx:
                    raise FoveaError(f"uplink {name!r} does not exist", f"interfaces here: {', '.join(_names(ipr))}")
                if ipr.get_links(idx[0])[0]["ifi_type"] != ARPHRD_ETHER:
                    raise FoveaError(f"uplink {name!r} is not an Ethernet device", "Fovea counts on Ethernet-like links only")
        self._datapath = ctx.datapath
        self._bpf, self._programs = ctx.datapath.load_tc_programs(
            "forward", flow_cflags(ctx.config.flows), {"ingress": b"forward_ingress", "egress": b"forward_egress"})
        saved = ctx.datapath.saved(self.name)  # the counters are the pinned array's: only flows need more
        if ctx.config.flows.enabled:
            self.flows = FlowTracker(KernelFlowTable(self._bpf), ctx.config.flows, ctx.events.publish,
                                     ctx.attribution)
            if saved.get("flows") and "flows" in ctx.datapath.adopted.get("forward", ()):
                self.flows.restore(saved["flows"])
        self.reconcile()

    def save(self) -> dict:
        return {"flows": self.flows.save()} if self.flows is not None else {}

    def reconcile(self) -> None:
        """Attach to uplinks that (re)appeared; forget those that vanished."""
        with IPRoute() as ipr:
            for name in self._uplinks:
                idx = ipr.link_lookup(ifname=name)
                current = self._attached.get(name)
                if current is not None and (not idx or idx[0] != current):
                    log.warning("uplink %s vanished; counting resumes if it comes back", name)
                    self._datapath.detach("forward", current, gone=True)
                    del self._attached[name]
                if not idx:
                    self._missing[name] = f"uplink {name} does not exist"
                elif name not in self._attached:
                    try:
                        self._datapath.attach("forward", name, idx[0], self._programs)
                    except FoveaError as e:
                        if self._missing.get(name) != str(e):
                            log.warning("%s", e)
                        self._missing[name] = str(e)
                        continue
                    self._missing.pop(name, None)
                    self._attached[name] = idx[0]
                    log.info("counting forward traffic on uplink %s", name)

    def problem(self) -> str | None:
        return "; ".join(self._missing.values()) or None

    def refresh(self) -> None:
        self._totals = read_percpu_array(self._bpf["forward_counts"])
        if self.flows is not None:
            self.flows.read()

    def metrics(self):
        packets = CounterMetricFamily(
            "fovea_forward_packets", "IP packets crossing the node's uplinks", labels=["direction"]
        )
        nbytes = CounterMetricFamily(
            "fovea_forward_bytes", "IP bytes crossing the node's uplinks", labels=["direction"]
        )
        for direction, (p, b) in zip(DIRECTIONS, self._totals):
            packets.add_metric([direction], p)
            nbytes.add_metric([direction], b)
        return [packets, nbytes]

    def health(self) -> PluginHealth:
        return PluginHealth(map_fill=flow_fill(self.flows, "forward"), lost=flow_lost(self.flows, "forward"),
                            records=flow_records(self.flows, "forward"))

    def close(self) -> None:
        if self.flows is not None:
            self.flows.close()
            self.flows = None
        if self._ctx:
            for ifindex in self._attached.values():
                self._datapath.detach("forward", ifindex)
            self._attached.clear()
        if self._bpf is not None:
            self._datapath.unloading("forward")
            self._bpf.cleanup()
            self._bpf = None


def _names(ipr: IPRoute) -> list[str]:
    return [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()]
