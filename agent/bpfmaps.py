"""BPF maps as the agent reads them: tables with ctypes keys and values, ring
and perf buffers. The compiler process (agent/compiler.py) describes each map:
its kernel layout and the C types of its key and value, in bcc's JSON form.

Element operations are bpf(2) calls (agent/bpfsys.py); the ring and perf
buffers are consumed by libbpf (Debian's libbpf1), which bcc depends on anyway.
"""

from __future__ import annotations

import ctypes as ct
import logging
import os
from collections.abc import Callable

from agent import bpfsys

log = logging.getLogger(__name__)

HASH, ARRAY, PERF_EVENT_ARRAY, PERCPU_HASH, PERCPU_ARRAY, LRU_HASH, RINGBUF = 1, 2, 4, 5, 6, 9, 27
PERCPU = {PERCPU_HASH, PERCPU_ARRAY}
ARRAYS = {ARRAY, PERCPU_ARRAY}

_SCALARS = {
    "char": ct.c_char, "signed char": ct.c_byte, "unsigned char": ct.c_ubyte, "_Bool": ct.c_bool,
    "short": ct.c_short, "unsigned short": ct.c_ushort, "int": ct.c_int, "unsigned int": ct.c_uint,
    "long": ct.c_long, "unsigned long": ct.c_ulong, "long long": ct.c_longlong,
    "unsigned long long": ct.c_ulonglong, "__int128": ct.c_uint8 * 16, "unsigned __int128": ct.c_uint8 * 16,
    "void *": ct.c_void_p,
}


def ctype(desc):
    """The ctypes type of a C type as bcc describes it: a scalar's name, or
    [name, [[field, type], [field, type, [n]] (array), [field, type, bits]...], "struct"|"union"|"struct_packed"]."""
    if isinstance(desc, str):
        try:
            return _SCALARS[desc]
        except KeyError:
            raise ValueError(f"unknown C type {desc!r}") from None
    name, members = desc[0], desc[1]
    kind = desc[2] if len(desc) > 2 else "struct"
    fields, anonymous = [], []
    for m in members:
        field = m[0] or f"_anon{len(anonymous)}"
        if len(m) == 3 and m[2] in ("struct", "union", "struct_packed"):  # a nested type, declared in place
            fields.append((field, ctype(m)))
            if not m[0]:
                anonymous.append(field)
        elif len(m) == 3 and isinstance(m[2], list):
            fields.append((field, ctype(m[1]) * m[2][0]))
        elif len(m) == 3 and isinstance(m[2], int):
            fields.append((field, ctype(m[1]), m[2]))
        elif len(m) == 2:
            fields.append((field, ctype(m[1])))
        else:
            raise ValueError(f"cannot decode member {m!r} of {name}")
    base = ct.Union if kind == "union" else ct.Structure
    body = {"_fields_": fields, "_anonymous_": anonymous}
    if kind == "struct_packed":
        body["_pack_"] = 1
    return type(str(name) or "anon", (base,), body)


def possible_cpus() -> int:
    """The kernel's possible CPUs: how many values a per-CPU map holds per key."""
    with open("/sys/devices/system/cpu/possible") as f:
        last = 0
        for part in f.read().strip().split(","):
            last = max(last, int(part.split("-")[-1]))
    return last + 1


def _per_cpu(leaf, cpus: int):
    """A per-CPU value as the kernel hands it: each CPU's copy rounded up to 8 bytes."""
    size = ct.sizeof(leaf)
    if size % 8:
        if not issubclass(leaf, ct.Structure):
            raise ValueError(f"per-CPU values of {leaf.__name__} need padding this module does not make")
        leaf = type(leaf.__name__, (leaf,), {"_fields_": [("_pad", ct.c_uint8 * (8 - size % 8))]})
    return leaf * cpus


class Table:
    """One map's elements. A per-CPU map's value is a list with one entry per CPU."""

    def __init__(self, name: str, fd: int, spec: dict, owner=None):
        """owner: the object whose ring and perf buffers this map's open_* joins."""
        self.name = name
        self.owner = owner
        self.map_fd = fd
        self.map_type = spec["type"]
        self.max_entries = spec["max_entries"]
        self.Key = ctype(spec["key"])
        self.sLeaf = ctype(spec["leaf"])
        self.percpu = self.map_type in PERCPU
        self.Leaf = _per_cpu(self.sLeaf, possible_cpus()) if self.percpu else self.sLeaf

    def _key(self, key):
        if isinstance(key, int):
            return self.Key(key)
        if isinstance(key, self.Key):
            return key
        return self.Key.from_buffer_copy(bytes(key))

    def _value(self, leaf):
        return list(leaf) if self.percpu else leaf

    def __getitem__(self, key):
        leaf = self.Leaf()
        if not bpfsys.map_lookup(self.map_fd, self._key(key), leaf):
            raise KeyError(key)
        return self._value(leaf)

    def __setitem__(self, key, value) -> None:
        if self.percpu and isinstance(value, list):
            value = self.Leaf(*value)
        elif not isinstance(value, ct._SimpleCData | ct.Structure | ct.Union | ct.Array):
            value = self.Leaf(value)
        bpfsys.map_update(self.map_fd, self._key(key), value)

    def __delitem__(self, key) -> None:
        if not bpfsys.map_delete(self.map_fd, self._key(key)):
            raise KeyError(key)

    def pop(self, key):
        """Lookup-and-delete in one step: the value, or None if the key was gone."""
        leaf = self.Leaf()
        if bpfsys.map_lookup_and_delete(self.map_fd, self._key(key), leaf):
            return self._value(leaf)
        return None

    def keys(self) -> list:
        if self.map_type in ARRAYS:
            return [self.Key(i) for i in range(self.max_entries)]
        keys, prev = [], None
        while True:
            nxt = self.Key()
            if not bpfsys.map_next_key(self.map_fd, prev, nxt):
                return keys
            keys.append(nxt)
            prev = nxt

    def items(self) -> list:
        """Every (key, value) there is, one element at a time (keys deleted meanwhile are left out)."""
        out = []
        for key in self.keys():
            try:
                out.append((key, self[key]))
            except KeyError:
                pass
        return out

    def values(self) -> list:
        return [v for _, v in self.items()]

    def items_lookup_batch(self) -> list:
        """Every (key, value) there is, read in batches: far fewer syscalls than items()."""
        batch = max(1, min(self.max_entries, 4096))
        keys, leaves = (self.Key * batch)(), (self.Leaf * batch)()
        token_in, token_out = None, ct.create_string_buffer(max(8, ct.sizeof(self.Key)))  # an opaque cookie
        out = []
        while True:
            n, last = bpfsys.map_lookup_batch(self.map_fd, keys, leaves, batch, token_in, token_out)
            out += [(self.Key.from_buffer_copy(keys[i]), self._value(self.Leaf.from_buffer_copy(leaves[i])))
                    for i in range(n)]
            if last:
                return out
            token_in, token_out = token_out, ct.create_string_buffer(len(token_out))


    def open_ring_buffer(self, callback: Callable) -> None:
        """callback(ctx, data, size) for each record, on the owner's ring_buffer_consume()."""
        self.owner.rings.open(self.map_fd, callback)

    def open_perf_buffer(self, callback: Callable, page_cnt: int = 8, lost_cb: Callable | None = None) -> None:
        """callback(cpu, data, size) for each record, on the owner's perf_buffer_poll()."""
        self.owner.perf_buffers.append(PerfBuffer(self.map_fd, callback, page_cnt, lost_cb))


# -- ring and perf buffers (libbpf) ----------------------------------------------

_RING_CB = ct.CFUNCTYPE(ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_size_t)
_PERF_CB = ct.CFUNCTYPE(None, ct.c_void_p, ct.c_int, ct.c_void_p, ct.c_uint32)
_LOST_CB = ct.CFUNCTYPE(None, ct.c_void_p, ct.c_int, ct.c_uint64)
_libbpf = None


def libbpf():
    global _libbpf
    if _libbpf is None:
        lib = ct.CDLL("libbpf.so.1", use_errno=True)
        lib.ring_buffer__new.restype = ct.c_void_p
        lib.ring_buffer__new.argtypes = [ct.c_int, _RING_CB, ct.c_void_p, ct.c_void_p]
        lib.ring_buffer__add.argtypes = [ct.c_void_p, ct.c_int, _RING_CB, ct.c_void_p]
        lib.ring_buffer__consume.argtypes = [ct.c_void_p]
        lib.ring_buffer__free.argtypes = [ct.c_void_p]
        lib.perf_buffer__new.restype = ct.c_void_p
        lib.perf_buffer__new.argtypes = [ct.c_int, ct.c_size_t, _PERF_CB, _LOST_CB, ct.c_void_p, ct.c_void_p]
        lib.perf_buffer__poll.argtypes = [ct.c_void_p, ct.c_int]
        lib.perf_buffer__free.argtypes = [ct.c_void_p]
        lib.libbpf_get_error.argtypes = [ct.c_void_p]
        lib.libbpf_get_error.restype = ct.c_long
        _libbpf = lib
    return _libbpf


class RingBuffers:
    """Every ring buffer of one object, consumed together (libbpf's ring_buffer)."""

    def __init__(self):
        self._rb = None
        self._callbacks = []  # the C callbacks must live as long as the ring buffer

    def open(self, fd: int, callback: Callable) -> None:
        """callback(ctx, data, size), as bcc calls it; its return value is ignored."""
        cb = _RING_CB(lambda ctx, data, size: (callback(ctx, data, size), 0)[1])
        self._callbacks.append(cb)
        lib = libbpf()
        if self._rb is None:
            rb = lib.ring_buffer__new(fd, cb, None, None)
            if not rb:
                raise OSError(ct.get_errno(), f"ring_buffer__new: {os.strerror(ct.get_errno())}")
            self._rb = rb
        elif lib.ring_buffer__add(self._rb, fd, cb, None) != 0:
            raise OSError(ct.get_errno(), f"ring_buffer__add: {os.strerror(ct.get_errno())}")

    def consume(self) -> None:
        if self._rb is not None:
            libbpf().ring_buffer__consume(self._rb)

    def close(self) -> None:
        if self._rb is not None:
            libbpf().ring_buffer__free(self._rb)
            self._rb = None


class PerfBuffer:
    """A BPF_PERF_OUTPUT map's per-CPU buffers (libbpf's perf_buffer)."""

    def __init__(self, fd: int, callback: Callable, page_cnt: int, lost_cb: Callable | None):
        """callback(cpu, data, size) and lost_cb(count), as bcc calls them."""
        self._cb = _PERF_CB(lambda _ctx, cpu, data, size: callback(cpu, data, size))
        self._lost = _LOST_CB(lambda _ctx, _cpu, n: lost_cb(n) if lost_cb else None)
        lib = libbpf()
        pb = lib.perf_buffer__new(fd, page_cnt, self._cb, self._lost, None, None)
        if not pb or lib.libbpf_get_error(pb):
            raise OSError(ct.get_errno(), f"perf_buffer__new: {os.strerror(ct.get_errno())}")
        self._pb = pb

    def poll(self, timeout_ms: int) -> None:
        if self._pb is not None:
            libbpf().perf_buffer__poll(self._pb, timeout_ms)

    def close(self) -> None:
        if self._pb is not None:
            libbpf().perf_buffer__free(self._pb)
            self._pb = None
