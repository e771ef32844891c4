"""Pod traffic, the workload traffic map and the connections between workloads (the
service map's connection outcomes), from tc programs on pod interfaces."""

from __future__ import annotations

import functools
import logging

from agent.attribution import WAIT, flow_addresses
from agent.endpoints import PodInterface
from agent.flows import (POD_RECEIVED, FlowTracker, KernelFlowTable, flow_fill, flow_lost, flow_records,
                         flow_table_cflags)
from agent.plugins.base import Plugin, PluginContext, PluginHealth
from agent.plugins.drops import protocol_name
from agent.series import SeriesStore

log = logging.getLogger(__name__)

POD_LABELS = ("namespace", "pod", "workload_kind", "workload_name")
PAIR_LABELS = ("source_namespace", "source_workload", "destination_namespace", "destination_workload")
FLOW_LABELS = PAIR_LABELS + ("protocol",)
CONNECTION_LABELS = PAIR_LABELS + ("result",)
DIRECTIONS = ("egress", "ingress")  # index = direction in pods.c, relative to the pod


class PodsPlugin(Plugin):
    name = "pods"
    capabilities = ("CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN", "CAP_SYS_ADMIN")

    def __init__(self):
        self._bpf = None
        self._ctx: PluginContext | None = None
        self._interfaces: dict[int, PodInterface] = {}
        self._attach_errors: dict[int, str] = {}  # ifindex -> why attaching failed (retried each round)
        self._records = None
        self.flows: FlowTracker | None = None

    def start(self, ctx: PluginContext) -> None:
        self._ctx = ctx
        cfg = ctx.config
        self.attribution = ctx.attribution
        self.pod_series = SeriesStore(POD_LABELS + ("direction",), cfg.podLevel.maxSeries,
                                      cfg.podLevel.seriesTTL, keep_on_overflow=("direction",))
        self.flow_series = SeriesStore(FLOW_LABELS, cfg.podLevel.maxSeries, cfg.podLevel.seriesTTL,
                                       keep_on_overflow=("protocol",))
        self.connection_series = SeriesStore(CONNECTION_LABELS, cfg.podLevel.maxSeries, cfg.podLevel.seriesTTL,
                                             keep_on_overflow=("result",))
        self._pod_pending = self.attribution.pending("pod_packets")
        self._flow_pending = self.attribution.pending("workload_flow")
        self._connection_pending = self.attribution.pending("workload_connections")
        self._datapath = ctx.datapath
        self._bpf, self._programs = ctx.datapath.load_tc_programs("pods", [
            f"-DPOD_MAP_SIZE={cfg.pods.mapSize}", *flow_table_cflags(cfg.flows),
        ], {"ingress": b"pod_from_pod", "egress": b"pod_to_pod"})
        # The flow table is the program's only per-packet map: the pod counters and the
        # traffic map are summed from it; flow records are published when flows are on,
        # those naming a pod not known yet wait for it (the pending window).
        self._records = self.attribution.holding("flow", ctx.events.publish, flow_addresses)
        self.flows = FlowTracker(KernelFlowTable(self._bpf), cfg.flows,
                                 self._records.publish if cfg.flows.enabled else lambda record: None,
                                 self.attribution)
        self.reconcile()

    def reconcile(self) -> None:
        """Attach to new pod interfaces, settle the counts of vanished ones."""
        found = self._datapath.pod_interfaces()
        gone = [i for i in self._interfaces if i not in found or found[i].ifname != self._interfaces[i].ifname]
        if gone:
            self.refresh()  # credit what they counted to their pods before they go
            for ifindex in gone:
                self._pod_pending.give_up(lambda key: key[0] == ifindex)  # never resolved: no pod to credit
                iface = self._interfaces.pop(ifindex)
                self._datapath.detach("pods", ifindex, gone=True)
                log.info("pod interface %s is gone", iface.ifname)
        self._attach_errors = {i: why for i, why in self._attach_errors.items() if i in found}
        for ifindex, iface in found.items():
            if ifindex not in self._interfaces:
                try:
                    self._datapath.attach("pods", iface.ifname, ifindex, self._programs)
                except Exception as e:  # it may also vanish between scan and attach: then it leaves `found`
                    if ifindex not in self._attach_errors:
                        log.warning("cannot attach to pod interface %s: %s", iface.ifname, e)
                    self._attach_errors[ifindex] = f"cannot attach to pod interface {iface.ifname}: {e}"
                    continue
                self._attach_errors.pop(ifindex, None)
                log.info("counting pod interface %s (%s)", iface.ifname, ", ".join(iface.ips) or "no address yet")
            self._interfaces[ifindex] = iface
        self.attribution.set_pod_interfaces({i: tuple(f.ips) for i, f in self._interfaces.items()})

    def problem(self) -> str | None:
        if self._attach_errors:
            first = next(iter(self._attach_errors.values()))
            return f"{first} ({len(self._attach_errors)} of {len(self._attach_errors) + len(self._interfaces)} " \
                   "pod interfaces not counted)"
        return self._datapath.problem or None

    def refresh(self) -> None:
        pods: dict[tuple, list[int]] = {}
        flows: dict[tuple, list[int]] = {}
        for key, (p, b) in self.flows.read().items():
            to_pod = key.point == POD_RECEIVED
            for counts in (pods.setdefault((key.ifindex, int(to_pod)), [0, 0]),
                           flows.setdefault((key.src, key.dst, protocol_name(key.l4proto), to_pod), [0, 0])):
                counts[0] += p
                counts[1] += b
        self._pod_pending.add(pods)
        self._attribute_pod_counts()
        self._flow_pending.add(flows)
        self._flow_pending.drain(functools.partial(self._attribute_pair, self.flow_series))
        connections: dict[tuple, list[int]] = {}
        for key, result in self.flows.outcomes:  # counted where the tracker kept the attempt's SYN
            connections.setdefault((key.src, key.dst, result, key.point == POD_RECEIVED), [0, 0])[0] += 1
        self._connection_pending.add(connections)
        self._connection_pending.drain(functools.partial(self._attribute_pair, self.connection_series))
        self._records.release()
        present = self.attribution.local_pod_labels()
        self.pod_series.touch(lambda labels: labels[:4] in present)
        self.flow_series.touch(lambda labels: True)  # bounded by workloads, kept
        self.connection_series.touch(lambda labels: True)

    def _attribute_pod_counts(self) -> None:
        def attribute(key, p, b) -> bool:
            ifindex, direction = key
            labels = self.attribution.labels(self.attribution.interface_owner(ifindex))
            if labels is WAIT:
                return False
            if labels is not None:
                self.pod_series.add(labels + (DIRECTIONS[direction],), p, b)
            return True

        self._pod_pending.drain(attribute)

    def _attribute_pair(self, series: SeriesStore, key, first: int, second: int) -> bool:
        """The traffic map counts each packet once per cluster (agent/attribution.py), and the
        connections each attempt by the same rule, applied to its SYN. key: (sender, receiver,
        the last label: protocol or result, sent to the pod)."""
        src, dst, label, to_pod = key
        pair = self.attribution.workload_pair(src, dst, to_pod)
        if pair is WAIT:
            return False
        if pair is not None:
            sender, receiver = pair
            series.add((sender.namespace, sender.workload, receiver.namespace, receiver.workload, label), first, second)
        return True

    def metrics(self):
        return (self.pod_series.families("fovea_pod", "of observed pods")
                + self.flow_series.families("fovea_workload_flow", "between workloads, once per cluster")
                + [self.connection_series.counter(
                    "fovea_workload_connections",
                    "TCP connection attempts between workloads by result (established, refused, timeout), "
                    "once per cluster")])

    def health(self) -> PluginHealth:
        return PluginHealth(
            map_fill=flow_fill(self.flows, "pods"),
            lost=flow_lost(self.flows, "pods"),
            records=flow_records(self.flows, "pods"),
            series={"fovea_pod_packets_total": len(self.pod_series),
                    "fovea_workload_flow_packets_total": len(self.flow_series),
                    "fovea_workload_connections_total": len(self.connection_series)},
            overflowed={"fovea_pod_packets_total": self.pod_series.overflowed,
                        "fovea_workload_flow_packets_total": self.flow_series.overflowed,
                        "fovea_workload_connections_total": self.connection_series.overflowed},
        )

    def close(self) -> None:
        if self.flows is not None:
            self.flows.close()
            self.flows = None
            self._records.flush()
        if self._ctx is not None:
            for ifindex in list(self._interfaces):
                self._datapath.detach("pods", ifindex)
            self._interfaces.clear()
        if self._bpf is not None:
            self._datapath.unloading("pods")
            self._bpf.cleanup()
            self._bpf = None
