"""What every plugin is: one concern, one C file in bpf/, one module here."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property

from prometheus_client.core import Metric

from agent.compiler import compile_program
from agent.config import Config
from agent.attribution import Attribution
from agent.errors import FoveaError
from agent.events import EventHub
from agent.kernel.btf import BTF
from agent.kernel.headers import Headers
from agent.kernel.tracefs import Tracefs
from agent.tc import TcAttacher

log = logging.getLogger(__name__)


class TcExtension:
    """A feature compiled into another plugin's tc programs with -D flags, so
    that it adds no program of its own to the packet path (DNS counting runs
    inside the pods and forward programs). The host plugin calls these."""

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


class PluginContext:
    """What the agent hands each plugin when it starts."""

    def __init__(self, config: Config, headers: Headers, tracefs: Tracefs, tc: TcAttacher,
                 uplinks: list[str], attribution: Attribution, wake: Callable[[], None], events: EventHub):
        self.config = config
        self.events = events  # records for the OTLP exporter and the flow stream
        self.uplinks = uplinks
        self.attribution = attribution  # every counting rule: names, NAT, the pending window
        self.wake = wake  # asks the read loop to call reconcile() soon (from any thread)
        self.headers = headers
        self.tracefs = tracefs
        self.tc = tc
        self.tc_extensions: list[TcExtension] = []  # registered by plugins that extend tc programs

    def load_tc_programs(self, program: str, cflags: list[str], functions: dict[str, bytes]):
        """Compile bpf/<program>.c with the registered extensions in it and load
        `functions` ({hook: C function name}) as tc programs; returns (bpf, {hook: fn}).
        If an extension makes it fail, it is loaded without them: the host
        plugin keeps counting, and the extensions are told why."""
        extensions = [e for e in self.tc_extensions if e.cflags(program)]
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

    def _load(self, program: str, cflags: list[str], functions: dict[str, bytes]):
        bpf = compile_program(program, cflags, self.headers)
        try:
            return bpf, {hook: bpf.load_func(fn, bpf.SCHED_CLS) for hook, fn in functions.items()}
        except Exception as e:  # the verifier's refusal
            bpf.cleanup()
            raise FoveaError(f"the kernel refused bpf/{program}.c: {e}", "run 'fovea doctor'") from None

    @cached_property
    def btf(self) -> BTF:
        return BTF.from_file(self.config.kernel.btf)


@dataclass
class PluginHealth:
    """Self-observation a plugin reports (fovea_agent_*)."""

    map_fill: dict[str, float] = field(default_factory=dict)  # map -> entries / max entries
    lost: dict[str, int] = field(default_factory=dict)  # source -> events not kept in detail
    series: dict[str, int] = field(default_factory=dict)  # metric -> series exported
    overflowed: dict[str, int] = field(default_factory=dict)  # metric -> increments sent to overflow
    records: dict[str, int] = field(default_factory=dict)  # kind -> records published (flows, drops...)


class Plugin:
    name = ""
    extends_tc = False  # registers a TcExtension: started before the plugins whose programs it extends

    def check(self, tracefs: Tracefs) -> str | None:
        """Why this kernel cannot run the plugin, or None if it can."""
        return None

    def start(self, ctx: PluginContext) -> None:
        """Compile, load and attach."""

    def reconcile(self) -> None:
        """Housekeeping every interval (interfaces that came or went)."""

    def refresh(self) -> None:
        """Read the kernel maps (called every interval and before each scrape)."""

    def metrics(self) -> Iterable[Metric]:
        return ()

    def health(self) -> PluginHealth:
        return PluginHealth()

    def close(self) -> None:
        """Detach everything; safe to call twice."""
