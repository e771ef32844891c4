"""Linux capabilities: which ones this process holds, and what each is for.

The chart grants these (deploy/helm/fovea/values.yaml `capabilities`); a plugin
names the ones it needs, so that an agent without one says which, in one line,
instead of failing later with a message that blames something else.
"""

from __future__ import annotations

from collections.abc import Iterable

# Bit numbers from <linux/capability.h>.
BITS = {"CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13, "CAP_SYS_PTRACE": 19, "CAP_SYS_ADMIN": 21,
        "CAP_SYS_RESOURCE": 24, "CAP_PERFMON": 38, "CAP_BPF": 39}

WHY = {
    "CAP_BPF": "load eBPF programs and maps",
    "CAP_PERFMON": "read kernel memory from eBPF programs and attach to tracepoints",
    "CAP_NET_ADMIN": "attach tc programs to interfaces",
    "CAP_SYS_ADMIN": "enter pod network namespaces",
    "CAP_SYS_PTRACE": "find the network namespaces of processes under /proc",
    "CAP_SYS_RESOURCE": "raise the locked-memory limit for BPF maps on older kernels",
    "CAP_NET_RAW": "capture packets",
}


def effective(status: str = "/proc/self/status") -> set[str]:
    """The capabilities in this process's effective set."""
    with open(status) as f:
        for line in f:
            if line.startswith("CapEff:"):
                mask = int(line.split()[1], 16)
                return {name for name, bit in BITS.items() if mask >> bit & 1}
    return set()


# The kernel lets CAP_SYS_ADMIN stand in for these (bpf_capable(), perfmon_capable()).
STAND_IN = {"CAP_BPF": "CAP_SYS_ADMIN", "CAP_PERFMON": "CAP_SYS_ADMIN"}


def missing(needed: Iterable[str], held: set[str] | None = None) -> list[str]:
    """The needed capabilities this process lacks (a stand-in the kernel accepts counts as held)."""
    held = effective() if held is None else held
    return [c for c in needed if c not in held and STAND_IN.get(c) not in held]


def describe_missing(caps: list[str]) -> str:
    """One line: 'missing capability CAP_NET_ADMIN (needed to attach tc programs to interfaces)'."""
    word = "capability" if len(caps) == 1 else "capabilities"
    return f"missing {word} " + ", ".join(f"{c} (needed to {WHY[c]})" for c in caps)
