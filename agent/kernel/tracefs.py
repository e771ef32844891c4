"""Tracepoint formats from tracefs.

The programs read tracepoint fields at the offsets the running kernel's
format file gives (passed as -D flags), so a field whose C type the headers
lack (e.g. `enum sk_rst_reason` on 6.1 headers) costs nothing, and drop-reason
names come from the format's `__print_symbolic` list, not from a copied table.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from agent.errors import FoveaError

log = logging.getLogger(__name__)

CANDIDATES = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")

_FIELD = re.compile(
    r"field:(?P<decl>[^;]+);\s*offset:(?P<offset>\d+);\s*size:(?P<size>\d+);\s*signed:(?P<signed>\d+);"
)
_SYMBOL = re.compile(r'\{\s*(-?(?:0x[0-9a-fA-F]+|\d+))\s*,\s*"([^"]*)"\s*\}')


@dataclass(frozen=True)
class Field:
    name: str
    ctype: str
    offset: int
    size: int
    signed: bool


@dataclass(frozen=True)
class Format:
    name: str
    id: int
    fields: dict[str, Field]
    print_fmt: str

    def field(self, name: str) -> Field:
        try:
            return self.fields[name]
        except KeyError:
            raise FoveaError(
                f"tracepoint {self.name} has no field {name!r} on this kernel",
                "this kernel is too old for this probe",
            ) from None

    def symbols(self, field: str) -> dict[int, str]:
        """The value → name list of `__print_symbolic(REC->field, ...)`."""
        marker = f"__print_symbolic(REC->{field},"
        start = self.print_fmt.find(marker)
        if start < 0:
            return {}
        depth, end = 0, start
        for end in range(start, len(self.print_fmt)):  # to the matching ")"
            ch = self.print_fmt[end]
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0 and ch == ")":
                break
        body = self.print_fmt[start + len(marker) : end]
        return {int(v, 0): name for v, name in _SYMBOL.findall(body)}


def parse_format(text: str) -> Format:
    name = re.search(r"^name:\s*(\S+)", text, re.M)
    tp_id = re.search(r"^ID:\s*(\d+)", text, re.M)
    fmt = re.search(r"^print fmt:\s*(.*)$", text, re.M | re.S)
    if not (name and tp_id):
        raise FoveaError("unreadable tracepoint format", "check that tracefs is mounted")
    fields = {}
    for m in _FIELD.finditer(text):
        decl = m["decl"].strip()
        # "unsigned char saddr[4]" -> name saddr; "__data_loc char[] name" -> name
        ident = re.search(r"([A-Za-z_]\w*)\s*(\[[^\]]*\])?\s*$", decl)
        if not ident:
            continue
        fname = ident.group(1)
        ctype = decl[: ident.start()].strip()
        fields[fname] = Field(fname, ctype, int(m["offset"]), int(m["size"]), m["signed"] == "1")
    return Format(name[1], int(tp_id[1]), fields, fmt[1].strip() if fmt else "")


class Tracefs:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root else find_tracefs()

    def exists(self, category: str, event: str) -> bool:
        return (self.root / "events" / category / event / "format").is_file()

    def format(self, category: str, event: str) -> Format:
        path = self.root / "events" / category / event / "format"
        try:
            return parse_format(path.read_text())
        except FileNotFoundError:
            raise FoveaError(
                f"tracepoint {category}:{event} does not exist on this kernel",
                "the probe that needs it is disabled",
            ) from None

    def lacks(self, category: str, event: str, fields: dict[str, int]) -> str | None:
        """Why the tracepoint cannot serve C code that reads `fields` (name -> size in
        bytes), or None if it can."""
        if not self.exists(category, event):
            return f"tracepoint {category}:{event} is missing"
        fmt = self.format(category, event)
        for f, size in fields.items():
            if f not in fmt.fields:
                return f"{category}:{event} has no {f!r} field on this kernel"
            if fmt.fields[f].size != size:
                return f"{category}:{event} field {f!r} is {fmt.fields[f].size} bytes, expected {size}"
        return None

    def offset_flags(self, category: str, event: str, fields: list[str]) -> list[str]:
        """-D flags TP_<EVENT>_<FIELD>_OFF for each field the C code reads."""
        fmt = self.format(category, event)
        flags = []
        for f in fields:
            fld = fmt.field(f)
            flags.append(f"-DTP_{event.upper()}_{f.upper()}_OFF={fld.offset}")
        return flags

    def drop_reasons(self) -> dict[int, str]:
        """Drop-reason numbers → names, as this kernel prints them."""
        return self.format("skb", "kfree_skb").symbols("reason")


def find_tracefs(mount_if_missing: bool = True) -> Path:
    for c in CANDIDATES:
        if Path(c, "events").is_dir():
            return Path(c)
    if mount_if_missing and os.geteuid() == 0 and Path(CANDIDATES[0]).is_dir():
        # tracefs is a view of the kernel, not host state: mounting it is harmless.
        result = subprocess.run(
            ["mount", "-t", "tracefs", "tracefs", CANDIDATES[0]], capture_output=True, text=True
        )
        if result.returncode == 0:
            log.info("mounted tracefs at %s", CANDIDATES[0])
            return Path(CANDIDATES[0])
    raise FoveaError(
        "tracefs is not mounted",
        "run 'mount -t tracefs tracefs /sys/kernel/tracing' as root "
        "(in a pod: mount the host's /sys/kernel/tracing)",
    )
