"""agent/maps.py CounterHash against a fake per-CPU hash table (agent/bpfmaps.py Table's calls)."""

from __future__ import annotations

import ctypes as ct
import errno
import json

import pytest

from agent.maps import CounterHash, read_percpu_array

NCPU = 4


class Counter(ct.Structure):  # struct fovea_counter
    _fields_ = [("packets", ct.c_uint64), ("bytes", ct.c_uint64)]


class Key(ct.Structure):
    _fields_ = [("id", ct.c_uint32), ("proto", ct.c_uint8)]


Leaf = Counter * NCPU


class FakeTable:
    """What CounterHash uses of a per-CPU hash Table: Key, Leaf, max_entries, batch reads, pop."""

    Key = Key
    Leaf = Leaf

    def __init__(self, max_entries: int = 100, batch: bool = True):
        self.map_fd = 42
        self.max_entries = max_entries
        self.batch = batch
        self.values: dict[bytes, list[list[int]]] = {}  # raw key -> per CPU [packets, bytes]
        self.before_delete = None  # called inside lookup_and_delete, before the copy
        self.deleted: list[tuple[int, int]] = []
        self.pops = 0

    @staticmethod
    def raw(kid: int, proto: int = 6) -> bytes:
        return bytes(Key(kid, proto))

    def add(self, kid: int, cpu: int, packets: int, nbytes: int, proto: int = 6) -> None:
        per_cpu = self.values.setdefault(self.raw(kid, proto), [[0, 0] for _ in range(NCPU)])
        per_cpu[cpu][0] += packets
        per_cpu[cpu][1] += nbytes

    def _pairs(self):
        for raw, per_cpu in self.values.items():
            leaf = Leaf(*(Counter(p, b) for p, b in per_cpu))
            yield Key.from_buffer_copy(raw), leaf

    def items_lookup_batch(self):
        if not self.batch:
            raise OSError(22, "batch ops not supported")
        return list(self._pairs())

    def items(self):
        return list(self._pairs())

    def pop(self, key):
        """Lookup-and-delete, as the kernel makes it."""
        self.pops += 1
        assert isinstance(key, Key)
        if self.before_delete is not None:
            self.before_delete()
        per_cpu = self.values.pop(bytes(key), None)
        if per_cpu is None:
            return None
        self.deleted.append((key.id, key.proto))
        return list(Leaf(*(Counter(p, b) for p, b in per_cpu)))

    def __getitem__(self, key):
        if bytes(key) not in self.values:
            raise KeyError(bytes(key))
        return next(leaf for k, leaf in self._pairs() if bytes(k) == bytes(key))


@pytest.fixture
def table() -> FakeTable:
    return FakeTable()


class Totals:
    """What a consumer does with CounterHash's increments: sums them."""

    def __init__(self, ch: CounterHash):
        self.ch = ch
        self.totals: dict = {}

    def read(self) -> dict:
        for k, (p, b) in self.ch.read().items():
            tp, tb = self.totals.get(k, (0, 0))
            self.totals[k] = (tp + p, tb + b)
        return dict(self.totals)

    def __getattr__(self, name):
        return getattr(self.ch, name)


def decode(key) -> int:
    return key.id


def test_totals_sum_per_cpu(table):
    table.add(1, 0, 2, 200)
    table.add(1, 3, 5, 500)
    table.add(2, 1, 1, 60)
    table.add(3, 2, 0, 0)
    assert Totals(CounterHash(table, decode)).read() == {1: (7, 700), 2: (1, 60)}  # 3 gained nothing


def test_keys_that_decode_alike_are_summed(table):
    table.add(1, 0, 2, 20, proto=6)
    table.add(1, 1, 3, 30, proto=17)
    assert Totals(CounterHash(table, decode)).read() == {1: (5, 50)}


def test_items_fallback_without_batch_ops(table):
    table.batch = False
    table.add(1, 2, 3, 4)
    assert Totals(CounterHash(table, decode)).read() == {1: (3, 4)}


def test_totals_monotonic_across_reads(table):
    ch = Totals(CounterHash(table, decode, idle_reads=2))
    steps = [  # adds (key, cpu, packets, bytes) before each read; totals and deleted keys after it
        ([(1, 0, 1, 100)], {1: (1, 100)}, []),
        ([(1, 1, 2, 200), (2, 0, 1, 10)], {1: (3, 300), 2: (1, 10)}, []),
        ([], {1: (3, 300), 2: (1, 10)}, []),
        ([(2, 3, 4, 40)], {1: (3, 300), 2: (5, 50)}, [1]),  # 1 unchanged for 2 reads
        ([], {1: (3, 300), 2: (5, 50)}, [1]),
        ([(1, 2, 1, 1)], {1: (4, 301), 2: (5, 50)}, [1, 2]),  # 1 recreated on top of its base
        ([], {1: (4, 301), 2: (5, 50)}, [1, 2]),
        ([(2, 0, 1, 1)], {1: (4, 301), 2: (6, 51)}, [1, 2, 1]),
        ([], {1: (4, 301), 2: (6, 51)}, [1, 2, 1]),
        ([], {1: (4, 301), 2: (6, 51)}, [1, 2, 1, 2]),
        ([], {1: (4, 301), 2: (6, 51)}, [1, 2, 1, 2]),
    ]
    previous: dict = {}
    for adds, expected, deleted in steps:
        for a in adds:
            table.add(*a)
        totals = ch.read()
        assert totals == expected
        assert [k for k, _ in table.deleted] == deleted
        for k, (p, b) in previous.items():
            assert totals[k][0] >= p and totals[k][1] >= b
        previous = totals
    assert table.values == {}


@pytest.mark.parametrize("idle_reads", [1, 2, 3, 5])
def test_idle_key_deleted_and_kept_in_totals(table, idle_reads):
    table.add(1, 0, 3, 300)
    table.add(2, 0, 1, 10)
    ch = Totals(CounterHash(table, decode, idle_reads=idle_reads))
    # The first read sees the value; each of the next idle_reads reads sees it unchanged.
    for read in range(idle_reads):
        table.add(2, 1, 1, 10)  # key 2 stays busy
        assert ch.read() == {1: (3, 300), 2: (read + 2, 10 * (read + 2))}
        assert table.deleted == []
        assert ch.entries == 2
    table.add(2, 1, 1, 10)
    assert ch.read() == {1: (3, 300), 2: (idle_reads + 2, 10 * (idle_reads + 2))}
    assert table.deleted == [(1, 6)]
    assert table.raw(1) not in table.values
    assert ch.entries == 1
    # Gone from the map, still in the totals, forever.
    for _ in range(3):
        table.add(2, 1, 1, 10)
        totals = ch.read()
        assert totals[1] == (3, 300)
    assert table.deleted == [(1, 6)]
    assert table.pops == 1


def test_increment_between_read_and_delete_is_counted(table):
    table.add(1, 0, 10, 1000)
    ch = Totals(CounterHash(table, decode, idle_reads=1))
    assert ch.read() == {1: (10, 1000)}
    # The next read sees it unchanged and deletes it; just before the delete, two more
    # packets land on another CPU.
    table.before_delete = lambda: table.add(1, 2, 2, 128)
    assert ch.read() == {1: (12, 1128)}
    table.before_delete = None
    assert table.deleted == [(1, 6)]
    assert ch.read() == {1: (12, 1128)}


def test_recreated_key_adds_on_top_of_base(table):
    table.add(7, 1, 4, 400)
    ch = Totals(CounterHash(table, decode, idle_reads=1))
    ch.read()
    assert ch.read() == {7: (4, 400)}
    assert table.deleted == [(7, 6)]
    table.add(7, 3, 1, 50)  # the kernel creates the key again, from zero
    assert ch.read() == {7: (5, 450)}
    table.add(7, 0, 2, 20)
    assert ch.read() == {7: (7, 470)}
    assert ch.read() == {7: (7, 470)}  # deleted a second time
    assert table.deleted == [(7, 6), (7, 6)]
    table.add(7, 0, 1, 1)
    assert ch.read() == {7: (8, 471)}


def test_key_already_gone_keeps_what_was_seen(table):
    table.add(1, 0, 1, 1)
    ch = Totals(CounterHash(table, decode, idle_reads=1))
    assert ch.read() == {1: (1, 1)}
    # The delete fails because the key vanished just before it: what was seen
    # stays counted, so the counter never goes backwards.
    table.before_delete = lambda: table.values.clear()
    assert ch.read() == {1: (1, 1)}
    assert table.deleted == []
    assert ch.entries == 0
    assert ch.read() == {1: (1, 1)}


def test_kernel_without_lookup_and_delete_keeps_idle_keys(table, monkeypatch):
    table.add(1, 0, 1, 1)
    ch = Totals(CounterHash(table, decode, idle_reads=1))
    ch.read()
    def unsupported(key):
        raise OSError(errno.EINVAL, "Invalid argument")  # and the key is still there

    monkeypatch.setattr(table, "pop", unsupported)
    assert ch.read() == {1: (1, 1)}
    assert ch.idle_reads == float("inf")  # stops trying
    assert ch.read() == {1: (1, 1)}


@pytest.mark.parametrize("keys, max_entries, ratio", [
    (0, 100, 0.0),
    (25, 100, 0.25),
    (100, 100, 1.0),
    (3, 0, 0.0),
])
def test_fill_ratio(keys, max_entries, ratio):
    t = FakeTable(max_entries=max_entries)
    for k in range(keys):
        t.add(k, 0, 1, 1)
    ch = Totals(CounterHash(t, decode))
    assert ch.fill_ratio == 0.0  # nothing read yet
    ch.read()
    assert ch.entries == keys
    assert ch.fill_ratio == ratio


def test_fill_ratio_drops_after_delete(table):
    table.max_entries = 4
    table.add(1, 0, 1, 1)
    table.add(2, 0, 1, 1)
    ch = Totals(CounterHash(table, decode, idle_reads=1))
    ch.read()
    assert ch.fill_ratio == 0.5
    table.add(2, 0, 1, 1)
    ch.read()  # 1 is idle and deleted; 2 changed
    assert (ch.entries, ch.fill_ratio) == (1, 0.25)


def test_read_percpu_array():
    class ArrayTable:
        max_entries = 3

        def __init__(self):
            self.cells = [Leaf(Counter(1, 10), Counter(2, 20), Counter(0, 0), Counter(0, 0)),
                          Leaf(), Leaf(Counter(0, 0), Counter(0, 0), Counter(0, 0), Counter(5, 7))]

        def __getitem__(self, index):
            assert isinstance(index, ct.c_int)
            return self.cells[index.value]

    assert read_percpu_array(ArrayTable()) == [(3, 30), (0, 0), (5, 7)]


def test_a_reader_restored_from_a_saved_one_continues_where_it_stopped(table):
    """lifecycle.keepAttached: the next agent's reader of the same (adopted) map counts only what
    came after the save, and retires idle keys as the saved reader would have."""
    table.add(1, 0, 3, 30)
    table.add(2, 1, 1, 10)
    first = CounterHash(table, decode, idle_reads=2)
    assert first.read() == {1: (3, 30), 2: (1, 10)}
    saved = first.save()
    table.add(1, 2, 2, 20)  # while no agent runs
    second = CounterHash(table, decode, idle_reads=2)
    second.restore(json.loads(json.dumps(saved)))  # as it goes through the pinned state
    assert second.entries == 2
    assert second.read() == {1: (2, 20)}
    assert second.read() == {}  # 2 unchanged for two reads, the saved reader's first counted: retired
    assert table.deleted == [(2, 6)] and second.entries == 1
    assert second.read() == {}
    assert table.deleted == [(2, 6), (1, 6)] and second.entries == 0
