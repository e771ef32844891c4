"""Drops with the kernel's own reason, from the skb:kfree_skb tracepoint."""

from __future__ import annotations

import ctypes as ct
import logging
import time
from collections import defaultdict

from prometheus_client.core import CounterMetricFamily

from agent.addresses import ip_text
from agent.attribution import WAIT
from agent.errors import FoveaError
from agent.events import DropEvent
from agent.maps import CounterHash, read_percpu_array
from agent.plugins.base import Plugin, PluginContext, PluginHealth
from agent.series import SeriesStore

log = logging.getLogger(__name__)

TRACEPOINT = ("skb", "kfree_skb")
FIELDS = {"skbaddr": 8, "protocol": 2, "reason": 4}  # field -> size the C code reads
SKB_MEMBERS = {"head": 8, "data": 8, "len": 4, "network_header": 2, "end": 4}
SHINFO_MEMBERS = {"gso_segs": 2}
PROTO_CLASSES = ("tcp", "udp", "icmp", "other")  # order of drop_overflow slots, as in drops.c
L4_NAMES = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmp"}
POD_DROP_LABELS = ("namespace", "pod", "workload_kind", "workload_name", "reason", "direction")


class DropKey(ct.Structure):
    _fields_ = [("reason", ct.c_uint32), ("family", ct.c_uint8), ("l4proto", ct.c_uint8), ("pad", ct.c_uint16),
                ("saddr", ct.c_uint8 * 16), ("daddr", ct.c_uint8 * 16)]


class DropEventC(ct.Structure):
    _fields_ = [("key", DropKey), ("packets", ct.c_uint64), ("bytes", ct.c_uint64), ("time_ns", ct.c_uint64),
                ("sport", ct.c_uint16), ("dport", ct.c_uint16), ("pad", ct.c_uint32)]


def protocol_name(l4proto: int) -> str:
    return L4_NAMES.get(l4proto, "other")



class DropsPlugin(Plugin):
    name = "drops"

    def __init__(self):
        self._bpf = None
        self._counts: CounterHash | None = None
        self.reasons: dict[int, str] = {}
        self._totals: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])  # detailed drops
        self._overflow: dict[tuple[str, str], tuple[int, int]] = {}
        self._pending = None
        self._lost = 0
        self._publish = None
        self.events_published = 0
        self._budget = (0, 0)  # drop events over the rate, and lost to a full ring buffer

    def check(self, tracefs) -> str | None:
        why = tracefs.lacks(*TRACEPOINT, FIELDS)
        if why and "has no" in why:
            return f"{why} (kernel older than 5.17?)"  # the reason field came in 5.17
        return why

    def cflags(self, ctx: PluginContext) -> list[str]:
        flags = ctx.tracefs.offset_flags(*TRACEPOINT, list(FIELDS))
        for struct, members in (("sk_buff", SKB_MEMBERS), ("skb_shared_info", SHINFO_MEMBERS)):
            prefix = "SKB" if struct == "sk_buff" else "SHINFO"
            for name, size in members.items():
                m = ctx.btf.member(struct, name)
                if m.size != size or m.bitfield_size:
                    raise FoveaError(
                        f"struct {struct}.{name} is {m.size} bytes in this kernel, expected {size}",
                        "this kernel is not supported by the drops plugin",
                    )
                flags.append(f"-D{prefix}_{name.upper()}_OFF={m.offset}")
        self.reasons = ctx.tracefs.drop_reasons() or _btf_reasons(ctx)
        flags += [
            f"-DDROP_MAP_SIZE={ctx.config.drops.mapSize}",
            f"-DDROP_REASON_MAX={max(self.reasons, default=0) + 2}",  # last slot: out of range
            f"-DDROP_EVENTS_PER_SEC={ctx.config.drops.eventsPerSecond}",
        ]
        return flags

    def start(self, ctx: PluginContext) -> None:
        self.attribution = ctx.attribution
        self._pending = self.attribution.pending("drop")
        self.pod_series = SeriesStore(POD_DROP_LABELS, ctx.config.podLevel.maxSeries, ctx.config.podLevel.seriesTTL,
                                      keep_on_overflow=("reason", "direction"))
        self._bpf = ctx.datapath.load_program("drops", self.cflags(ctx))
        self._counts = CounterHash(self._bpf["drop_counts"], self._decode, ctx.config.idleReads)
        self._restore(ctx.datapath.saved(self.name), "drop_counts" in self._bpf.adopted)
        attached = self._bpf.attach_tracepoint(tp=b"skb:kfree_skb", fn_name=b"on_kfree_skb")
        if attached != "attached":
            log.info("skb:kfree_skb: %s the previous agent's program", attached)
        if ctx.config.drops.eventsPerSecond > 0:
            self._publish = ctx.events.publish
            self._bpf["drop_events"].open_ring_buffer(self._on_event)
        log.info("counting drops by reason (%d reasons known to this kernel)", len(self.reasons))

    def _restore(self, saved: dict, counts_adopted: bool) -> None:
        """Continue the previous agent's counters (lifecycle.keepAttached): its totals, pod
        series and what waited for a pod; its reads of drop_counts only with that map."""
        if not saved:
            return
        self.pod_series.restore(saved["pod_series"])
        self._pending.restore(saved["pending"])
        for reason, proto, p, b in saved["totals"]:
            self._totals[(reason, proto)] = [p, b]
        if counts_adopted:  # else the map is new: so is its reader
            self._counts.restore(saved["counts"])

    def save(self) -> dict:
        return {"pod_series": self.pod_series.save(), "pending": self._pending.save(),
                "counts": self._counts.save(), "totals": [[*k, p, b] for k, (p, b) in self._totals.items()]}

    def reason_name(self, value: int) -> str:
        return self.reasons.get(value, "UNKNOWN")

    def _decode(self, key) -> tuple:
        """(reason, protocol, source, destination) from a struct drop_key."""
        return (
            self.reason_name(key.reason),
            protocol_name(key.l4proto),
            ip_text(key.family, bytes(key.saddr)),
            ip_text(key.family, bytes(key.daddr)),
        )

    def _on_event(self, _ctx, data, _size) -> None:
        e = ct.cast(data, ct.POINTER(DropEventC)).contents
        k = e.key
        offset = time.time_ns() - time.monotonic_ns()  # bpf_ktime_get_ns is CLOCK_MONOTONIC
        self.events_published += 1
        self._publish(DropEvent(
            time=(e.time_ns + offset) / 1e9, reason=self.reason_name(k.reason), transport=protocol_name(k.l4proto),
            family=k.family, source=ip_text(k.family, bytes(k.saddr)), source_port=e.sport,
            destination=ip_text(k.family, bytes(k.daddr)), destination_port=e.dport,
            packets=e.packets, bytes=e.bytes,
        ))

    def refresh(self) -> None:
        if self._publish is not None:
            self._bpf.ring_buffer_consume()
            budgets = self._bpf["drop_event_budget"][ct.c_int(0)]
            self._budget = (sum(b.skipped for b in budgets), sum(b.lost for b in budgets))
        increments = self._counts.read()
        for (reason, proto, _src, _dst), (p, b) in increments.items():
            t = self._totals[(reason, proto)]
            t[0] += p
            t[1] += b
        self._pending.add(increments)
        overflow = {}
        slots = read_percpu_array(self._bpf["drop_overflow"])
        for slot, (p, b) in enumerate(slots):
            if p:
                reason = self.reason_name(slot // len(PROTO_CLASSES))
                overflow[(reason, PROTO_CLASSES[slot % len(PROTO_CLASSES)])] = (p, b)
        self._overflow = overflow
        self._lost = sum(p for p, _ in overflow.values())
        self._attribute_to_pods()

    def _attribute_to_pods(self) -> None:
        """A drop belongs to the local pod that sent it, else the local pod it was for."""

        def attribute(key, p, b) -> bool:
            reason, _proto, src, dst = key
            owner = self.attribution.drop_owner(src, dst)
            if owner is WAIT:
                return False
            if owner is not None:
                pod, direction = owner
                labels = self.attribution.labels(pod)
                if labels is not None:
                    self.pod_series.add(labels + (reason, direction), p, b)
            return True

        self._pending.drain(attribute)
        present = self.attribution.local_pod_labels()
        self.pod_series.touch(lambda labels: labels[:4] in present)

    def totals(self) -> dict[tuple[str, str], tuple[int, int]]:
        """(reason, protocol) -> (packets, bytes), detailed and overflowed drops together."""
        out: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
        for key, (p, b) in self._totals.items():
            out[key][0] += p
            out[key][1] += b
        for key, (p, b) in self._overflow.items():
            out[key][0] += p
            out[key][1] += b
        return {k: (p, b) for k, (p, b) in out.items()}

    def metrics(self):
        packets = CounterMetricFamily(
            "fovea_drop_packets", "IP packets the kernel dropped, by its drop reason",
            labels=["reason", "protocol"],
        )
        nbytes = CounterMetricFamily(
            "fovea_drop_bytes", "IP bytes the kernel dropped, by its drop reason",
            labels=["reason", "protocol"],
        )
        for (reason, proto), (p, b) in sorted(self.totals().items()):
            packets.add_metric([reason, proto], p)
            nbytes.add_metric([reason, proto], b)
        return [packets, nbytes, *self.pod_series.families("fovea_pod_drop", "of observed pods the kernel dropped")]

    def health(self) -> PluginHealth:
        fill = self._counts.fill_ratio if self._counts else 0.0
        return PluginHealth(
            map_fill={"drop_counts": fill},
            lost={"drop_counts_full": self._lost, "drop_events_over_rate": self._budget[0],
                  "drop_events_ring_full": self._budget[1]},
            records={"drops": self.events_published},
            series={"fovea_pod_drop_packets_total": len(self.pod_series)} if self._counts else {},
            overflowed={"fovea_pod_drop_packets_total": self.pod_series.overflowed} if self._counts else {},
        )

    def close(self) -> None:
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None


def _btf_reasons(ctx: PluginContext) -> dict[int, str]:
    values = ctx.btf.enum("skb_drop_reason")
    return {v: n.removeprefix("SKB_DROP_REASON_") for v, n in values.items()}
