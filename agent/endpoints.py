"""Pod interfaces on this host: veths whose peer lives in another network namespace.

For each one: its host-side index and name, the peer's namespace (found by the
namespace id the kernel reports for the peer, matched against /run/netns and
/proc/<pid>/ns/net) and the addresses the peer holds there. Netlink link
events trigger a rescan; a full scan also runs at start and every interval,
since a CNI adds the pod's addresses inside its namespace after the veth
appears on the host.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTMGRP_LINK

from agent.nsenter import in_netns

log = logging.getLogger(__name__)

# Test only: seconds every scan waits first (FOVEA_TEST_SCAN_DELAY), to show that a slow
# scan never holds up the read loop or a scrape. Never set it in production.
SCAN_DELAY = float(os.environ.get("FOVEA_TEST_SCAN_DELAY") or 0)


@dataclass(frozen=True)
class PodInterface:
    ifindex: int
    ifname: str
    netns: str  # path of the peer's network namespace, "" if not found
    ips: tuple[str, ...]


class Endpoints:
    def __init__(self, exclude: set[str], netns_dir: str = "/run/netns", proc: str = "/proc"):
        self.exclude = exclude  # uplinks and other links that are not pods
        self.netns_dir = Path(netns_dir)
        self.proc = Path(proc)
        self._paths: dict[int, str] = {}  # nsid -> namespace path
        self._denied = False  # the last look under /proc was refused for some process
        self._events: IPRoute | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.problem = ""  # why the last scan could not see every pod's addresses, in one line

    def scan(self) -> dict[int, PodInterface]:
        if SCAN_DELAY:
            time.sleep(SCAN_DELAY)
        found = {}
        self._problems: list[str] = []
        with IPRoute() as ipr:
            for link in ipr.get_links():
                name = link.get_attr("IFLA_IFNAME")
                info = link.get_attr("IFLA_LINKINFO")
                nsid = link.get_attr("IFLA_LINK_NETNSID")
                if name in self.exclude or nsid is None or info is None or info.get_attr("IFLA_INFO_KIND") != "veth":
                    continue
                path = self._netns_path(ipr, nsid)
                if not path and self._denied:
                    self._problems.append(f"the network namespace of {name} was not found: missing capability "
                                          "CAP_SYS_PTRACE (needed to find the network namespaces of processes "
                                          "under /proc)")
                peer = link.get_attr("IFLA_LINK")
                ips = self._peer_ips(path, peer) if path and peer else ()
                found[link["index"]] = PodInterface(link["index"], name, path, ips)
        self.problem = self._problems[0] if self._problems else ""
        return found

    def _netns_path(self, ipr: IPRoute, nsid: int) -> str:
        # The kernel reuses namespace ids: check that a remembered path still has this one.
        path = self._paths.get(nsid)
        if path is None or self._nsid_of(ipr, path) != nsid:
            self._paths = self._all_nsids(ipr)
        return self._paths.get(nsid, "")

    @staticmethod
    def _nsid_of(ipr: IPRoute, path: str) -> int | None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None  # the namespace is gone
        try:
            return ipr.get_netnsid(fd=fd).get("nsid")
        except (NetlinkError, AttributeError):
            return None
        finally:
            os.close(fd)

    def _all_nsids(self, ipr: IPRoute) -> dict[int, str]:
        """nsid -> a path of that namespace, for every namespace we can see."""
        candidates = sorted(self.netns_dir.glob("*")) if self.netns_dir.is_dir() else []
        candidates += sorted(self.proc.glob("[0-9]*/ns/net"))
        out: dict[int, str] = {}
        seen_inodes = set()
        self._denied = False
        for path in candidates:
            try:
                inode = os.stat(path).st_ino
            except PermissionError:
                self._denied = True  # another user's process: reading its namespace needs CAP_SYS_PTRACE
                continue
            except OSError:
                continue  # a process that exited
            if inode in seen_inodes:
                continue
            seen_inodes.add(inode)
            nsid = self._nsid_of(ipr, str(path))
            if nsid is not None and 0 <= nsid < 0xFFFFFFFF:  # -1 (as u32): no id assigned
                out.setdefault(nsid, str(path))
        return out

    def _peer_ips(self, path: str, peer_index: int) -> tuple[str, ...]:
        try:
            with in_netns(path), IPRoute() as ipr:
                addrs = ipr.get_addr(index=peer_index)
                return tuple(
                    a.get_attr("IFA_ADDRESS") for a in addrs if a.get_attr("IFA_ADDRESS") and a["scope"] == 0
                )
        except OSError as e:
            if e.errno == errno.EPERM:  # not a pod going away: the agent may not enter namespaces
                self._problems.append(f"{e.strerror}: missing capability CAP_SYS_ADMIN (needed to enter pod "
                                      "network namespaces and read their addresses)")
            return ()
        except NetlinkError:
            return ()

    def watch(self, on_change: Callable[[], None]) -> None:
        """Call on_change (from a thread) whenever a link comes, goes or changes."""
        self._events = IPRoute()
        self._events.bind(groups=RTMGRP_LINK)

        def loop():
            while not self._stop.is_set():
                try:
                    msgs = self._events.get()
                except Exception:
                    if not self._stop.is_set():
                        log.exception("netlink link events failed; falling back to periodic scans")
                    return
                if any(m.get("event") in ("RTM_NEWLINK", "RTM_DELLINK") for m in msgs):
                    try:
                        on_change()
                    except Exception:
                        log.exception("handling a link change failed")

        self._thread = threading.Thread(target=loop, name="link-events", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._events is not None:
            with contextlib.suppress(Exception):
                self._events.close()
            self._events = None
