"""Attach tc programs beside the CNI's, and remove only our own.

Two ways to attach, chosen by `tc.mode` (auto: tcx when the kernel has it):

tcx (Linux >= 6.6): one BPF link per hook, made with the bpf(2) syscall
(BPF_LINK_CREATE, BPF_TCX_INGRESS/EGRESS; bcc has no helper for it). The link
goes first in the interface's tcx chain, so Fovea sees every packet before a
CNI's program can redirect or drop it; the programs return TC_ACT_UNSPEC,
which tcx reads as TCX_NEXT: the next tcx program runs, then the clsact
filters, then the stack, exactly as without Fovea. Without --keep-attached a
link lives as long as its file descriptor, so an agent killed with SIGKILL
leaves nothing behind; at detach time the links are closed. With it, each link
is pinned (agent/pins.py) and outlives the agent; the next agent finds the pin
and swaps its own program in (BPF_LINK_UPDATE: one step, nothing stacked, no
packet missed). tcx skips the qdisc and classifier layers clsact costs.

clsact (fallback): a `clsact` qdisc holds ingress and egress filters. Fovea adds one
direct-action bpf filter per hook, named `fovea-<node>-<program>` so it can
find its own filters again (the node name keeps two agents apart when tests
simulate several nodes on one host), at a handle derived from the name: a
filter of the same name left by an agent that was killed, or that stopped with
--keep-attached, is replaced in place (`tc filter replace`: the new program
takes over in one step, never stacked); at detach time only our filters go,
and the qdisc only if Fovea created it and nothing else uses it. Each mode
removes what the other left on the interface, so that switching modes across
a restart never counts a packet twice.
"""

from __future__ import annotations

import ctypes as ct
import errno
import os
import zlib
import logging
from dataclasses import dataclass, field

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from agent import bpfsys
from agent.bpfsys import LINK_CREATE, PROG_QUERY, bpf
from agent.errors import FoveaError

log = logging.getLogger(__name__)

INGRESS = 0xFFFFFFF2  # TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)
EGRESS = 0xFFFFFFF3
HOOKS = {"ingress": INGRESS, "egress": EGRESS}
NAME_PREFIX = "fovea-"
MODES = ("auto", "tcx", "clsact")
# The tc functions of bpf/pods.c and bpf/forward.c: what `fovea cleanup` recognises as Fovea's tcx programs.
PROGRAMS = ("pod_from_pod", "pod_to_pod", "forward_ingress", "forward_egress")

# bpf(2), from include/uapi/linux/bpf.h
_TCX_HOOKS = {"ingress": 46, "egress": 47}  # BPF_TCX_INGRESS, BPF_TCX_EGRESS
_BPF_F_BEFORE = 1 << 3  # with no relative program: the head of the chain


class _LinkCreate(ct.Structure):
    """union bpf_attr, as BPF_LINK_CREATE reads it for tcx."""
    _fields_ = [("prog_fd", ct.c_uint32), ("target_ifindex", ct.c_uint32), ("attach_type", ct.c_uint32),
                ("flags", ct.c_uint32), ("relative_fd", ct.c_uint32), ("pad", ct.c_uint32),
                ("expected_revision", ct.c_uint64), ("rest", ct.c_uint8 * 96)]


class _ProgQuery(ct.Structure):
    """union bpf_attr, as BPF_PROG_QUERY reads it."""
    _fields_ = [("target_ifindex", ct.c_uint32), ("attach_type", ct.c_uint32), ("query_flags", ct.c_uint32),
                ("attach_flags", ct.c_uint32), ("prog_ids", ct.c_uint64), ("count", ct.c_uint32),
                ("pad", ct.c_uint32), ("prog_attach_flags", ct.c_uint64), ("link_ids", ct.c_uint64),
                ("link_attach_flags", ct.c_uint64), ("revision", ct.c_uint64), ("rest", ct.c_uint8 * 64)]


def tcx_link(prog_fd: int, ifindex: int, hook: str, first: bool = True) -> int:
    """A tcx link of the program at the head (else the tail) of the hook's chain; returns its fd."""
    attr = _LinkCreate(prog_fd=prog_fd, target_ifindex=ifindex, attach_type=_TCX_HOOKS[hook],
                       flags=_BPF_F_BEFORE if first else 0)
    return bpf(LINK_CREATE, attr)


def tcx_program_ids(ifindex: int, hook: str) -> list[int]:
    """Ids of the programs in the hook's tcx chain, first to run first."""
    return [prog for prog, _ in tcx_chain(ifindex, hook)]


def tcx_chain(ifindex: int, hook: str) -> list[tuple[int, int]]:
    """(program id, link id: 0 for a program attached without a link) of the hook's tcx chain, in order."""
    ids, links = (ct.c_uint32 * 64)(), (ct.c_uint32 * 64)()
    attr = _ProgQuery(target_ifindex=ifindex, attach_type=_TCX_HOOKS[hook], prog_ids=ct.addressof(ids),
                      link_ids=ct.addressof(links), count=64)
    bpf(PROG_QUERY, attr)
    return list(zip(ids[: attr.count], links[: attr.count]))


def tcx_supported() -> str | None:
    """None if this kernel has tcx, else why not (one line)."""
    try:
        tcx_program_ids(1, "ingress")  # ifindex 1 is loopback in every namespace
        return None
    except OSError as e:
        if e.errno == errno.EINVAL:
            return f"the kernel ({os.uname().release}) has no tcx (Linux 6.6 or later)"
        return f"cannot query tcx: {e.strerror}"


def choose_mode(mode: str) -> str:
    """The attach mode tc.mode asks for, on this kernel: "tcx" or "clsact"."""
    if mode == "clsact":
        return "clsact"
    why = tcx_supported()
    if why is None:
        return "tcx"
    if mode == "tcx":
        raise FoveaError(f"tc.mode is tcx but {why}", "set tc.mode to auto or clsact")
    log.info("attaching with clsact: %s", why)
    return "clsact"


@dataclass
class Attachment:
    ifindex: int
    ifname: str
    created_qdisc: bool
    filters: list[tuple[int, str]] = field(default_factory=list)  # (parent, name)
    links: list[int] = field(default_factory=list)  # tcx link fds


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
    def __init__(self, priority: int = 1, instance: str = "node", mode: str = "auto", pins=None, keep: bool = False):
        """pins: agent/pins.py NodePins, where tcx links are pinned (keep) or found (left by an agent that kept them)."""
        self.priority = priority
        self.instance = instance
        self.mode = choose_mode(mode)
        self.pins = pins
        self.keep = keep
        self._ipr = IPRoute()
        self.attached: dict[int, Attachment] = {}

    def _filter_name(self, fn) -> str:
        return f"{NAME_PREFIX}{self.instance}-{fn.name.decode()}"

    def attach(self, ifname: str, programs: dict[str, object]) -> Attachment:
        """programs: {"ingress": bcc function, "egress": bcc function} (either may be absent)."""
        idx = self._ipr.link_lookup(ifname=ifname)
        if not idx:
            raise FoveaError(f"interface {ifname} does not exist", "check the interface name")
        ifindex = idx[0]
        self.detach(ifindex)  # attached before: replace, never stack
        if self.mode == "tcx":
            return self._attach_tcx(ifindex, ifname, programs)
        for hook in programs:  # a tcx link a kept-attached agent pinned would count twice
            self._unpin_link(ifindex, hook)
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
            name = self._filter_name(fn)
            # Filters of one priority need distinct handles: one per name.
            handle = 0xF0EA0000 | (zlib.crc32(name.encode()) & 0xFFFF)
            self._remove_named(ifindex, parent, name, keep=(self.priority, handle))
            try:
                # Replaces a filter of ours left at this handle in one step; adds one otherwise.
                self._ipr.tc(
                    "replace-filter", "bpf", ifindex, handle,
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

    def _attach_tcx(self, ifindex: int, ifname: str, programs: dict[str, object]) -> Attachment:
        att = Attachment(ifindex, ifname, created_qdisc=False)
        self.attached[ifindex] = att
        for hook, fn in programs.items():
            # A clsact filter of ours left by an agent in clsact mode would count twice.
            self._remove_named(ifindex, HOOKS[hook], self._filter_name(fn), stale=True)
            try:
                att.links.append(self._tcx_link(fn, ifindex, hook))
            except OSError as e:
                self.detach(ifindex)
                raise FoveaError(f"cannot attach {fn.name.decode()} to {ifname} {hook} with tcx: {e.strerror}",
                                 "set tc.mode: clsact in the config to attach with a clsact qdisc") from None
        return att

    def _tcx_link(self, fn, ifindex: int, hook: str) -> int:
        """The hook's link: the one a previous agent pinned, now running fn, else a new one."""
        path = self.pins.link_path(ifindex, hook) if self.pins else None
        fd = _pinned_link(path, ifindex) if path else None
        if fd is not None:
            try:
                bpfsys.link_update(fd, fn.fd)
                log.info("took over the %s link on ifindex %d", hook, ifindex)
            except OSError:
                os.close(fd)
                raise
        else:
            fd = tcx_link(fn.fd, ifindex, hook)
            if self.keep:
                path.parent.mkdir(parents=True, exist_ok=True)
                bpfsys.pin(fd, str(path))
        if not self.keep and path is not None:
            path.unlink(missing_ok=True)  # the link now lives as long as our fd
        return fd

    def _unpin_link(self, ifindex: int, hook: str) -> None:
        if self.pins is not None:
            self.pins.link_path(ifindex, hook).unlink(missing_ok=True)

    def _remove_named(self, ifindex: int, parent: int, name: str, stale: bool = False, keep=None) -> None:
        """Remove our filters of this name (but the one at keep=(prio, handle), to be replaced)."""
        for prio, handle, fname in _bpf_filters(self._ipr, ifindex, parent):
            if fname.split(":")[0] != name or (prio, handle) == keep:  # the kernel appends ":[id]" to some names
                continue
            if stale:
                log.info("replacing a stale %s filter left on ifindex %d", name, ifindex)
            try:
                self._ipr.tc("del-filter", "bpf", ifindex, handle, parent=parent, prio=prio)
            except NetlinkError as e:
                if e.code not in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
                    raise

    def forget(self, ifindex: int) -> None:
        """The interface is gone, and its filters and qdisc with it (a tcx link with it is defunct)."""
        att = self.attached.pop(ifindex, None)
        for fd in att.links if att else ():
            os.close(fd)
        for hook in HOOKS:
            self._unpin_link(ifindex, hook)

    def leave(self, ifindex: int) -> None:
        """Stop managing the interface but leave our programs attached (--keep-attached):
        pinned links and filters stay for the next agent."""
        att = self.attached.pop(ifindex, None)
        for fd in att.links if att else ():
            os.close(fd)

    def detach(self, ifindex: int) -> None:
        att = self.attached.pop(ifindex, None)
        if att is None:
            return
        for fd in att.links:  # closing its last fd detaches a tcx link (once its pin is gone)
            os.close(fd)
        for hook in HOOKS:
            self._unpin_link(ifindex, hook)
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

    def close(self, leave: bool = False) -> None:
        """Detach everything (leave: leave it all attached, for the next agent)."""
        for ifindex in list(self.attached):
            self.leave(ifindex) if leave else self.detach(ifindex)
        self._ipr.close()


def remove_all() -> list[str]:
    """`fovea cleanup`: every Fovea clsact filter (by name) and tcx link (by program name) in
    this network namespace, whichever agent made it; returns what was removed."""
    removed = []
    tcx = tcx_supported() is None
    with IPRoute() as ipr:
        for link in ipr.get_links():
            ifindex, ifname = link["index"], link.get_attr("IFLA_IFNAME")
            for hook, parent in HOOKS.items():
                for prio, handle, name in _bpf_filters(ipr, ifindex, parent):
                    if name.startswith(NAME_PREFIX):
                        ipr.tc("del-filter", "bpf", ifindex, handle, parent=parent, prio=prio)
                        removed.append(f"clsact filter {name.split(':')[0]} on {ifname} {hook}")
                for prog, link_id in tcx_chain(ifindex, hook) if tcx else ():
                    name = bpfsys.prog_name(prog)
                    if link_id and name in PROGRAMS:
                        bpfsys.link_detach(link_id)
                        removed.append(f"tcx link {link_id} ({name}) on {ifname} {hook}")
    return removed


def _pinned_link(path, ifindex: int) -> int | None:
    """An fd of the tcx link pinned at path if it still runs on ifindex; a pin of a link
    whose interface went away (or whose index was reused) is removed."""
    try:
        fd = bpfsys.get_pinned(str(path))
    except OSError:
        return None
    try:
        if bpfsys.link_info(fd).ifindex == ifindex:
            return fd
    except OSError:
        pass
    os.close(fd)
    path.unlink(missing_ok=True)
    return None
