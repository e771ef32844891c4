"""Fixtures and helpers shared by the kernel tests."""

import subprocess

import pytest

from tests.otlp_receiver import GrpcReceiver


@pytest.fixture(scope="module")
def receiver():
    """An OTLP gRPC receiver for the module's agent to export spans to."""
    r = GrpcReceiver()
    yield r
    r.stop()


def rule_counters(lab, ns: str, chain: str, comment: str) -> tuple[int, int] | None:
    """(packets, bytes) of the one iptables rule in `ns`'s `chain` with this comment; None without it."""
    listing = lab.run(ns, "iptables", "-w", "-L", chain, "-v", "-x", "-n").stdout
    lines = [line for line in listing.splitlines() if comment in line]
    if not lines:
        return None
    (line,) = lines
    packets, nbytes = line.split()[:2]
    return int(packets), int(nbytes)


class HostNat:
    """iptables rules in the host (nat, or the `table` given), in chains of the test's own,
    jumped to from the built-in chains and removed afterwards whatever happens."""

    def __init__(self, lab, name: str, hooks: tuple[str, ...], rules: list[list[str]], table: str = "nat"):
        self.chain = f"{lab.prefix}-{name}"
        self.hooks = hooks
        self.rules = rules
        self.table = table

    def ipt(self, *args: str, check: bool = True) -> None:
        subprocess.run(["iptables", "-w", "-t", self.table, *args], check=check, capture_output=True)

    def __enter__(self):
        self.ipt("-N", self.chain)
        try:
            for rule in self.rules:
                self.ipt("-A", self.chain, *rule)
            for hook in self.hooks:
                self.ipt("-I", hook, "-j", self.chain)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        for hook in self.hooks:
            self.ipt("-D", hook, "-j", self.chain, check=False)
        self.ipt("-F", self.chain, check=False)
        self.ipt("-X", self.chain, check=False)
