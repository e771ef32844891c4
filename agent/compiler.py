"""Compile the C programs in bpf/ with bcc, in a process of their own, and cache the result.

bcc brings LLVM and clang into the process that uses it: about 65 MiB mapped
before the first compile, and the compile's leftovers after. The agent never
imports bcc. A short-lived compiler process (`python -m agent.compiler`) runs
bcc and writes a compiled object: each map's layout and C types, and each
function's instructions with the places that refer to a map. The agent
creates (or adopts) the maps and loads the instructions itself
(agent/bpfobject.py).

Compiled objects are cached under <kernel.cacheDir>/programs, named by a hash
of the source, the flags, bcc's version and the running kernel: an unchanged
restart compiles nothing.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib.util
import io
import json
import logging
import os
import re
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from agent.bpfobject import BpfObject
from agent.errors import FoveaError
from agent.kernel.headers import Headers

log = logging.getLogger(__name__)

FORMAT = 1  # of the compiled object; part of the cache key
CACHE_KEEP = 64  # compiled objects kept in the cache, the most recently used
_LD_IMM64 = 0x18
_PSEUDO_MAP_FD = 1

# What the last compiles cost, for /metrics and the footprint benchmark.
stats = {"compiles": 0, "cache_hits": 0, "seconds": 0.0, "peak_rss_bytes": 0}


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
# Maps that outlive the agent with lifecycle.keepAttached (bpf/fovea.h)
_KEPT = re.compile(r"^\s*FOVEA_(?:COUNTING_TABLE\([^;]*?,\s*(\w+)\s*,[^,;]*\)|RINGBUF\(\s*(\w+)\s*,)", re.M)


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


def kept_maps(source: str) -> list[str]:
    """The maps declared with FOVEA_COUNTING_TABLE or FOVEA_RINGBUF (bpf/fovea.h)."""
    return sorted({a or b for a, b in _KEPT.findall(source)} - {"_name"})


def _bcc_version() -> str:
    spec = importlib.util.find_spec("bcc")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise FoveaError("bcc is not installed (Debian's python3-bpfcc)", "install python3-bpfcc")
    version = Path(list(spec.submodule_search_locations)[0], "version.py")
    return version.read_text() if version.is_file() else "unknown"


def cache_key(name: str, source: str, cflags: list[str], headers: Headers) -> str:
    uname = os.uname()
    parts = [str(FORMAT), name, source, json.dumps(cflags), headers.description, json.dumps(headers.env, sort_keys=True),
             uname.release, uname.version, uname.machine, _bcc_version()]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def compile_program(name: str, cflags: list[str], headers: Headers, cache: str | None = None,
                    pin_dir: Path | None = None):
    """bpf/<name>.c compiled (or taken from the cache) and its maps made: a BpfObject
    whose functions load without LLVM. pin_dir: where its kept maps are pinned
    and adopted from (lifecycle.keepAttached)."""
    return BpfObject(name, compiled(name, cflags, headers, cache), pin_dir)


def compiled(name: str, cflags: list[str], headers: Headers, cache: str | None = None) -> dict:
    """The compiled object of bpf/<name>.c with these flags, from the cache or a compiler process."""
    src = source_dir()
    source = inline_includes(src / f"{name}.c")
    path = None
    if cache:
        path = Path(cache, "programs", f"{name}-{cache_key(name, source, cflags, headers)}.json")
        obj = _read(path)
        if obj is not None:
            stats["cache_hits"] += 1
            log.info("bpf/%s.c: compiled object from the cache (%s)", name, path.name)
            with contextlib.suppress(OSError):
                os.utime(path)  # most recently used
            return obj
    obj = _compile_in_child(name, cflags, headers)
    if path is not None:
        _write(path, obj)
    return obj


def _read(path: Path) -> dict | None:
    try:
        obj = json.loads(path.read_text())
        if obj.get("format") == FORMAT:
            return obj
        log.warning("ignoring %s: format %s, not %s", path, obj.get("format"), FORMAT)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("ignoring the cached compile %s (%s): compiling again", path, e)
    return None


def _write(path: Path, obj: dict) -> None:
    """Atomically (a crash leaves no half-written object), then the oldest beyond CACHE_KEEP go."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".", suffix=".tmp", delete=False) as f:
            json.dump(obj, f)
        os.replace(f.name, path)
        objects = sorted(path.parent.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in objects[CACHE_KEEP:]:
            old.unlink(missing_ok=True)
    except OSError as e:
        log.warning("could not cache the compiled bpf program under %s: %s", path.parent, e.strerror)
        with contextlib.suppress(NameError, OSError):
            os.unlink(f.name)


def _compile_in_child(name: str, cflags: list[str], headers: Headers) -> dict:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fovea-compile-") as tmp:
        out = Path(tmp, "object.json")
        proc = subprocess.run([sys.executable, "-m", "agent.compiler", name, str(out), json.dumps(cflags)],
                              env={**os.environ, **headers.env}, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, errors="replace")
        try:
            result = json.loads(out.read_text())
        except (OSError, ValueError):
            diagnostics = (proc.stderr.strip().splitlines() or ["(nothing on stderr)"])[-1]
            raise FoveaError(f"the compiler process for bpf/{name}.c failed (exit {proc.returncode}): {diagnostics}",
                             "run 'fovea doctor'") from None
    if "error" in result:
        if proc.stderr.strip():
            log.error("bpf/%s.c: %s", name, proc.stderr.strip()[-4000:])
        raise FoveaError(result["error"], result["hint"])
    stats["compiles"] += 1
    stats["seconds"] += time.monotonic() - started
    stats["peak_rss_bytes"] = max(stats["peak_rss_bytes"], result.pop("peak_rss_bytes", 0))
    log.info("bpf/%s.c compiled in %.2f s (compiler process peak %d MiB)", name, time.monotonic() - started,
             stats["peak_rss_bytes"] >> 20)
    return result


# -- the compiler process ----------------------------------------------------------


def build(name: str, cflags: list[str]) -> dict:
    """Compile bpf/<name>.c with bcc and describe the result (in the compiler process)."""
    import ctypes as ct

    from bcc import BPF, libbcc  # Debian's python3-bpfcc

    src = source_dir()
    source = inline_includes(src / f"{name}.c")
    flags = [f"-I{src}", "-Wno-unused-function", *cflags]
    err = io.StringIO()
    try:
        # bcc prints clang's diagnostics on fd 2 itself; keep Python's noise out of it.
        with contextlib.redirect_stderr(err):
            bpf = BPF(text=source.encode(), cflags=flags)
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
            f"check the kernel headers ({os.environ.get('BCC_KERNEL_SOURCE') or 'found by bcc'}) and 'fovea doctor'",
        ) from None
    lib, module = libbcc.lib, bpf.module
    by_id = [ct.c_void_p, ct.c_ulonglong]  # libbcc's calls on table i that bcc's Python leaves undeclared
    for fn, restype in ((lib.bpf_table_key_size_id, ct.c_size_t), (lib.bpf_table_leaf_size_id, ct.c_size_t),
                        (lib.bpf_table_name, ct.c_char_p), (lib.bpf_table_key_desc_id, ct.c_char_p),
                        (lib.bpf_table_leaf_desc_id, ct.c_char_p), (lib.bpf_table_fd_id, ct.c_int),
                        (lib.bpf_table_type_id, ct.c_int), (lib.bpf_table_max_entries_id, ct.c_size_t),
                        (lib.bpf_table_flags_id, ct.c_int)):
        fn.restype, fn.argtypes = restype, by_id
    lib.bpf_num_tables.restype, lib.bpf_num_tables.argtypes = ct.c_size_t, [ct.c_void_p]
    maps, by_fd = {}, {}
    for i in range(lib.bpf_num_tables(module)):
        table = lib.bpf_table_name(module, i).decode()
        maps[table] = {"type": lib.bpf_table_type_id(module, i),
                       "key_size": lib.bpf_table_key_size_id(module, i),
                       "value_size": lib.bpf_table_leaf_size_id(module, i),
                       "max_entries": lib.bpf_table_max_entries_id(module, i),
                       "flags": lib.bpf_table_flags_id(module, i),
                       "key": json.loads(lib.bpf_table_key_desc_id(module, i)),
                       "leaf": json.loads(lib.bpf_table_leaf_desc_id(module, i))}
        by_fd[lib.bpf_table_fd_id(module, i)] = table
    functions = {}
    for i in range(lib.bpf_num_functions(module)):
        fn = lib.bpf_function_name(module, i).decode()
        code = bpf.dump_func(fn.encode())
        relocations = []
        for at in range(0, len(code), 8):  # map references: ld_imm64 of a map's fd (src_reg 1)
            op, regs, _off, imm = struct.unpack_from("<BBhi", code, at)
            if op == _LD_IMM64 and regs >> 4 == _PSEUDO_MAP_FD:
                if imm not in by_fd:
                    raise FoveaError(f"bpf/{name}.c: {fn} refers to a map bcc did not declare (fd {imm})",
                                     "report this as a bug")
                relocations.append([at // 8, by_fd[imm]])
            elif op == _LD_IMM64 and regs >> 4:
                raise FoveaError(f"bpf/{name}.c: {fn} uses a relocation ({regs >> 4}) the loader does not make",
                                 "report this as a bug")
        functions[fn] = {"insns": base64.b64encode(code).decode(), "maps": relocations}
    license_ = lib.bpf_module_license(module)
    return {"format": FORMAT, "program": name, "cflags": cflags, "license": license_.decode() if license_ else "GPL",
            "maps": maps, "kept": kept_maps(source), "functions": functions}


def main(argv: list[str]) -> int:
    """python -m agent.compiler <program> <output.json> '<cflags as JSON>'"""
    import resource

    logging.basicConfig(level=logging.WARNING)
    name, out, cflags = argv[0], Path(argv[1]), json.loads(argv[2])
    try:
        result = build(name, cflags)
        code = 0
    except FoveaError as e:
        result, code = {"error": e.args[0], "hint": e.hint}, 1
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out.write_text(json.dumps(result))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
