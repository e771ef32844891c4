"""What every plugin is: one concern, one C file in bpf/, one module here."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property

from prometheus_client.core import Metric

from agent.attribution import Attribution
from agent.config import Config
from agent.datapath import Datapath, TcExtension  # noqa: F401 (TcExtension: what plugins extend tc with)
from agent.events import EventHub
from agent.kernel.btf import BTF
from agent.kernel.headers import Headers
from agent.kernel.tracefs import Tracefs

log = logging.getLogger(__name__)


class PluginContext:
    """What the agent hands each plugin when it starts."""

    def __init__(self, config: Config, headers: Headers, tracefs: Tracefs, datapath: Datapath,
                 uplinks: list[str], attribution: Attribution, wake: Callable[[], None], events: EventHub):
        self.config = config
        self.events = events  # records for the OTLP exporter and the flow stream
        self.uplinks = uplinks
        self.attribution = attribution  # every counting rule: names, NAT, the pending window
        self.wake = wake  # asks the read loop to call reconcile() soon (from any thread)
        self.headers = headers
        self.tracefs = tracefs
        self.datapath = datapath  # tc programs and the inventory of pod interfaces

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
    # Linux capabilities the plugin cannot work without (agent/capabilities.py names them).
    capabilities: tuple[str, ...] = ("CAP_BPF", "CAP_PERFMON")

    def check(self, tracefs: Tracefs) -> str | None:
        """Why this kernel cannot run the plugin, or None if it can."""
        return None

    def declare(self, datapath: Datapath) -> None:
        """Before any plugin starts: declare compile-time features of the tc programs."""

    def start(self, ctx: PluginContext) -> None:
        """Compile, load and attach."""

    def reconcile(self) -> None:
        """Housekeeping on the read loop (interfaces that came or went)."""

    def refresh(self) -> None:
        """Read the kernel maps (on the read loop, every interval)."""

    def problem(self) -> str | None:
        """Why the plugin is not counting everything it should (e.g. not attached
        everywhere it is expected), in one line; None when it is."""
        return None

    def metrics(self) -> Iterable[Metric]:
        return ()

    def health(self) -> PluginHealth:
        return PluginHealth()

    def save(self) -> dict:
        """On stop with lifecycle.keepAttached, after the last read: what the next agent needs
        to continue this plugin's counters exactly (JSON types); it gets it back from
        `ctx.datapath.saved(name)`. Called before close()."""
        return {}

    def close(self) -> None:
        """Detach everything; safe to call twice."""
