"""A compiled object (agent/compiler.py) loaded into the kernel without LLVM.

The maps are created here, or adopted from pins a previous agent left
(lifecycle.keepAttached); each function's instructions get the fds of the
maps they refer to and are loaded on demand. The calls are those of bcc's BPF
object that Fovea uses, so the plugins read maps the same way.
"""

from __future__ import annotations

import base64
import logging
import os
from pathlib import Path

from agent import bpfsys
from agent.bpfmaps import PERF_EVENT_ARRAY, PerfBuffer, RingBuffers, Table, possible_cpus
from agent.errors import FoveaError

log = logging.getLogger(__name__)


class Function:
    def __init__(self, name: bytes, fd: int):
        self.name = name
        self.fd = fd


class BpfObject:
    SCHED_CLS = bpfsys.PROG_TYPE_SCHED_CLS
    TRACEPOINT = bpfsys.PROG_TYPE_TRACEPOINT

    def __init__(self, program: str, compiled: dict, pin_dir: Path | None = None):
        """pin_dir: the kept maps are pinned there, and adopted if already pinned with this layout."""
        self.program = program
        self.compiled = compiled
        self.pin_dir = pin_dir
        self.adopted: set[str] = set()
        self.layout_changed: dict[str, str] = {}  # kept map -> how the pinned one differed (it started fresh)
        self.rings = RingBuffers()
        self.perf_buffers: list[PerfBuffer] = []
        self._fds: dict[str, int] = {}
        self._tables: dict[str, Table] = {}
        self._functions: dict[str, Function] = {}
        self._links: list[int] = []
        try:
            for name, spec in compiled["maps"].items():
                kept = pin_dir is not None and name in compiled["kept"]
                self._fds[name] = self._adopt(name, spec, pin_dir / name) if kept else self._create(name, spec)
        except OSError as e:
            self.cleanup()
            raise FoveaError(f"could not create the maps of bpf/{program}.c: {e.strerror}",
                             "run 'fovea doctor' (a capability or memlock limit may be missing)") from None

    @staticmethod
    def _create(name: str, spec: dict) -> int:
        entries = possible_cpus() if spec["type"] == PERF_EVENT_ARRAY else spec["max_entries"]
        return bpfsys.map_create(spec["type"], spec["key_size"], spec["value_size"], entries, spec["flags"],
                                 name.encode())

    def _adopt(self, name: str, spec: dict, pin: Path) -> int:
        try:
            fd = bpfsys.get_pinned(str(pin))
        except FileNotFoundError:
            fd = None
        if fd is not None:
            info = bpfsys.map_info(fd)
            diff = [f"{k} {getattr(info, k)} -> {spec[k]}" for k in ("type", "key_size", "value_size", "max_entries")
                    if getattr(info, k) != spec[k]]
            if not diff:
                self.adopted.add(name)
                return fd
            os.close(fd)
            self.layout_changed[name] = ", ".join(diff)
            pin.unlink()
        fd = self._create(name, spec)
        pin.parent.mkdir(parents=True, exist_ok=True)
        bpfsys.pin(fd, str(pin))
        return fd

    def has_table(self, name: str | bytes) -> bool:
        return (name.decode() if isinstance(name, bytes) else name) in self._fds

    def __getitem__(self, name: str | bytes) -> Table:
        name = name.decode() if isinstance(name, bytes) else name
        if name not in self._tables:
            if name not in self._fds:
                raise KeyError(name)
            self._tables[name] = Table(name, self._fds[name], self.compiled["maps"][name], owner=self)
        return self._tables[name]

    def load_func(self, name: str | bytes, prog_type: int) -> Function:
        """Load the function (once) as a program of this type; FoveaError with the verifier's words."""
        fn = name.decode() if isinstance(name, bytes) else name
        if fn in self._functions:
            return self._functions[fn]
        try:
            spec = self.compiled["functions"][fn]
        except KeyError:
            raise FoveaError(f"bpf/{self.program}.c has no function {fn}", "report this as a bug") from None
        code = bytearray(base64.b64decode(spec["insns"]))
        for index, table in spec["maps"]:
            code[index * 8 + 4:index * 8 + 8] = self._fds[table].to_bytes(4, "little", signed=True)
        try:
            fd = bpfsys.prog_load(prog_type, fn.encode(), bytes(code), self.compiled["license"].encode())
        except OSError as e:
            raise FoveaError(f"the kernel refused {fn} of bpf/{self.program}.c: {e.strerror}",
                             "run 'fovea doctor'") from None
        self._functions[fn] = Function(fn.encode(), fd)
        return self._functions[fn]

    def attach_tracepoint(self, tp: bytes, fn_name: bytes) -> str:
        """Attach fn_name to the tracepoint "category:event" through a bpf link. With a
        pin_dir the link is pinned there, and a link a previous agent pinned is taken over:
        kept as it is if it runs this very program on these very maps, else replaced (the
        new link first, then the old one goes: a microsecond in which both count).
        Returns what happened: "attached", "kept" or "replaced"."""
        from agent.kernel.tracefs import find_tracefs

        category, event = tp.decode().split(":", 1)
        fn = self.load_func(fn_name, self.TRACEPOINT)
        pin = self.pin_dir / f"link_{fn_name.decode()}" if self.pin_dir is not None else None
        try:
            old = bpfsys.get_pinned(str(pin)) if pin is not None and pin.exists() else None
        except OSError:
            old = None
        try:
            if old is not None and self._runs_this(old, fn):
                self._links.append(old)
                return "kept"
            tp_id = int(Path(find_tracefs(), "events", category, event, "id").read_text())
            link = bpfsys.tracepoint_link(fn.fd, tp_id)
            self._links.append(link)
            if pin is not None:
                fresh = pin.with_name(pin.name + "_new")  # bpffs refuses dots in names
                fresh.unlink(missing_ok=True)
                bpfsys.pin(link, str(fresh))
                os.rename(fresh, pin)
            if old is not None:  # its pin was just replaced: this fd is its last holder, so it detaches
                os.close(old)
                return "replaced"
            return "attached"
        except (OSError, ValueError) as e:
            raise FoveaError(f"cannot attach {fn_name.decode()} to tracepoint {tp.decode()}: {e}",
                             "run 'fovea doctor'") from None

    def _runs_this(self, link_fd: int, fn: Function) -> bool:
        """Whether the pinned link runs fn's instructions (the kernel's tag of them, map
        references left out) on this object's maps: every map adopted, none started fresh."""
        every_map_adopted = self.adopted == set(self.compiled["maps"]) and not self.layout_changed
        theirs = bpfsys.prog_info_by_id(bpfsys.link_info(link_fd).prog_id).tag
        return every_map_adopted and bytes(theirs) == bytes(bpfsys.prog_info(fn.fd).tag)

    def ring_buffer_consume(self) -> None:
        self.rings.consume()

    def perf_buffer_poll(self, timeout: int = -1) -> None:
        for buffer in self.perf_buffers:
            buffer.poll(timeout)

    def cleanup(self) -> None:
        """Detach the tracepoints, free the buffers and close every fd (pinned maps stay)."""
        self.rings.close()
        for buffer in self.perf_buffers:
            buffer.close()
        self.perf_buffers.clear()
        fds = self._links + [f.fd for f in self._functions.values()] + list(self._fds.values())
        self._links, self._functions, self._fds, self._tables = [], {}, {}, {}
        for fd in fds:
            os.close(fd)
