"""The few bpf(2) commands bcc has no Python helper for: tcx links, pins, map info.

Each `union bpf_attr` layout below is the part of include/uapi/linux/bpf.h
that its command reads; the kernel wants the rest zeroed.
"""

from __future__ import annotations

import ctypes as ct
import errno
import os
import platform

_SYS_BPF = {"x86_64": 321, "aarch64": 280}

MAP_CREATE, MAP_LOOKUP_ELEM, MAP_UPDATE_ELEM = 0, 1, 2
OBJ_PIN, OBJ_GET = 6, 7
PROG_GET_FD_BY_ID = 13
OBJ_GET_INFO_BY_FD = 15
PROG_QUERY = 16
LINK_CREATE, LINK_UPDATE = 28, 29
LINK_GET_FD_BY_ID = 30
LINK_DETACH = 34

MAP_TYPE_ARRAY = 2


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


def prog_name(prog_id: int) -> str:
    fd = bpf(PROG_GET_FD_BY_ID, _Id(id=prog_id))
    try:
        info = ProgInfo()
        bpf(OBJ_GET_INFO_BY_FD, _InfoByFd(bpf_fd=fd, info_len=ct.sizeof(info), info=ct.addressof(info)))
        return info.name.decode(errors="replace")
    finally:
        os.close(fd)


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
    return bpf(MAP_CREATE, _MapCreate(map_type=MAP_TYPE_ARRAY, key_size=4, value_size=value_size,
                                      max_entries=entries, map_name=name))


def array_set(fd: int, index: int, value: bytes) -> None:
    k, v = ct.c_uint32(index), ct.create_string_buffer(value, len(value))
    bpf(MAP_UPDATE_ELEM, _MapElem(map_fd=fd, key=ct.addressof(k), value=ct.addressof(v)))


def array_get(fd: int, index: int, value_size: int) -> bytes:
    k, v = ct.c_uint32(index), ct.create_string_buffer(value_size)
    bpf(MAP_LOOKUP_ELEM, _MapElem(map_fd=fd, key=ct.addressof(k), value=ct.addressof(v)))
    return v.raw
