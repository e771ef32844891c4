"""A node made of network namespaces: the demo's world and the tests' lab.

    pod ns  eth0 ──veth── <prefix>p<i>  ┐
                                        ├ host (routes between them)
    world ns eth0 ──veth── <prefix>up   ┘  the lab uplink

Pods and the world reach each other through the host, which forwards only on
the lab's own interfaces (per-interface forwarding; the host's global
settings are never changed). Neighbour entries are static and IPv6 router
solicitations and DAD are off, so the only packets on the links are the ones
that were sent: counters can be compared for equality. Everything is named
with the lab's prefix and removed by `down()`, which also clears leftovers of
an earlier run with the same prefix that was killed.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute, NetNS, netns
from pyroute2.netlink.exceptions import NetlinkError

from agent.nsenter import in_netns

log = logging.getLogger(__name__)

NUD_PERMANENT = 0x80


@dataclass(frozen=True)
class Endpoint:
    """One namespace at the end of a veth whose other end is in the host."""

    netns: str
    host_if: str  # host-side interface
    ipv4: str
    ipv6: str
    gateway4: str
    gateway6: str


def _write_sysctl(key: str, value: str) -> None:
    Path("/proc/sys", key.replace(".", "/")).write_text(value)


def _quiet_ipv6(ifname: str, enable_ipv6: bool) -> None:
    """No link-local address, DAD, router solicitations or RAs on one link."""
    base = f"net.ipv6.conf.{ifname}"
    if not enable_ipv6:
        _write_sysctl(f"{base}.disable_ipv6", "1")
        return
    for key, value in (
        ("addr_gen_mode", "1"),
        ("accept_dad", "0"),
        ("router_solicitations", "0"),
        ("accept_ra", "0"),
    ):
        _write_sysctl(f"{base}.{key}", value)


class NodeLab:
    def __init__(self, prefix: str = "fvlab", pods: int = 2, ipv6: bool = True, octet: int = 201):
        if len(prefix) > 10:
            raise ValueError("lab prefix must be at most 10 characters (interface names)")
        self.prefix = prefix
        self.ipv6 = ipv6
        self.octet = octet
        self.pods = [self._endpoint(f"{prefix}-pod{i}", f"{prefix}p{i}", i + 1) for i in range(pods)]
        self.world = self._endpoint(f"{prefix}-world", f"{prefix}up", 250)
        self.uplink = self.world.host_if

    def _endpoint(self, ns: str, host_if: str, subnet: int) -> Endpoint:
        o = self.octet
        return Endpoint(
            netns=ns, host_if=host_if,
            ipv4=f"10.{o}.{subnet}.2", ipv6=f"fd00:{o}:{subnet}::2",
            gateway4=f"10.{o}.{subnet}.1", gateway6=f"fd00:{o}:{subnet}::1",
        )

    @property
    def endpoints(self) -> list[Endpoint]:
        return [*self.pods, self.world]

    def add_pod(self, name: str, subnet: int) -> Endpoint:
        """One more pod after up(): namespace <prefix>-<name>, host link <prefix><name>."""
        ep = self._endpoint(f"{self.prefix}-{name}", f"{self.prefix}{name}", subnet)
        if ep.netns in netns.listnetns():  # left by a killed run
            netns.remove(ep.netns)
        self.pods.append(ep)
        with IPRoute() as ipr:
            self._add_endpoint(ipr, ep)
        return ep

    def remove_pod(self, ep: Endpoint) -> None:
        with IPRoute() as ipr:
            for idx in ipr.link_lookup(ifname=ep.host_if):
                ipr.link("del", index=idx)
        netns.remove(ep.netns)
        self.pods.remove(ep)

    # -- set-up and tear-down -------------------------------------------------

    def up(self) -> "NodeLab":
        self.down()  # leftovers of a killed run with this prefix
        try:
            with IPRoute() as ipr:
                for ep in self.endpoints:
                    self._add_endpoint(ipr, ep)
        except BaseException:
            self.down()
            raise
        return self

    def _add_endpoint(self, ipr: IPRoute, ep: Endpoint) -> None:
        netns.create(ep.netns)
        ipr.link("add", ifname=ep.host_if, kind="veth", peer={"ifname": "eth0", "net_ns_fd": ep.netns})
        host = ipr.link_lookup(ifname=ep.host_if)[0]
        _quiet_ipv6(ep.host_if, self.ipv6)
        _write_sysctl(f"net.ipv4.conf.{ep.host_if}.forwarding", "1")
        if self.ipv6:
            _write_sysctl(f"net.ipv6.conf.{ep.host_if}.force_forwarding", "1")
        host_mac = ipr.get_links(host)[0].get_attr("IFLA_ADDRESS")

        with in_netns(ep.netns):
            _quiet_ipv6("eth0", self.ipv6)
            _quiet_ipv6("default", self.ipv6)
        ns = NetNS(ep.netns)
        try:
            lo = ns.link_lookup(ifname="lo")[0]
            eth = ns.link_lookup(ifname="eth0")[0]
            ns.link("set", index=lo, state="up")
            pod_mac = ns.get_links(eth)[0].get_attr("IFLA_ADDRESS")
            ns.addr("add", index=eth, address=ep.ipv4, prefixlen=24)
            ns.link("set", index=eth, state="up")
            ns.route("add", dst="default", gateway=ep.gateway4)
            ns.neigh("add", dst=ep.gateway4, lladdr=host_mac, ifindex=eth, state=NUD_PERMANENT)
            if self.ipv6:
                ns.addr("add", index=eth, address=ep.ipv6, prefixlen=64, flags=0x02)  # IFA_F_NODAD
                ns.route("add", dst="default", gateway=ep.gateway6, family=socket.AF_INET6)
                ns.neigh("add", dst=ep.gateway6, lladdr=host_mac, ifindex=eth,
                         state=NUD_PERMANENT, family=socket.AF_INET6)
        finally:
            ns.close()

        ipr.addr("add", index=host, address=ep.gateway4, prefixlen=24)
        ipr.link("set", index=host, state="up")
        ipr.neigh("add", dst=ep.ipv4, lladdr=pod_mac, ifindex=host, state=NUD_PERMANENT)
        if self.ipv6:
            ipr.addr("add", index=host, address=ep.gateway6, prefixlen=64, flags=0x02)
            ipr.neigh("add", dst=ep.ipv6, lladdr=pod_mac, ifindex=host,
                      state=NUD_PERMANENT, family=socket.AF_INET6)

    def down(self) -> None:
        """Remove every interface and namespace with this lab's names; idempotent."""
        with IPRoute() as ipr:
            for ep in self.endpoints:
                for idx in ipr.link_lookup(ifname=ep.host_if):
                    with contextlib.suppress(NetlinkError):
                        ipr.link("del", index=idx)
        for ep in self.endpoints:
            if ep.netns in netns.listnetns():
                netns.remove(ep.netns)
        # A veth goes away with its namespace asynchronously: wait for it.
        deadline = time.monotonic() + 5
        with IPRoute() as ipr:
            while time.monotonic() < deadline and any(
                ipr.link_lookup(ifname=ep.host_if) for ep in self.endpoints
            ):
                time.sleep(0.05)

    def __enter__(self) -> "NodeLab":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    # -- traffic ----------------------------------------------------------------

    def socket(self, ns: str, family: int, kind: int) -> socket.socket:
        """A socket that lives in namespace `ns`."""
        with in_netns(ns):
            return socket.socket(family, kind)

    def run(self, ns: str, *argv: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["ip", "netns", "exec", ns, *argv],
            capture_output=True, text=True, timeout=timeout, check=check,
        )

    def snmp(self, ns: str, proto: str, field: str) -> int:
        """A counter of /proc/net/snmp or /proc/net/netstat (Tcp: OutSegs,
        TcpExt: TCPRetransFail...), or of /proc/net/snmp6 (Icmp6: InDestUnreachs), inside `ns`."""
        with in_netns(ns):
            if proto.endswith("6"):
                six = dict(ln.split() for ln in Path("/proc/thread-self/net/snmp6").read_text().splitlines())
                return int(six[proto + field])
            text = "".join(Path(f"/proc/thread-self/net/{name}").read_text() for name in ("snmp", "netstat"))
            lines = [ln.split() for ln in text.splitlines()]
        for names, values in zip(lines[::2], lines[1::2]):
            if names[0] == f"{proto}:":
                return int(values[names.index(field)])
        raise KeyError(f"{proto}:{field}")
