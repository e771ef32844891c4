"""A small reader for the kernel's BTF (/sys/kernel/btf/vmlinux).

The headers we compile against are not the running kernel's, so the layout of
kernel-internal structs (sk_buff, skb_shared_info) is read from the running
kernel's BTF and handed to the C code as -D flags. Only what the agent needs
is implemented: struct/union member offsets (also through anonymous members),
type sizes and enum values.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from agent.errors import FoveaError

BTF_MAGIC = 0xEB9F

# Kinds (include/uapi/linux/btf.h).
INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT = range(1, 12)
FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = range(12, 20)

_MODIFIERS = {TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG}
# Bytes that follow the 12-byte common header, per kind: (fixed, per vlen item).
_TRAILER = {
    INT: (4, 0), ARRAY: (12, 0), STRUCT: (0, 12), UNION: (0, 12), ENUM: (0, 8),
    FUNC_PROTO: (0, 8), VAR: (4, 0), DATASEC: (0, 12), DECL_TAG: (4, 0), ENUM64: (0, 12),
}


@dataclass(frozen=True)
class Member:
    """Where a member lives, relative to the start of the outermost struct."""

    offset: int  # bytes
    size: int  # bytes
    bit_offset: int = 0  # within the byte, for bitfields
    bitfield_size: int = 0  # 0 unless a bitfield


@dataclass(frozen=True)
class _Type:
    kind: int
    name: str
    vlen: int
    kind_flag: bool
    size_or_type: int
    pos: int  # where the trailer starts in the type section


class BTF:
    def __init__(self, data: bytes):
        if len(data) < 24:
            raise FoveaError("BTF data is truncated", "check /sys/kernel/btf/vmlinux")
        magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
        if magic != BTF_MAGIC:
            raise FoveaError("not BTF data (bad magic)", "check /sys/kernel/btf/vmlinux")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
        self._types_raw = data[hdr_len + type_off : hdr_len + type_off + type_len]
        self._strings = data[hdr_len + str_off : hdr_len + str_off + str_len]
        self._starts: list[int] = [-1]  # type id -> where its record starts (id 0 is void)
        self._by_name: dict[str, list[int]] = {}
        self._parse()

    @classmethod
    def from_file(cls, path: str | Path = "/sys/kernel/btf/vmlinux") -> "BTF":
        try:
            return cls(Path(path).read_bytes())
        except FileNotFoundError:
            raise FoveaError(
                f"no BTF at {path}: this kernel was built without CONFIG_DEBUG_INFO_BTF",
                "run on a kernel with BTF (most distribution kernels since 5.4 have it)",
            ) from None

    def _str(self, off: int) -> str:
        end = self._strings.index(b"\0", off)
        return self._strings[off:end].decode()

    def _parse(self) -> None:
        """Index every type: where its record starts, and the named structs, unions and enums.
        A _Type is made only for the few types a lookup visits: the kernel has ~100,000."""
        raw, pos, unpack, starts = self._types_raw, 0, struct.unpack_from, self._starts
        named = (STRUCT, UNION, ENUM, ENUM64)
        while pos < len(raw):
            name_off, info = unpack("<II", raw, pos)
            kind = (info >> 24) & 0x1F
            fixed, per_item = _TRAILER.get(kind, (0, 0))
            starts.append(pos)
            if name_off and kind in named:
                self._by_name.setdefault(self._str(name_off), []).append(len(starts) - 1)
            pos += 12 + fixed + per_item * (info & 0xFFFF)

    def _find(self, name: str, kinds: tuple[int, ...]) -> _Type:
        for tid in self._by_name.get(name, []):
            t = self._type(tid)
            if t.kind in kinds and (t.vlen or t.size_or_type):  # skip empty forward-ish copies
                return t
        kind = "enum" if ENUM in kinds else "struct"
        raise FoveaError(f"{kind} {name} is not in the kernel's BTF", "this kernel is not supported")

    def _type(self, tid: int) -> _Type | None:
        if not 0 <= tid < len(self._starts):
            raise FoveaError(f"BTF type id {tid} is out of range", "the BTF data is corrupt")
        if tid == 0:
            return None  # void
        pos = self._starts[tid]
        name_off, info, size_or_type = struct.unpack_from("<III", self._types_raw, pos)
        return _Type((info >> 24) & 0x1F, self._str(name_off), info & 0xFFFF, bool(info >> 31), size_or_type, pos + 12)

    def _resolve(self, tid: int) -> _Type | None:
        """Follow typedef/const/volatile/... to the underlying type."""
        t = self._type(tid)
        for _ in range(32):  # real chains are short; a cycle means corrupt data
            if t is None or t.kind not in _MODIFIERS:
                return t
            t = self._type(t.size_or_type)
        raise FoveaError(f"BTF type {tid} is a cycle of modifiers", "the BTF data is corrupt")

    def type_size(self, tid: int, depth: int = 0) -> int:
        if depth > 32:
            raise FoveaError("BTF array types nest too deep", "the BTF data is corrupt")
        t = self._resolve(tid)
        if t is None:
            return 0
        if t.kind in (INT, STRUCT, UNION, ENUM, ENUM64, FLOAT, DATASEC):
            return t.size_or_type
        if t.kind == PTR:
            return 8
        if t.kind == ARRAY:
            elem, _index, nelems = struct.unpack_from("<III", self._types_raw, t.pos)
            return self.type_size(elem, depth + 1) * nelems
        return 0

    def _members(self, t: _Type):
        for i in range(t.vlen):
            name_off, tid, off = struct.unpack_from("<III", self._types_raw, t.pos + 12 * i)
            if t.kind_flag:
                yield self._str(name_off), tid, off & 0xFFFFFF, off >> 24
            else:
                yield self._str(name_off), tid, off, 0

    def _lookup(self, t: _Type, name: str, base_bits: int, depth: int = 0) -> tuple[Member, int] | None:
        """(where, type id) of member `name`, searching anonymous members too."""
        anonymous = []
        for mname, tid, bits, bf_size in self._members(t):
            if mname == name:
                total = base_bits + bits
                return Member(total // 8, self.type_size(tid), total % 8, bf_size), tid
            if not mname:
                anonymous.append((tid, bits))
        if depth > 32:
            raise FoveaError("BTF anonymous members nest too deep", "the BTF data is corrupt")
        for tid, bits in anonymous:
            inner = self._resolve(tid)
            if inner is not None and inner.kind in (STRUCT, UNION):
                found = self._lookup(inner, name, base_bits + bits, depth + 1)
                if found is not None:
                    return found
        return None

    def member(self, struct_name: str, path: str) -> Member:
        """Where `path` ("a" or "a.b") lives in struct/union `struct_name`."""
        t: _Type | None = self._find(struct_name, (STRUCT, UNION))
        bits = 0
        for part in path.split("."):
            found = self._lookup(t, part, bits) if t and t.kind in (STRUCT, UNION) else None
            if found is None:
                raise FoveaError(
                    f"struct {struct_name} has no member {path} in this kernel's BTF",
                    "this kernel is not supported",
                )
            where, tid = found
            bits = where.offset * 8 + where.bit_offset
            t = self._resolve(tid)
        return where

    def enum(self, name: str) -> dict[int, str]:
        """Values -> names of an enum (kind_flag set: signed values)."""
        t = self._find(name, (ENUM, ENUM64))
        out = {}
        for i in range(t.vlen):
            if t.kind == ENUM:
                name_off, val = struct.unpack_from("<Ii" if t.kind_flag else "<II", self._types_raw, t.pos + 8 * i)
            else:
                name_off, lo, hi = struct.unpack_from("<III", self._types_raw, t.pos + 12 * i)
                val = (hi << 32) | lo
                if t.kind_flag and val >= 1 << 63:
                    val -= 1 << 64
            out[val] = self._str(name_off)
        return out
