"""`fovea doctor`: what this kernel and host offer, and what Fovea can do here."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from agent import capabilities, pins
from agent.errors import FoveaError
from agent.kernel.btf import BTF
from agent.kernel.headers import find_headers
from agent.kernel.tracefs import Tracefs, find_tracefs
from agent.plugins import REGISTRY
from agent.tc import tcx_supported

@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    needed_by: str = ""


def run_checks(btf_path: str = "/sys/kernel/btf/vmlinux", cache_dir: str = "/var/cache/fovea") -> list[Check]:
    checks = [Check("running as root", os.geteuid() == 0, f"uid {os.geteuid()}", "agent")]
    checks.append(Check("kernel", True, os.uname().release))
    checks.extend(capability_checks())

    try:
        btf = BTF.from_file(btf_path)
        m = btf.member("sk_buff", "network_header")
        checks.append(Check("BTF", True, f"{btf_path} (sk_buff.network_header at byte {m.offset})", "drops"))
    except FoveaError as e:
        checks.append(Check("BTF", False, str(e), "drops"))

    try:
        tracefs = Tracefs(find_tracefs(mount_if_missing=os.geteuid() == 0))
        checks.append(Check("tracefs", True, str(tracefs.root), "drops, tcp"))
        for name, cls in REGISTRY.items():  # each plugin says what it needs of this kernel
            why = cls().check(tracefs)
            checks.append(Check(f"plugin {name}", why is None, why or "the kernel has what it needs", name))
        reasons = tracefs.drop_reasons()
        checks.append(Check("drop reasons", bool(reasons), f"{len(reasons)} names read from the kernel", "drops"))
    except FoveaError as e:
        checks.append(Check("tracefs", False, str(e), "drops, tcp"))

    try:
        h = find_headers(cache=cache_dir)
        checks.append(Check("kernel headers", True, h.description, "agent"))
    except FoveaError as e:
        checks.append(Check("kernel headers", False, str(e), "agent"))

    checks.append(_bcc_check())
    checks.append(_program_cache_check(cache_dir))
    why = tcx_supported()
    checks.append(Check("tc attach mode", True, "tcx (BPF links)" if why is None else f"clsact: {why}",
                        "forward, pods"))
    checks.append(bpffs_check())
    kprobes = any(Path(d, "kprobe_events").exists() for d in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing"))
    checks.append(Check("kprobes", True, ("available" if kprobes else "not available") +
                        " (not needed: Fovea uses tracepoints and tc only)"))
    for tool in ("tc", "ip"):
        path = shutil.which(tool)
        checks.append(Check(f"{tool} command", path is not None, path or "not found (iproute2)", "tests, demo"))
    checks.extend(_capture_checks())
    return checks


def _program_cache_check(cache_dir: str) -> Check:
    """Compiled programs kept by source, flags and kernel: without them every start compiles."""
    programs = Path(cache_dir, "programs")
    present = len(list(programs.glob("*.json"))) if programs.is_dir() else 0
    existing = next(p for p in (programs, *programs.parents) if p.exists())
    if os.access(existing, os.W_OK):
        return Check("compiled programs", True, f"{programs}: {present} cached, writable", "agent")
    return Check("compiled programs", True, f"{programs} is not writable: every start compiles its programs "
                 "(a few CPU seconds); mount a writable directory there (the chart's hostPaths.programs)", "agent")


def capability_checks(held: set[str] | None = None) -> list[Check]:
    """One line per capability the chart grants: held, or missing and who needs it
    (the same table the agent checks before starting each plugin)."""
    held = capabilities.effective() if held is None else held
    needs = {cap: [name for name, cls in REGISTRY.items() if cap in cls.capabilities] for cap in capabilities.BITS}
    needs["CAP_NET_RAW"].append("captures")
    needs["CAP_SYS_PTRACE"].append("pods whose network namespace is found only under /proc")
    checks = []
    for cap in capabilities.BITS:
        if cap in held:
            ok, detail = True, "held"
        elif not capabilities.missing([cap], held):
            ok, detail = True, f"missing, but {capabilities.STAND_IN[cap]} stands in for it"
        else:
            ok, detail = not needs[cap], f"missing: cannot {capabilities.WHY[cap]}" + (
                "" if needs[cap] else " (no plugin needs it here)")
        checks.append(Check(f"capability {cap}", ok, detail, ", ".join(needs[cap])))
    return checks


def bpffs_check(root: str = pins.ROOT) -> Check:
    """bpffs (lifecycle.keepAttached pins there) and what agents left pinned in it."""
    if not pins.bpffs_mounted():
        return Check("bpffs", True, f"not mounted at {pins.BPFFS}: an agent with lifecycle.keepAttached "
                     "mounts it (or: mount -t bpf bpf /sys/fs/bpf)")
    try:
        nodes = sorted(p for p in Path(root).iterdir() if p.is_dir()) if Path(root).is_dir() else []
        kept = [f"{n.name} ({', '.join(sorted(e.name for e in n.iterdir()))})" for n in nodes]
    except OSError as e:
        return Check("bpffs", True, f"mounted at {pins.BPFFS}; cannot list {root}: {e.strerror}")
    if not nodes:
        return Check("bpffs", True, f"mounted at {pins.BPFFS}; no pinned state")
    return Check("bpffs", True, f"mounted at {pins.BPFFS}; pinned by agents with keepAttached: {'; '.join(kept)} "
                 "('fovea cleanup' removes it)")


def _capture_checks() -> list[Check]:
    """What packet captures need: libpcap, and the tools of the metadata bundle."""
    try:
        from capture import libpcap

        libpcap.lib()
        pcap = Check("libpcap", True, "loaded", "captures")
    except FoveaError as e:
        pcap = Check("libpcap", False, str(e), "captures")
    tools = {"nsenter": "util-linux", "iptables-save": "iptables",
             "ip6tables-save": "iptables", "nft": "nftables",
             "conntrack": "conntrack", "ss": "iproute2"}
    missing = [f"{t} ({pkg})" for t, pkg in tools.items() if shutil.which(t) is None]
    bundle = Check("capture metadata tools", not missing,
                   f"missing: {', '.join(missing)}; bundles note what they could not collect" if missing
                   else ", ".join(tools), "captures (includeMetadata)")
    return [pcap, bundle]


def _bcc_check() -> Check:
    try:
        import bcc  # noqa: F401

        return Check("bcc", True, f"python3-bpfcc {getattr(bcc, '__version__', '')}".strip(), "agent")
    except ImportError:
        return Check("bcc", False, "python module bcc missing: apt-get install python3-bpfcc", "agent")


def report(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        mark = "ok  " if c.ok else "FAIL"
        need = f"  [needed by {c.needed_by}]" if c.needed_by and not c.ok else ""
        lines.append(f"{mark} {c.name.ljust(width)}  {c.detail}{need}")
    return "\n".join(lines)
