"""Counter series with cardinality controls, fed with increments.

Kernel maps are read as increments per interface or address (agent/maps.py);
series are per label set (a pod, a pair of workloads). Increments wait for
their owner in the attribution stage (agent/attribution.py); `SeriesStore`
adds them to series so that:
- counters never go backwards, even when their sources (interface indexes,
  map keys) are retired or reused;
- a series whose owner is gone disappears `ttl` seconds later; an owner that
  comes back with the same labels within the TTL adds to the same series;
- past `max_series` label sets, new ones go to one overflow series (every
  label "_overflow" except those listed as kept), counted, so totals stay right.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client.core import CounterMetricFamily

OVERFLOW = "_overflow"


class SeriesStore:
    def __init__(
        self,
        label_names: tuple[str, ...],
        max_series: int,
        ttl: float,
        keep_on_overflow: tuple[str, ...] = (),
        clock: Callable[[], float] = time.monotonic,
    ):
        self.label_names = label_names
        self.max_series = max_series
        self.ttl = ttl
        self.clock = clock
        self._keep = [name in keep_on_overflow for name in label_names]
        self.values: dict[tuple[str, ...], list[int]] = {}
        self._alive: dict[tuple[str, ...], float] = {}  # label set -> last time its owner was seen
        self.overflowed = 0  # increments that went to an overflow series

    def _overflow_labels(self, labels: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(v if keep else OVERFLOW for v, keep in zip(labels, self._keep))

    def add(self, labels: tuple[str, ...], packets: int, nbytes: int) -> None:
        if labels not in self.values and len(self.values) >= self.max_series:
            labels = self._overflow_labels(labels)
            self.overflowed += 1
        v = self.values.setdefault(labels, [0, 0])
        v[0] += packets
        v[1] += nbytes
        self._alive[labels] = self.clock()

    def touch(self, alive: Callable[[tuple[str, ...]], bool]) -> None:
        """Mark series whose owner still exists; drop those gone longer than the TTL."""
        now = self.clock()
        for labels in list(self.values):
            if alive(labels) or labels == self._overflow_labels(labels):
                self._alive[labels] = now
            elif now - self._alive[labels] > self.ttl:
                del self.values[labels]
                del self._alive[labels]

    def save(self) -> list:
        """The cumulative values, for the next agent (lifecycle.keepAttached)."""
        return [[list(labels), p, b] for labels, (p, b) in self.values.items()]

    def restore(self, saved: list) -> None:
        """Continue from what a previous agent saved: its series go on, never backwards."""
        now = self.clock()
        for labels, p, b in saved:
            labels = tuple(labels)
            v = self.values.setdefault(labels, [0, 0])
            v[0] += p
            v[1] += b
            self._alive[labels] = now

    def __len__(self) -> int:
        return len(self.values)

    def counter(self, name: str, documentation: str) -> CounterMetricFamily:
        """One counter family `<name>_total` of the first value (a count of messages, say)."""
        family = CounterMetricFamily(name, documentation, labels=self.label_names)
        for labels, (n, _) in sorted(self.values.items()):
            family.add_metric(labels, n)
        return family

    def families(self, name: str, what: str) -> list[CounterMetricFamily]:
        """The `<name>_packets_total` and `<name>_bytes_total` counter families."""
        packets = CounterMetricFamily(f"{name}_packets", f"IP packets {what}", labels=self.label_names)
        nbytes = CounterMetricFamily(f"{name}_bytes", f"IP bytes {what}", labels=self.label_names)
        for labels, (p, b) in sorted(self.values.items()):
            packets.add_metric(labels, p)
            nbytes.add_metric(labels, b)
        return [packets, nbytes]
