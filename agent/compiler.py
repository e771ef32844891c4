"""Compile the C programs in bpf/ with bcc, with settings passed as -D flags."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
from pathlib import Path

from agent.errors import FoveaError
from agent.kernel.headers import Headers

log = logging.getLogger(__name__)


def source_dir() -> Path:
    """bpf/ beside the packages (a checkout), or where the package installed it."""
    candidates = [
        os.environ.get("FOVEA_BPF_DIR", ""),
        Path(__file__).resolve().parent.parent / "bpf",
        Path(sys.prefix, "share", "fovea", "bpf"),
    ]
    for c in candidates:
        if c and Path(c, "fovea.h").is_file():
            return Path(c)
    raise FoveaError("the eBPF sources (bpf/*.c) are missing", "reinstall fovea or set FOVEA_BPF_DIR")


_LOCAL_INCLUDE = re.compile(r'^#include "([\w.]+)"[ \t]*$', re.M)


def inline_includes(path: Path, seen: set[str] | None = None) -> str:
    """The C source with the bpf/ headers it includes pasted in, each once: bcc
    rewrites map calls (`table.lookup(...)`) only in the main file, so headers
    that use maps (dns.h) must become part of it."""
    seen = set() if seen is None else seen

    def paste(m: re.Match) -> str:
        header = path.parent / m.group(1)
        if not header.is_file():
            return m.group(0)  # a system or kernel header: left to the compiler
        if m.group(1) in seen:
            return ""
        seen.add(m.group(1))
        return inline_includes(header, seen)

    return _LOCAL_INCLUDE.sub(paste, path.read_text())


def compile_program(name: str, cflags: list[str], headers: Headers):
    """Compile bpf/<name>.c and return the loaded bcc.BPF object."""
    from bcc import BPF  # Debian's python3-bpfcc; imported late so unit tests run without it

    src = source_dir()
    os.environ.update(headers.env)
    flags = [f"-I{src}", "-Wno-unused-function", *cflags]
    log.debug("compiling %s.c with %s", name, " ".join(flags))
    err = io.StringIO()
    try:
        # bcc prints clang's diagnostics on fd 2 itself; keep Python's noise out of it.
        with contextlib.redirect_stderr(err):
            return BPF(text=inline_includes(src / f"{name}.c").encode(), cflags=flags)
    except Exception as e:  # bcc raises plain Exception on compile/load failure
        from agent import capabilities

        lacking = capabilities.missing(["CAP_BPF", "CAP_PERFMON"])
        if lacking or "not permitted" in str(e):  # not the headers' fault
            raise FoveaError(f"the kernel refused to load bpf/{name}.c: {e}",
                             capabilities.describe_missing(lacking) if lacking else
                             "a capability or security policy (seccomp, lockdown) forbids it: run 'fovea doctor'",
                             ) from None
        raise FoveaError(
            f"could not compile or load bpf/{name}.c: {e}",
            f"check the kernel headers ({headers.description}) and 'fovea doctor'",
        ) from None
