"""Attach tc programs beside the CNI's, and remove only our own.

A `clsact` qdisc holds ingress and egress filters. Fovea adds one
direct-action bpf filter per hook, named `fovea-<node>-<program>` so it can
find its own filters again (the node name keeps two agents apart when tests
simulate several nodes on one host): at attach time a filter of the same name left by an agent
that was killed is replaced (never stacked); at detach time only our filters
go, and the qdisc only if Fovea created it and nothing else uses it.
"""

from __future__ import annotations

import errno
import zlib
import logging
from dataclasses import dataclass, field

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from agent.errors import FoveaError

log = logging.getLogger(__name__)

INGRESS = 0xFFFFFFF2  # TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)
EGRESS = 0xFFFFFFF3
HOOKS = {"ingress": INGRESS, "egress": EGRESS}
NAME_PREFIX = "fovea-"


@dataclass
class Attachment:
    ifindex: int
    ifname: str
    created_qdisc: bool
    filters: list[tuple[int, str]] = field(default_factory=list)  # (parent, name)


def _bpf_filters(ipr: IPRoute, ifindex: int, parent: int):
    """(prio, handle, name) of the bpf filters on one hook."""
    try:
        msgs = ipr.get_filters(index=ifindex, parent=parent)
    except NetlinkError as e:
        if e.code in (errno.EINVAL, errno.ENODEV, errno.ENOENT):
            return []
        raise
    out = []
    for m in msgs:
        if m.get_attr("TCA_KIND") != "bpf":
            continue
        opts = m.get_attr("TCA_OPTIONS")
        name = opts.get_attr("TCA_BPF_NAME") if opts is not None else None
        if name is None:  # the chain head entry carries no options
            continue
        out.append((m["info"] >> 16, m["handle"], name))
    return out


def _has_clsact(ipr: IPRoute, ifindex: int) -> bool:
    return any(
        q.get_attr("TCA_KIND") == "clsact" for q in ipr.get_qdiscs(index=ifindex)
    )


class TcAttacher:
    def __init__(self, priority: int = 1, instance: str = "node"):
        self.priority = priority
        self.instance = instance
        self._ipr = IPRoute()
        self.attached: dict[int, Attachment] = {}

    def attach(self, ifname: str, programs: dict[str, object]) -> Attachment:
        """programs: {"ingress": bcc function, "egress": bcc function} (either may be absent)."""
        idx = self._ipr.link_lookup(ifname=ifname)
        if not idx:
            raise FoveaError(f"interface {ifname} does not exist", "check the interface name")
        ifindex = idx[0]
        created = False
        if not _has_clsact(self._ipr, ifindex):
            try:
                self._ipr.tc("add", "clsact", ifindex)
                created = True
            except NetlinkError as e:
                if e.code != errno.EEXIST:
                    raise FoveaError(f"cannot add a clsact qdisc to {ifname}: {e}", "check tc support") from None
        att = Attachment(ifindex, ifname, created)
        self.attached[ifindex] = att
        for hook, fn in programs.items():
            parent = HOOKS[hook]
            name = f"{NAME_PREFIX}{self.instance}-{fn.name.decode()}"
            # Filters of one priority need distinct handles: one per name.
            handle = 0xF0EA0000 | (zlib.crc32(name.encode()) & 0xFFFF)
            self._remove_named(ifindex, parent, name, stale=True)
            try:
                self._ipr.tc(
                    "add-filter", "bpf", ifindex, handle,
                    fd=fn.fd, name=name, parent=parent, prio=self.priority,
                    classid=1, direct_action=True,
                )
            except NetlinkError as e:
                raise FoveaError(
                    f"cannot attach {name} to {ifname} {hook}: {e}",
                    f"another filter may hold priority {self.priority} with another protocol; "
                    "set tc.priority in the config",
                ) from None
            att.filters.append((parent, name))
        return att

    def _remove_named(self, ifindex: int, parent: int, name: str, stale: bool = False) -> None:
        for prio, handle, fname in _bpf_filters(self._ipr, ifindex, parent):
            if fname.split(":")[0] != name:  # the kernel appends ":[id]" to some names
                continue
            if stale:
                log.info("replacing a stale %s filter left on ifindex %d", name, ifindex)
            try:
                self._ipr.tc("del-filter", "bpf", ifindex, handle, parent=parent, prio=prio)
            except NetlinkError as e:
                if e.code not in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
                    raise

    def forget(self, ifindex: int) -> None:
        """The interface is gone, and its filters and qdisc with it."""
        self.attached.pop(ifindex, None)

    def detach(self, ifindex: int) -> None:
        att = self.attached.pop(ifindex, None)
        if att is None:
            return
        try:
            for parent, name in att.filters:
                self._remove_named(ifindex, parent, name)
            if att.created_qdisc and not self._any_filters(ifindex):
                self._ipr.tc("del", "clsact", ifindex)
        except NetlinkError as e:
            if e.code not in (errno.ENODEV, errno.ENOENT, errno.EINVAL):
                log.warning("could not fully detach from %s: %s", att.ifname, e)

    def _any_filters(self, ifindex: int) -> bool:
        """True if any filter (ours or not) is left on either hook."""
        for parent in HOOKS.values():
            try:
                if self._ipr.get_filters(index=ifindex, parent=parent):
                    return True
            except NetlinkError:
                pass
        return False

    def close(self) -> None:
        for ifindex in list(self.attached):
            self.detach(ifindex)
        self._ipr.close()
