"""The bpf(2) and perf_event_open(2) commands the agent makes itself: maps and
their elements, program loads, links (tcx, tracepoints), pins, object info.
The agent never loads bcc (its LLVM is the compiler process's, agent/compiler.py).

Each `union bpf_attr` layout below is the part of include/uapi/linux/bpf.h
that its command reads; the kernel wants the rest zeroed.
"""

from __future__ import annotations

import ctypes as ct
import errno
import os
import platform

_SYS_BPF = {"x86_64": 321, "aarch64": 280}
_SYS_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241}

MAP_CREATE, MAP_LOOKUP_ELEM, MAP_UPDATE_ELEM, MAP_DELETE_ELEM, MAP_GET_NEXT_KEY = 0, 1, 2, 3, 4
PROG_LOAD = 5
OBJ_PIN, OBJ_GET = 6, 7
MAP_LOOKUP_AND_DELETE_ELEM = 21
MAP_LOOKUP_BATCH = 24
PROG_GET_FD_BY_ID = 13
OBJ_GET_INFO_BY_FD = 15
PROG_QUERY = 16
LINK_CREATE, LINK_UPDATE = 28, 29
LINK_GET_FD_BY_ID = 30
LINK_DETACH = 34

MAP_TYPE_ARRAY = 2
PROG_TYPE_SCHED_CLS, PROG_TYPE_TRACEPOINT = 3, 5
ATTACH_PERF_EVENT = 41


class _Attr(ct.Structure):
    """Base: every command's attr is padded to 128 bytes (zeroes past its fields)."""


def _attr(fields):
    size = sum(ct.sizeof(t) for _, t in fields)
    return type("Attr", (_Attr,), {"_fields_": [*fields, ("rest", ct.c_uint8 * (128 - size))]})


_MapCreate = _attr([("map_type", ct.c_uint32), ("key_size", ct.c_uint32), ("value_size", ct.c_uint32),
                    ("max_entries", ct.c_uint32), ("map_flags", ct.c_uint32), ("inner_map_fd", ct.c_uint32),
                    ("numa_node", ct.c_uint32), ("map_name", ct.c_char * 16)])
_MapElem = _attr([("map_fd", ct.c_uint32), ("pad", ct.c_uint32), ("key", ct.c_uint64), ("value", ct.c_uint64),
                  ("flags", ct.c_uint64)])
_Batch = _attr([("in_batch", ct.c_uint64), ("out_batch", ct.c_uint64), ("keys", ct.c_uint64),
                ("values", ct.c_uint64), ("count", ct.c_uint32), ("map_fd", ct.c_uint32),
                ("elem_flags", ct.c_uint64), ("flags", ct.c_uint64)])
_ProgLoad = _attr([("prog_type", ct.c_uint32), ("insn_cnt", ct.c_uint32), ("insns", ct.c_uint64),
                   ("license", ct.c_uint64), ("log_level", ct.c_uint32), ("log_size", ct.c_uint32),
                   ("log_buf", ct.c_uint64), ("kern_version", ct.c_uint32), ("prog_flags", ct.c_uint32),
                   ("prog_name", ct.c_char * 16)])
_PerfLink = _attr([("prog_fd", ct.c_uint32), ("target_fd", ct.c_uint32), ("attach_type", ct.c_uint32),
                   ("flags", ct.c_uint32), ("bpf_cookie", ct.c_uint64)])
_Obj = _attr([("pathname", ct.c_uint64), ("bpf_fd", ct.c_uint32), ("file_flags", ct.c_uint32)])
_InfoByFd = _attr([("bpf_fd", ct.c_uint32), ("info_len", ct.c_uint32), ("info", ct.c_uint64)])
_Id = _attr([("id", ct.c_uint32)])
_LinkUpdate = _attr([("link_fd", ct.c_uint32), ("new_prog_fd", ct.c_uint32), ("flags", ct.c_uint32),
                     ("old_prog_fd", ct.c_uint32)])


class MapInfo(ct.Structure):
    """struct bpf_map_info, the fields that say whether two maps have one layout."""
    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("key_size", ct.c_uint32), ("value_size", ct.c_uint32),
                ("max_entries", ct.c_uint32), ("map_flags", ct.c_uint32), ("name", ct.c_char * 16),
                ("rest", ct.c_uint8 * 56)]


class LinkInfo(ct.Structure):
    """struct bpf_link_info, read for tcx links (the union: ifindex, attach_type)."""
    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("prog_id", ct.c_uint32), ("pad", ct.c_uint32),
                ("ifindex", ct.c_uint32), ("attach_type", ct.c_uint32), ("rest", ct.c_uint8 * 48)]


class ProgInfo(ct.Structure):
    """struct bpf_prog_info, up to the program's name."""
    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("tag", ct.c_uint8 * 8), ("lens", ct.c_uint32 * 2),
                ("insns", ct.c_uint64 * 2), ("load_time", ct.c_uint64), ("created_by_uid", ct.c_uint32),
                ("nr_map_ids", ct.c_uint32), ("map_ids", ct.c_uint64), ("name", ct.c_char * 16)]


_libc = ct.CDLL(None, use_errno=True)


def bpf(cmd: int, attr: ct.Structure) -> int:
    nr = _SYS_BPF.get(platform.machine())
    if nr is None:
        raise OSError(errno.ENOSYS, f"bpf(2) syscall number unknown on {platform.machine()}")
    ret = _libc.syscall(ct.c_long(nr), ct.c_int(cmd), ct.byref(attr), ct.c_uint(ct.sizeof(attr)))
    if ret < 0:
        e = ct.get_errno()
        raise OSError(e, os.strerror(e))
    return ret


def map_create(map_type: int, key_size: int, value_size: int, entries: int, flags: int, name: bytes) -> int:
    return bpf(MAP_CREATE, _MapCreate(map_type=map_type, key_size=key_size, value_size=value_size,
                                      max_entries=entries, map_flags=flags, map_name=name[:15]))


def _elem(cmd: int, fd: int, key, value=None, flags: int = 0) -> None:
    bpf(cmd, _MapElem(map_fd=fd, key=ct.addressof(key) if key is not None else 0,
                      value=ct.addressof(value) if value is not None else 0, flags=flags))


def _elem_found(cmd: int, fd: int, key, value=None) -> bool:
    """An element command; False where the kernel says there is no such key (ENOENT)."""
    try:
        _elem(cmd, fd, key, value)
        return True
    except OSError as e:
        if e.errno == errno.ENOENT:
            return False
        raise


def map_lookup(fd: int, key, value) -> bool:
    """Fill value (a ctypes object) with key's; False if there is no such key."""
    return _elem_found(MAP_LOOKUP_ELEM, fd, key, value)


def map_update(fd: int, key, value) -> None:
    _elem(MAP_UPDATE_ELEM, fd, key, value)


def map_delete(fd: int, key) -> bool:
    """False if there was no such key."""
    return _elem_found(MAP_DELETE_ELEM, fd, key)


def map_lookup_and_delete(fd: int, key, value) -> bool:
    """Take key's value and delete it in one step; False if there was no such key."""
    return _elem_found(MAP_LOOKUP_AND_DELETE_ELEM, fd, key, value)


def map_next_key(fd: int, key, next_key) -> bool:
    """The key after `key` (None: the first) into next_key; False past the last."""
    return _elem_found(MAP_GET_NEXT_KEY, fd, key, next_key)


def map_lookup_batch(fd: int, keys, values, count: int, token=None, token_out=None) -> tuple[int, bool]:
    """One batch of up to `count` entries into the keys/values arrays, continuing after
    `token` (None: from the start); returns (entries read, whether that was the last batch)."""
    attr = _Batch(in_batch=ct.addressof(token) if token is not None else 0, out_batch=ct.addressof(token_out),
                  keys=ct.addressof(keys), values=ct.addressof(values), count=count, map_fd=fd)
    try:
        bpf(MAP_LOOKUP_BATCH, attr)
        return attr.count, False
    except OSError as e:
        if e.errno == errno.ENOENT:  # the last batch (possibly empty)
            return attr.count, True
        raise


def prog_load(prog_type: int, name: bytes, insns: bytes, license: bytes = b"GPL") -> int:
    """Load a program; OSError with the verifier's last lines when it is refused."""
    code, lic = ct.create_string_buffer(insns, len(insns)), ct.create_string_buffer(license)
    attr = _ProgLoad(prog_type=prog_type, insn_cnt=len(insns) // 8, insns=ct.addressof(code),
                     license=ct.addressof(lic), prog_name=name[:15])
    try:
        return bpf(PROG_LOAD, attr)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EINVAL):
            raise
        log = ct.create_string_buffer(1 << 20)  # load again to have the verifier say why
        attr.log_level, attr.log_size, attr.log_buf = 1, len(log), ct.addressof(log)
        try:
            return bpf(PROG_LOAD, attr)
        except OSError as e2:
            lines = [ln for ln in log.value.decode(errors="replace").splitlines() if ln.strip()]
            raise OSError(e2.errno, f"{e2.strerror}: {' / '.join(lines[-3:])}") from None


class _PerfEventAttr(ct.Structure):
    """struct perf_event_attr up to wakeup_events (the kernel reads `size` bytes)."""
    _fields_ = [("type", ct.c_uint32), ("size", ct.c_uint32), ("config", ct.c_uint64),
                ("sample_period", ct.c_uint64), ("sample_type", ct.c_uint64), ("read_format", ct.c_uint64),
                ("flags", ct.c_uint64), ("wakeup_events", ct.c_uint32), ("bp_type", ct.c_uint32),
                ("config1", ct.c_uint64)]


_PERF_TYPE_TRACEPOINT = 2
_PERF_FLAG_FD_CLOEXEC = 8


def tracepoint_link(prog_fd: int, tracepoint_id: int) -> int:
    """Attach a tracepoint program through a bpf link (on CPU 0's perf event, which
    fires for every CPU as tracepoints do); returns the link's fd."""
    nr = _SYS_PERF_EVENT_OPEN.get(platform.machine())
    if nr is None:
        raise OSError(errno.ENOSYS, f"perf_event_open(2) syscall number unknown on {platform.machine()}")
    attr = _PerfEventAttr(type=_PERF_TYPE_TRACEPOINT, size=ct.sizeof(_PerfEventAttr), config=tracepoint_id,
                          sample_period=1, wakeup_events=1)
    pfd = _libc.syscall(ct.c_long(nr), ct.byref(attr), ct.c_int(-1), ct.c_int(0), ct.c_int(-1),
                        ct.c_ulong(_PERF_FLAG_FD_CLOEXEC))
    if pfd < 0:
        e = ct.get_errno()
        raise OSError(e, f"perf_event_open: {os.strerror(e)}")
    try:  # the link holds the perf event: ours can go
        return bpf(LINK_CREATE, _PerfLink(prog_fd=prog_fd, target_fd=pfd, attach_type=ATTACH_PERF_EVENT))
    finally:
        os.close(pfd)


def pin(fd: int, path: str) -> None:
    p = ct.create_string_buffer(path.encode())
    bpf(OBJ_PIN, _Obj(pathname=ct.addressof(p), bpf_fd=fd))


def get_pinned(path: str) -> int:
    """A new fd of the object pinned at path; OSError(ENOENT) when nothing is."""
    p = ct.create_string_buffer(path.encode())
    return bpf(OBJ_GET, _Obj(pathname=ct.addressof(p)))


def map_info(fd: int) -> MapInfo:
    info = MapInfo()
    bpf(OBJ_GET_INFO_BY_FD, _InfoByFd(bpf_fd=fd, info_len=ct.sizeof(info), info=ct.addressof(info)))
    return info


def link_info(fd: int) -> LinkInfo:
    info = LinkInfo()
    bpf(OBJ_GET_INFO_BY_FD, _InfoByFd(bpf_fd=fd, info_len=ct.sizeof(info), info=ct.addressof(info)))
    return info


def prog_info(fd: int) -> ProgInfo:
    info = ProgInfo()
    bpf(OBJ_GET_INFO_BY_FD, _InfoByFd(bpf_fd=fd, info_len=ct.sizeof(info), info=ct.addressof(info)))
    return info


def prog_info_by_id(prog_id: int) -> ProgInfo:
    fd = bpf(PROG_GET_FD_BY_ID, _Id(id=prog_id))
    try:
        return prog_info(fd)
    finally:
        os.close(fd)


def prog_name(prog_id: int) -> str:
    return prog_info_by_id(prog_id).name.decode(errors="replace")


def link_detach(link_id: int) -> None:
    """Detach a link whoever holds it (its holders keep a defunct link)."""
    fd = bpf(LINK_GET_FD_BY_ID, _Id(id=link_id))
    try:
        bpf(LINK_DETACH, _Id(id=fd))
    finally:
        os.close(fd)


def link_update(link_fd: int, prog_fd: int) -> None:
    """Swap the link's program in one step: no packet passes between the two."""
    bpf(LINK_UPDATE, _LinkUpdate(link_fd=link_fd, new_prog_fd=prog_fd))


def array_create(value_size: int, entries: int, name: bytes) -> int:
    return map_create(MAP_TYPE_ARRAY, 4, value_size, entries, 0, name)


def array_set(fd: int, index: int, value: bytes) -> None:
    map_update(fd, ct.c_uint32(index), ct.create_string_buffer(value, len(value)))


def array_get(fd: int, index: int, value_size: int) -> bytes:
    v = ct.create_string_buffer(value_size)
    _elem(MAP_LOOKUP_ELEM, fd, ct.c_uint32(index), v)  # an index in range is always there
    return v.raw
