"""agent/kernel/btf.py against synthetic BTF blobs, and against this kernel's BTF.

The blobs are encoded by hand following include/uapi/linux/btf.h: a 24-byte
header (magic 0xeB9F, version 1, flags 0, hdr_len, type_off, type_len,
str_off, str_len), then the type section (12-byte `struct btf_type` records,
each followed by its kind's trailer), then the string section.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from agent.errors import FoveaError
from agent.kernel import btf as btf_mod
from agent.kernel.btf import BTF, Member

# Kinds, written out here rather than imported so the test checks the module's numbering.
INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT = range(1, 12)
FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = range(12, 20)


class BTFBuilder:
    """Encodes BTF type by type; each add returns the new type's id (void is 0)."""

    def __init__(self):
        self.strings = bytearray(b"\0")
        self.types = bytearray()
        self.next_id = 1

    def _str(self, name: str) -> int:
        if not name:
            return 0
        off = len(self.strings)
        self.strings += name.encode() + b"\0"
        return off

    def _add(self, name, kind, vlen=0, kind_flag=False, size_or_type=0, trailer=b"") -> int:
        info = (int(kind_flag) << 31) | (kind << 24) | vlen
        self.types += struct.pack("<III", self._str(name), info, size_or_type) + trailer
        tid = self.next_id
        self.next_id += 1
        return tid

    # Kinds with a trailer.
    def int_(self, name: str, size: int, signed: bool = False) -> int:
        encoding = 1 if signed else 0  # BTF_INT_SIGNED
        return self._add(name, INT, size_or_type=size,
                         trailer=struct.pack("<I", (encoding << 24) | (size * 8)))

    def array(self, elem: int, nelems: int, index: int) -> int:
        return self._add("", ARRAY, trailer=struct.pack("<III", elem, index, nelems))

    def struct(self, name, size, members, kind_flag=False, union=False) -> int:
        """members: (name, type id, bit offset[, bitfield size])."""
        trailer = b""
        for m in members:
            mname, tid, bits, bf = (*m, 0) if len(m) == 3 else m
            off = (bf << 24) | bits if kind_flag else bits
            trailer += struct.pack("<III", self._str(mname), tid, off)
        return self._add(name, UNION if union else STRUCT, len(members), kind_flag, size, trailer)

    def enum(self, name, values: dict[str, int], size=4, signed=False) -> int:
        trailer = b"".join(
            struct.pack("<Ii" if signed else "<II", self._str(n), v) for n, v in values.items()
        )
        return self._add(name, ENUM, len(values), signed, size, trailer)

    def enum64(self, name, values: dict[str, int], signed=False) -> int:
        trailer = b""
        for n, v in values.items():
            v &= (1 << 64) - 1
            trailer += struct.pack("<III", self._str(n), v & 0xFFFFFFFF, v >> 32)
        return self._add(name, ENUM64, len(values), signed, 8, trailer)

    def func_proto(self, ret: int, params: list[tuple[str, int]]) -> int:
        trailer = b"".join(struct.pack("<II", self._str(n), t) for n, t in params)
        return self._add("", FUNC_PROTO, len(params), size_or_type=ret, trailer=trailer)

    def var(self, name: str, tid: int, linkage: int = 1) -> int:
        return self._add(name, VAR, size_or_type=tid, trailer=struct.pack("<I", linkage))

    def datasec(self, name: str, size: int, vars_: list[tuple[int, int, int]]) -> int:
        trailer = b"".join(struct.pack("<III", *v) for v in vars_)
        return self._add(name, DATASEC, len(vars_), size_or_type=size, trailer=trailer)

    def decl_tag(self, name: str, tid: int, component_idx: int = -1) -> int:
        return self._add(name, DECL_TAG, size_or_type=tid, trailer=struct.pack("<i", component_idx))

    # Kinds without a trailer.
    def ptr(self, tid: int) -> int:
        return self._add("", PTR, size_or_type=tid)

    def typedef(self, name: str, tid: int) -> int:
        return self._add(name, TYPEDEF, size_or_type=tid)

    def const(self, tid: int) -> int:
        return self._add("", CONST, size_or_type=tid)

    def volatile(self, tid: int) -> int:
        return self._add("", VOLATILE, size_or_type=tid)

    def restrict(self, tid: int) -> int:
        return self._add("", RESTRICT, size_or_type=tid)

    def type_tag(self, name: str, tid: int) -> int:
        return self._add(name, TYPE_TAG, size_or_type=tid)

    def fwd(self, name: str, union: bool = False) -> int:
        return self._add(name, FWD, kind_flag=union)

    def func(self, name: str, proto: int) -> int:
        return self._add(name, FUNC, vlen=1, size_or_type=proto)  # vlen: linkage

    def float_(self, name: str, size: int) -> int:
        return self._add(name, FLOAT, size_or_type=size)

    def blob(self, magic: int = 0xEB9F, hdr_len: int = 24) -> bytes:
        types, strings = bytes(self.types), bytes(self.strings)
        hdr = struct.pack("<HBBIIIII", magic, 1, 0, hdr_len, 0, len(types), len(types), len(strings))
        hdr += b"\0" * (hdr_len - 24)
        return hdr + types + strings


@pytest.fixture(scope="module")
def kernelish() -> BTF:
    """A BTF with the shapes the agent meets in vmlinux."""
    b = BTFBuilder()
    u8 = b.int_("unsigned char", 1)
    u16 = b.int_("unsigned short", 2)
    u32 = b.int_("unsigned int", 4)
    u64 = b.int_("long long unsigned int", 8)
    s32 = b.int_("int", 4, signed=True)
    # Kinds the reader must skip over correctly (each has its own trailer length).
    proto = b.func_proto(s32, [("a", u32), ("b", u64), ("", 0)])
    b.func("do_thing", proto)
    v = b.var("some_var", u32)
    b.datasec(".data", 4, [(v, 0, 4)])
    b.float_("double", 8)
    b.fwd("sock")
    b.fwd("opaque", union=True)
    # typedef / const chains: typedef __u32 __be32; const volatile __be32.
    t__u8 = b.typedef("__u8", u8)
    t__u16 = b.typedef("__u16", u16)
    t__u32 = b.typedef("__u32", u32)
    t__be32 = b.typedef("__be32", t__u32)
    cv_be32 = b.const(b.volatile(t__be32))
    restrict_u64 = b.restrict(b.type_tag("user", u64))
    # Arrays: char cb[48]; __u16 ports[3]; __u32 grid[4][3].
    cb = b.array(u8, 48, u32)
    ports = b.array(t__u16, 3, u32)
    grid = b.array(b.array(u32, 3, u32), 4, u32)
    # An empty forward-ish copy of "pkt" before the real one: must be skipped.
    empty_pkt = b.struct("pkt", 0, [])
    pkt_ptr = b.ptr(empty_pkt + 3)  # points at the real struct, defined just below
    void_ptr = b.ptr(0)
    pkt = b.struct("pkt", 128, [
        ("len", u32, 0),
        ("proto", t__u16, 32),
        ("flags", u8, 48),
        ("stamp", u64, 64),
        ("next", pkt_ptr, 128),
        ("priv", void_ptr, 192),
        ("addr", cv_be32, 256),
        ("cb", cb, 288),
        ("ports", ports, 672),
        ("grid", grid, 720),
        ("user_ptr", restrict_u64, 768 + 128),
    ])
    assert pkt == empty_pkt + 3
    b.decl_tag("tagged", pkt, 0)
    # struct outer { u64 a; struct { u32 pad; union { u32 x;
    #                struct { u16 lo; u16 hi; }; }; }; }   (all three levels anonymous)
    lohi = b.struct("", 4, [("lo", u16, 0), ("hi", u16, 16)])
    anon_union = b.struct("", 4, [("x", u32, 0), ("", lohi, 0)], union=True)
    anon_struct = b.struct("", 12, [("pad", u32, 0), ("", anon_union, 64)])
    b.struct("outer", 32, [("a", u64, 0), ("", anon_struct, 128), ("tail", u8, 224)])
    # Bitfields, kind_flag set: bit offset in the low 24 bits, size in the high 8.
    b.struct("flags", 131080, [
        ("head", u8, 0),
        ("pkt_type", u8, 8, 3),
        ("ignore_df", u8, 11, 1),
        ("mark_bits", t__u32, 53, 11),
        ("word", u32, 64),  # a plain member in a kind_flag struct
        ("far", u32, 0x100008, 5),  # bit offset > 2**20: the size byte must not leak in
    ], kind_flag=True)
    # Nested paths: struct inner { u32 x; u16 y; union { u32 z; u16 w; }; };
    # typedef struct inner inner_t; struct holder { u64 h; inner_t in; struct inner *p; }
    z_union = b.struct("", 4, [("z", u32, 0), ("w", u16, 0)], union=True)
    inner = b.struct("inner", 12, [("x", u32, 0), ("y", t__u16, 32), ("", z_union, 64)])
    inner_t = b.typedef("inner_t", inner)
    b.struct("holder", 32, [("h", u64, 0), ("in", b.const(inner_t), 64), ("p", b.ptr(inner), 192)])
    # A union looked up by name.
    b.struct("addr_u", 16, [("v4", t__be32, 0), ("v6", b.array(t__u8, 16, u32), 0)], union=True)
    # Enums.
    b.enum("skb_drop_reason", {
        "SKB_NOT_DROPPED_YET": 0, "SKB_CONSUMED": 1, "SKB_DROP_REASON_NOT_SPECIFIED": 2,
        "SKB_DROP_REASON_NO_SOCKET": 3, "SKB_DROP_REASON_NETFILTER_DROP": 12,
    })
    b.enum("signed_enum", {"NEG": -1, "ZERO": 0, "BIG": 0x7FFFFFFF}, signed=True)
    b.enum64("wide", {"W_SMALL": 5, "W_HIGH": 1 << 40, "W_MAX": (1 << 64) - 1})
    return BTF(b.blob())


@pytest.mark.parametrize("path, expected", [
    ("len", Member(0, 4)),
    ("proto", Member(4, 2)),  # through a typedef
    ("flags", Member(6, 1)),
    ("stamp", Member(8, 8)),
    ("next", Member(16, 8)),  # pointer to struct
    ("priv", Member(24, 8)),  # void *
    ("addr", Member(32, 4)),  # const volatile typedef typedef u32
    ("cb", Member(36, 48)),  # u8[48]
    ("ports", Member(84, 6)),  # __u16[3]
    ("grid", Member(90, 48)),  # u32[4][3]
    ("user_ptr", Member(112, 8)),  # restrict type_tag u64
])
def test_plain_members(kernelish, path, expected):
    assert kernelish.member("pkt", path) == expected


@pytest.mark.parametrize("path, expected", [
    ("a", Member(0, 8)),
    ("pad", Member(16, 4)),  # in the anonymous struct at 16
    ("x", Member(24, 4)),  # anonymous struct at 16 + anonymous union at 8
    ("lo", Member(24, 2)),  # ... + anonymous struct at 0
    ("hi", Member(26, 2)),  # ... + 2
    ("tail", Member(28, 1)),
])
def test_members_through_anonymous_members(kernelish, path, expected):
    assert kernelish.member("outer", path) == expected


@pytest.mark.parametrize("path, expected", [
    ("head", Member(0, 1, 0, 0)),
    ("pkt_type", Member(1, 1, 0, 3)),
    ("ignore_df", Member(1, 1, 3, 1)),
    ("mark_bits", Member(6, 4, 5, 11)),  # bit 53 = byte 6, bit 5; typedef'd u32
    ("word", Member(8, 4, 0, 0)),
    ("far", Member(0x100008 // 8, 4, 0, 5)),
])
def test_bitfields_with_kind_flag(kernelish, path, expected):
    assert kernelish.member("flags", path) == expected


@pytest.mark.parametrize("path, expected", [
    ("in", Member(8, 12)),  # const typedef struct: the struct's size
    ("in.x", Member(8, 4)),
    ("in.y", Member(12, 2)),
    ("in.z", Member(16, 4)),  # nested path, then an anonymous union
    ("in.w", Member(16, 2)),
    ("p", Member(24, 8)),
])
def test_nested_paths(kernelish, path, expected):
    assert kernelish.member("holder", path) == expected


def test_union_by_name(kernelish):
    assert kernelish.member("addr_u", "v4") == Member(0, 4)
    assert kernelish.member("addr_u", "v6") == Member(0, 16)


def test_type_size_of_chains_and_arrays(kernelish):
    # Look types up by walking the parsed table: sizes of every named typedef.
    types = [(i, kernelish._type(i)) for i in range(len(kernelish._starts))]
    sizes = {t.name: kernelish.type_size(i) for i, t in types if t is not None and t.kind == TYPEDEF}
    assert sizes == {"__u8": 1, "__u16": 2, "__u32": 4, "__be32": 4, "inner_t": 12}
    assert kernelish.type_size(0) == 0  # void


def test_enum_values(kernelish):
    assert kernelish.enum("skb_drop_reason") == {
        0: "SKB_NOT_DROPPED_YET", 1: "SKB_CONSUMED", 2: "SKB_DROP_REASON_NOT_SPECIFIED",
        3: "SKB_DROP_REASON_NO_SOCKET", 12: "SKB_DROP_REASON_NETFILTER_DROP",
    }
    assert kernelish.enum("signed_enum") == {-1: "NEG", 0: "ZERO", 0x7FFFFFFF: "BIG"}


def test_enum64_values(kernelish):
    assert kernelish.enum("wide") == {5: "W_SMALL", 1 << 40: "W_HIGH", (1 << 64) - 1: "W_MAX"}


def test_unsigned_enum_value_above_int_max():
    """kind_flag=0 on ENUM means unsigned values (kernel >= 6.0)."""
    b = BTFBuilder()
    b.enum("u_enum", {"HIGH": 0xFFFFFFFF, "ONE": 1})
    assert BTF(b.blob()).enum("u_enum") == {0xFFFFFFFF: "HIGH", 1: "ONE"}


def test_signed_enum64_negative_value():
    """kind_flag=1 on ENUM64 means signed values."""
    b = BTFBuilder()
    b.enum64("s_enum64", {"MINUS": -2, "BIG": 1 << 40}, signed=True)
    assert BTF(b.blob()).enum("s_enum64") == {-2: "MINUS", 1 << 40: "BIG"}


def test_larger_header_is_honoured():
    b = BTFBuilder()
    u32 = b.int_("u32", 4)
    b.struct("s", 8, [("a", u32, 0), ("b", u32, 32)])
    assert BTF(b.blob(hdr_len=32)).member("s", "b") == Member(4, 4)


@pytest.mark.parametrize("call, message", [
    (lambda t: t.member("nope", "len"), "struct nope is not in the kernel's BTF"),
    (lambda t: t.member("pkt", "nope"), "struct pkt has no member nope in this kernel's BTF"),
    (lambda t: t.member("holder", "in.nope"), "struct holder has no member in.nope in this kernel's BTF"),
    (lambda t: t.member("holder", "p.x"), "struct holder has no member p.x in this kernel's BTF"),
    (lambda t: t.member("pkt", "len.x"), "struct pkt has no member len.x in this kernel's BTF"),
    (lambda t: t.member("skb_drop_reason", "x"), "struct skb_drop_reason is not in the kernel's BTF"),
    (lambda t: t.enum("nope"), "enum nope is not in the kernel's BTF"),
    (lambda t: t.enum("pkt"), "enum pkt is not in the kernel's BTF"),
])
def test_missing_things_raise(kernelish, call, message):
    with pytest.raises(FoveaError) as exc:
        call(kernelish)
    assert exc.value.problem == message
    assert exc.value.hint == "this kernel is not supported"


def test_anonymous_struct_is_not_found_by_empty_name(kernelish):
    with pytest.raises(FoveaError):
        kernelish.member("", "x")


@pytest.mark.parametrize("data, message", [
    (struct.pack("<HBBIIIII", 0x9FEB, 1, 0, 24, 0, 0, 0, 1) + b"\0", "not BTF data (bad magic)"),
    (struct.pack("<HBBIIIII", 0, 1, 0, 24, 0, 0, 0, 1) + b"\0", "not BTF data (bad magic)"),
    (struct.pack("<HBBI", 0xEB9F, 1, 0, 24), "BTF data is truncated"),
    (b"", "BTF data is truncated"),
])
def test_bad_data_raises(data, message):
    with pytest.raises(FoveaError) as exc:
        BTF(data)
    assert exc.value.problem == message


def test_from_file_missing(tmp_path):
    with pytest.raises(FoveaError) as exc:
        BTF.from_file(tmp_path / "vmlinux")
    assert "CONFIG_DEBUG_INFO_BTF" in exc.value.problem
    assert str(tmp_path / "vmlinux") in exc.value.problem


def test_from_file_reads_blob(tmp_path):
    b = BTFBuilder()
    u16 = b.int_("u16", 2)
    b.struct("s", 4, [("a", u16, 0), ("b", u16, 16)])
    (tmp_path / "vmlinux").write_bytes(b.blob())
    assert BTF.from_file(tmp_path / "vmlinux").member("s", "b") == Member(2, 2)


def test_kind_numbers_match_uapi():
    assert (btf_mod.INT, btf_mod.STRUCT, btf_mod.UNION, btf_mod.ENUM, btf_mod.TYPEDEF,
            btf_mod.FUNC_PROTO, btf_mod.DATASEC, btf_mod.DECL_TAG, btf_mod.ENUM64) == (
            1, 4, 5, 6, 8, 13, 15, 17, 19)


VMLINUX = Path("/sys/kernel/btf/vmlinux")


@pytest.mark.skipif(not VMLINUX.is_file(), reason="no /sys/kernel/btf/vmlinux on this kernel")
def test_running_kernel_btf():
    vmlinux = BTF.from_file(VMLINUX)
    length = vmlinux.member("sk_buff", "len")
    assert (length.size, length.bitfield_size) == (4, 0)
    nh = vmlinux.member("sk_buff", "network_header")
    assert (nh.size, nh.bitfield_size) == (2, 0)
    segs = vmlinux.member("skb_shared_info", "gso_segs")
    assert segs.size == 2
    reasons = vmlinux.enum("skb_drop_reason")
    assert "SKB_DROP_REASON_NETFILTER_DROP" in reasons.values()
