"""Read counters out of BPF maps as increments.

The kernel programs only ever add. Each read takes the current cumulative
value of every key and returns what was added since the previous read. A key
whose value has not changed for `idle_reads` reads is removed with an atomic
lookup-and-delete, and whatever it gained before the delete is part of that
read's increments: no increment that reached the map is lost, and memory here
is bounded by the live keys. Only idle keys are deleted, so the map never
needs draining. Consumers keep the cumulative series (agent/series.py).
"""

from __future__ import annotations

import ctypes as ct
import logging
from collections import defaultdict
from collections.abc import Callable, Hashable
from typing import Any

log = logging.getLogger(__name__)

Counts = tuple[int, int]  # (packets, bytes)


def _sum_percpu(leaf) -> Counts:
    return sum(c.packets for c in leaf), sum(c.bytes for c in leaf)


class CounterHash:
    """A BPF_PERCPU_HASH of struct fovea_counter, read as increments per decoded key."""

    def __init__(self, table, decode: Callable[[Any], Hashable], idle_reads: int = 3):
        self.table = table
        self.decode = decode
        self.idle_reads = idle_reads
        self.max_entries = table.max_entries
        self._last: dict[bytes, tuple[Counts, int]] = {}  # raw key -> (value, unchanged reads)
        self.entries = 0

    def _items(self):
        try:
            return list(self.table.items_lookup_batch())
        except Exception:  # kernels or maps without batch ops
            return list(self.table.items())

    def read(self) -> dict[Hashable, Counts]:
        """What each key gained since the previous read (keys that gained nothing are left out)."""
        increments: dict[Hashable, list[int]] = defaultdict(lambda: [0, 0])
        last: dict[bytes, tuple[Counts, int]] = {}
        idle = []
        items = self._items()
        self.entries = len(items)
        for key, leaf in items:
            raw = bytes(key)
            value = _sum_percpu(leaf)
            prev = self._last.get(raw)
            before = prev[0] if prev else (0, 0)
            unchanged = prev[1] + 1 if prev and prev[0] == value else 0
            last[raw] = (value, unchanged)
            if unchanged >= self.idle_reads:
                idle.append(key)
            if value != before:
                inc = increments[self.decode(key)]
                inc[0] += value[0] - before[0]
                inc[1] += value[1] - before[1]
        self._last = last
        for key in idle:
            self._retire(key, increments)
        return {k: (p, b) for k, (p, b) in increments.items() if p or b}

    def retire_where(self, predicate: Callable[[Hashable], bool]) -> dict[Hashable, Counts]:
        """Delete the keys whose decoded form matches (their source is gone);
        returns what they gained since the last read."""
        increments: dict[Hashable, list[int]] = defaultdict(lambda: [0, 0])
        for raw in [r for r in self._last if predicate(self.decode(self.table.Key.from_buffer_copy(r)))]:
            self._retire(self.table.Key.from_buffer_copy(raw), increments)
        return {k: (p, b) for k, (p, b) in increments.items() if p or b}

    def _retire(self, key, increments) -> None:
        """Delete one key atomically; what it gained since our read is added to `increments`."""
        raw = bytes(key)
        seen = self._last[raw][0]
        kbuf = self.table.Key.from_buffer_copy(raw)
        try:
            leaf = self.table.pop(kbuf)
        except OSError:
            if self._exists(kbuf):  # kernel older than 5.14: no lookup-and-delete on hashes
                log.warning("this kernel cannot delete idle map keys atomically (needs 5.14); keeping them")
                self.idle_reads = float("inf")
                return
            leaf = None
        final = seen if leaf is None else _sum_percpu(leaf)  # None: gone already, nothing more to count
        del self._last[raw]
        self.entries -= 1
        if final != seen:
            inc = increments[self.decode(key)]
            inc[0] += final[0] - seen[0]
            inc[1] += final[1] - seen[1]

    def _exists(self, kbuf) -> bool:
        try:
            self.table[kbuf]
            return True
        except KeyError:
            return False

    def save(self) -> list:
        """What this reader has seen of each key (JSON types): the next agent's reader
        of the same, adopted map continues from it (lifecycle.keepAttached)."""
        return [[raw.hex(), value[0], value[1], unchanged] for raw, (value, unchanged) in self._last.items()]

    def restore(self, saved: list) -> None:
        self._last = {bytes.fromhex(raw): ((p, b), unchanged) for raw, p, b, unchanged in saved}
        self.entries = len(self._last)

    @property
    def fill_ratio(self) -> float:
        return self.entries / self.max_entries if self.max_entries else 0.0


def read_percpu_array(table) -> list[Counts]:
    """A BPF_PERCPU_ARRAY of struct fovea_counter: one cumulative total per index."""
    return [_sum_percpu(table[ct.c_int(i)]) for i in range(table.max_entries)]


def take_expired(table, now_ns: int, timeout_ns: int) -> tuple[int, list]:
    """The entries of an in-flight hash (DNS queries, HTTP requests: a leaf with a `ts` in
    ns) older than timeout_ns, each taken with an atomic lookup-and-delete, so an answer
    racing the expiry is counted once, one way or the other; and how many entries stay.
    An entry made again meanwhile (a newer `ts` under the same key) is put back."""
    try:
        items = list(table.items_lookup_batch())
    except Exception:  # kernels or maps without batch ops
        items = list(table.items())
    entries, taken = len(items), []
    for key, value in items:
        if now_ns - value.ts <= timeout_ns:
            continue
        leaf = table.pop(key)
        if leaf is None:
            continue  # answered meanwhile
        if now_ns - leaf.ts <= timeout_ns:  # made again meanwhile: still in flight
            try:
                table[key] = leaf
            except Exception:  # the table filled up meanwhile: its answer will be unmatched
                pass
            continue
        entries -= 1
        taken.append((key, leaf))
    return entries, taken
