"""The datapath owner: the tc programs and one inventory of pod interfaces.

One object for the whole agent owns
- the tc attachments (agent/tc.py) and the compile-time features of the tc
  programs (flows, DNS: TcExtension), declared before any program compiles;
- the inventory of pod interfaces, their network namespaces and addresses
  (agent/endpoints.py), scanned on a thread of its own on link events and
  every interval, so that a slow namespace scan never holds up the read loop;
  the pods, tcp and dns plugins, the flow trackers and captures all use it;
- what outlives the agent with lifecycle.keepAttached (agent/pins.py): the
  counting maps are pinned, and adopted by the next agent unless their layout
  changed; the programs stay attached; the plugins' state is saved on stop and
  handed back to them (`saved`) when they start again.
"""

from __future__ import annotations

import fnmatch
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

from agent import pins as pins_mod
from agent.compiler import compile_program
from agent.endpoints import Endpoints, PodInterface
from agent.errors import FoveaError
from agent.kernel.headers import Headers
from agent.supervise import Supervisor
from agent.tc import TcAttacher

log = logging.getLogger(__name__)


class TcExtension:
    """A feature compiled into other plugins' tc programs with -D flags, so
    that it adds no program of its own to the packet path (DNS counting runs
    inside the pods and forward programs). The datapath calls these."""

    def cflags(self, program: str) -> list[str]:
        """-D flags for bpf/<program>.c; [] to stay out of it."""
        return []

    def loaded(self, program: str, bpf) -> None:
        """The host's programs are loaded with this extension in them."""

    def failed(self, program: str, why: str) -> None:
        """The host's programs could not load with this extension; they run without it."""

    def attached(self, program: str, ifindex: int) -> None:
        """The host is about to attach its programs to this interface."""

    def detached(self, program: str, ifindex: int) -> None:
        """The host no longer counts on this interface."""

    def unloading(self, program: str) -> None:
        """The host is about to free its BPF object: stop using it."""


class Datapath:
    def __init__(self, config, headers: Headers, uplinks: list[str], wake, supervisor: Supervisor,
                 endpoints: Endpoints | None = None, tc: TcAttacher | None = None,
                 pins: pins_mod.NodePins | None = None):
        """pins: where this node's kept programs, maps and state live (None: nothing is kept or looked for)."""
        self.config = config
        self.headers = headers
        self.uplinks = uplinks
        self.wake = wake  # asks the read loop for housekeeping (a new inventory)
        self.supervisor = supervisor
        self.pins = pins
        self.keep = pins is not None and config.lifecycle.keepAttached
        self.adopted: dict[str, set[str]] = {}  # program -> maps it took over from the previous agent
        self._state: dict = {}  # plugin -> what it saved when the previous agent stopped
        self._before: dict[str, set[str]] = {}  # program -> maps pinned before it first compiled
        self._leaving = False  # stopping with everything left attached
        if self.keep:
            pins_mod.ensure_bpffs()
            self._state = self.pins.take_state().get("plugins", {})
        elif pins is not None and pins_mod.bpffs_mounted():  # what an agent with keepAttached left is not continued
            # (its tcx links are: replaced in place at attach, then unpinned)
            for path in self.pins.remove(keep_links=True):
                log.info("removed %s, left by an agent with lifecycle.keepAttached", path)
        self.tc = tc or TcAttacher(config.tc.priority, instance=config.node, mode=config.tc.mode,
                                   pins=self.pins, keep=self.keep)
        self.extensions: list[TcExtension] = []
        self._compiled = False
        self._endpoints = endpoints or Endpoints(exclude=set(uplinks))
        self._inventory: dict[int, PodInterface] = {}
        self.pod_addresses: frozenset[str] = frozenset()  # addresses of the counted pod interfaces
        self._scan_now = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- tc programs ----------------------------------------------------------------

    def declare(self, extension: TcExtension) -> None:
        """A compile-time feature of the tc programs; only before any of them compiles."""
        if self._compiled:
            raise FoveaError("a tc feature was declared after the tc programs compiled",
                             "declare features before starting plugins")
        self.extensions.append(extension)

    def load_tc_programs(self, program: str, cflags: list[str], functions: dict[str, bytes]):
        """Compile bpf/<program>.c with the declared extensions in it and load
        `functions` ({hook: C function name}) as tc programs; returns (bpf, {hook: fn}).
        If an extension makes it fail, it is loaded without them: the host
        plugin keeps counting, and the extensions are told why."""
        self._compiled = True
        extensions = [e for e in self.extensions if e.cflags(program)]
        try:
            bpf, fns = self._load(program, cflags + [f for e in extensions for f in e.cflags(program)], functions)
        except FoveaError as e:
            if not extensions:
                raise
            log.error("bpf/%s.c does not load with its extensions; loading it without them: %s", program, e)
            for ext in extensions:
                ext.failed(program, str(e))
            return self._load(program, cflags, functions)
        for ext in extensions:
            ext.loaded(program, bpf)
        return bpf, fns

    def load_program(self, program: str, cflags: list[str]):
        """bpf/<program>.c compiled (or from the cache) with its kept maps pinned and adopted
        (lifecycle.keepAttached); tc programs go through load_tc_programs, which loads their functions."""
        pin_dir = self.pin_dir(program)
        bpf = compile_program(program, cflags, self.headers, self.config.kernel.cacheDir, pin_dir)
        if pin_dir is not None:
            self._note_adoption(program, bpf)
        return bpf

    def pin_dir(self, program: str):
        """Where the program's kept maps and links are pinned; None without keepAttached."""
        if not self.keep:
            return None
        self._before.setdefault(program, self.pins.pinned_maps(program))
        return self.pins.program_dir(program)

    def _load(self, program: str, cflags: list[str], functions: dict[str, bytes]):
        bpf = self.load_program(program, cflags)
        try:  # the kernel verifies each hook's program on a thread of its own: a start's longest wait
            with ThreadPoolExecutor(len(functions) or 1) as pool:
                loaded = pool.map(lambda fn: bpf.load_func(fn, bpf.SCHED_CLS), functions.values())
                fns = dict(zip(functions, loaded))
        except FoveaError:  # the verifier's refusal
            bpf.cleanup()
            raise
        return bpf, fns

    def _note_adoption(self, program: str, bpf) -> None:
        """Log what the previous agent's pins gave: maps adopted, maps whose layout changed
        (they started fresh), pins of maps the program no longer has (removed)."""
        for name, why in bpf.layout_changed.items():
            log.warning("map %s of bpf/%s.c changed its layout (%s): it starts fresh", name, program, why)
        links = {f"link_{fn}" for fn in bpf.compiled["functions"]}
        for name in sorted(self._before[program] - set(bpf.compiled["kept"]) - links):
            (self.pins.program_dir(program) / name).unlink(missing_ok=True)
            log.info("map %s of bpf/%s.c is no longer kept: removed its pin", name, program)
        self.adopted[program] = set(bpf.adopted)
        if bpf.adopted:
            log.info("bpf/%s.c took over its maps from the previous agent: %s", program, ", ".join(sorted(bpf.adopted)))

    def prune_pins(self) -> None:
        """After every plugin started: what a previous agent kept for a program that no
        plugin loaded this time (a plugin turned off) goes, its links detached with it."""
        if not self.keep or not self.pins.dir.is_dir():
            return
        for entry in sorted(self.pins.dir.iterdir()):
            if entry.is_dir() and entry.name not in self.adopted and entry.name != pins_mod.LINKS:
                pins_mod.remove_tree(entry)
                log.info("removed what the previous agent kept for bpf/%s.c: no plugin uses it now", entry.name)

    def saved(self, plugin: str) -> dict:
        """What the plugin saved when the previous agent stopped with keepAttached ({} if nothing)."""
        return self._state.pop(plugin, {})

    def leave_attached(self, save) -> bool:
        """On stop with keepAttached: keep the programs attached and save the plugins' state
        (save() returns it). If the pins are gone (`fovea cleanup` ran: Fovea is being
        uninstalled), everything goes instead."""
        if not self.adopted:
            return False  # no tc program: nothing to leave
        if not any(self.pins.pinned_maps(p) for p in self.adopted):
            log.info("the pinned maps are gone (fovea cleanup ran): removing everything on stop")
            return False
        try:
            self.pins.save_state({"plugins": save()})
        except OSError as e:
            log.error("could not save the agent's state under %s (%s): the next agent's counters restart",
                      self.pins.dir, e.strerror)
        self._leaving = True
        log.info("leaving the tc programs attached and the maps pinned under %s", self.pins.dir)
        return True

    def attach(self, program: str, ifname: str, ifindex: int, functions: dict) -> None:
        """Attach a program's tc functions to an interface; raises FoveaError."""
        for ext in self.extensions:
            ext.attached(program, ifindex)
        try:
            self.tc.attach(ifname, functions)
        except Exception:
            for ext in self.extensions:
                ext.detached(program, ifindex)
            raise

    def detach(self, program: str, ifindex: int, gone: bool = False) -> None:
        """Stop counting on an interface (gone: it vanished, with its filters)."""
        if gone:
            self.tc.forget(ifindex)
        elif self._leaving:  # the programs count on while no agent runs: their maps stay as they are
            self.tc.leave(ifindex)
            return
        else:
            self.tc.detach(ifindex)
        for ext in self.extensions:
            ext.detached(program, ifindex)

    def unloading(self, program: str) -> None:
        for ext in self.extensions:
            ext.unloading(program)

    # -- the inventory -------------------------------------------------------------

    def wanted(self, iface: PodInterface) -> bool:
        return any(fnmatch.fnmatchcase(iface.ifname, p) for p in self.config.pods.interfaces)

    def interfaces(self) -> dict[int, PodInterface]:
        """The latest inventory: every pod interface on the node."""
        return dict(self._inventory)

    def pod_interfaces(self) -> dict[int, PodInterface]:
        """The pod interfaces Fovea counts on (those pods.interfaces names)."""
        return {i: f for i, f in self._inventory.items() if self.wanted(f)}

    @property
    def problem(self) -> str:
        """Why the last scan could not see every pod's addresses ("" if it could)."""
        return self._endpoints.problem

    def scan(self) -> None:
        """Scan now (on the caller's thread): at start, and on the inventory thread."""
        self._inventory = self._endpoints.scan()
        self.pod_addresses = frozenset(ip for iface in self.pod_interfaces().values() for ip in iface.ips)

    def start(self) -> None:
        """The first scan, then rescans on link events and every interval."""
        self.scan()
        self._endpoints.watch(self._scan_now.set)
        self._thread = self.supervisor.thread("inventory", self._rescan, self._stop)

    def _rescan(self) -> None:
        while not self._stop.is_set():
            self._scan_now.wait(self.config.interval)
            self._scan_now.clear()
            if self._stop.is_set():
                return
            before = self._inventory
            self.scan()
            self.supervisor.succeeded("inventory")
            if self._inventory != before:
                self.wake()

    def close(self) -> None:
        self._stop.set()
        self._scan_now.set()
        self._endpoints.close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.tc.close(leave=self._leaving)
        if not self._leaving and self.pins is not None and pins_mod.bpffs_mounted():
            self.pins.remove()  # pins of interfaces no longer counted, and the maps'

