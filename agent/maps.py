"""Read cumulative counters out of BPF maps.

The kernel programs only ever add. Each read takes the current cumulative
value of every key; a key whose value has not changed for `idle_reads` reads
is removed with an atomic lookup-and-delete and its final value folded into a
base kept here, so totals stay monotonic and no increment that reached the map
is lost. Only idle keys are deleted, so the map never needs draining.
"""

from __future__ import annotations

import ctypes as ct
import logging
from collections.abc import Callable, Hashable
from typing import Any

log = logging.getLogger(__name__)

Counts = tuple[int, int]  # (packets, bytes)


def _sum_percpu(leaf) -> Counts:
    return sum(c.packets for c in leaf), sum(c.bytes for c in leaf)


class CounterHash:
    """A BPF_PERCPU_HASH of struct fovea_counter, read as cumulative totals."""

    def __init__(self, table, decode: Callable[[Any], Hashable], idle_reads: int = 3):
        self.table = table
        self.decode = decode
        self.idle_reads = idle_reads
        self.max_entries = table.max_entries
        self._base: dict[Hashable, Counts] = {}  # folded-in values of deleted keys
        self._last: dict[bytes, tuple[Counts, int]] = {}  # raw key -> (value, unchanged reads)
        self.entries = 0

    def _items(self):
        try:
            return list(self.table.items_lookup_batch())
        except Exception:  # kernels or maps without batch ops
            return list(self.table.items())

    def read(self) -> dict[Hashable, Counts]:
        totals = dict(self._base)
        last: dict[bytes, tuple[Counts, int]] = {}
        idle = []
        items = self._items()
        self.entries = len(items)
        for key, leaf in items:
            if isinstance(key, int):  # batch reads hand back integer keys as ints
                key = self.table.Key(key)
            raw = bytes(key)
            value = _sum_percpu(leaf)
            prev = self._last.get(raw)
            unchanged = prev[1] + 1 if prev and prev[0] == value else 0
            last[raw] = (value, unchanged)
            if unchanged >= self.idle_reads:
                idle.append(key)
            k = self.decode(key)
            p, b = totals.get(k, (0, 0))
            totals[k] = (p + value[0], b + value[1])
        self._last = last
        for key in idle:
            self._retire(key, totals)
        return totals

    def _retire(self, key, totals) -> None:
        """Delete an idle key atomically; whatever it held by then goes to the base."""
        from bcc import libbcc

        raw = bytes(key)
        k = self.decode(key)
        seen = self._last.pop(raw)[0]
        leaf = self.table.Leaf()
        kbuf = self.table.Key.from_buffer_copy(raw)
        if libbcc.lib.bpf_lookup_and_delete(self.table.map_fd, ct.byref(kbuf), ct.byref(leaf)) != 0:
            if self._exists(kbuf):  # kernel older than 5.14: no lookup-and-delete on hashes
                log.warning("this kernel cannot delete idle map keys atomically (needs 5.14); keeping them")
                self.idle_reads = float("inf")
                return
            final = seen  # gone already: keep what we saw
        else:
            final = _sum_percpu(leaf)
        bp, bb = self._base.get(k, (0, 0))
        self._base[k] = (bp + final[0], bb + final[1])
        # Anything that arrived between our read and the delete is counted too.
        tp, tb = totals[k]
        totals[k] = (tp + final[0] - seen[0], tb + final[1] - seen[1])
        self.entries -= 1

    def _exists(self, kbuf) -> bool:
        try:
            self.table[kbuf]
            return True
        except KeyError:
            return False

    @property
    def fill_ratio(self) -> float:
        return self.entries / self.max_entries if self.max_entries else 0.0


def read_percpu_array(table) -> list[Counts]:
    """A BPF_PERCPU_ARRAY of struct fovea_counter: one total per index."""
    return [_sum_percpu(table[ct.c_int(i)]) for i in range(table.max_entries)]
