"""Supervision: no error in one component stops the agent or any of its threads.

A component (a plugin's housekeeping or map read, an exporter thread, one
client request) that raises is logged (at most once a minute per component),
counted in fovea_agent_restarts_total{component} and run again after a
backoff that doubles on each failure in a row and resets after a success.

Test-only fault injection: FOVEA_TEST_FAULTS="point*N,point2" makes
`fault(point)` raise N times (once without *N) at that point; the tests use
it to prove that the agent survives and keeps counting. Never set it in
production.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

LOG_EVERY = 60.0  # seconds between two logged errors of one component
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0


class InjectedFault(RuntimeError):
    """Raised by fault() where FOVEA_TEST_FAULTS asks for it (tests only)."""


def _parse_faults(spec: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        point, _, count = item.partition("*")
        out[point] = int(count) if count else 1
    return out


_faults = _parse_faults(os.environ.get("FOVEA_TEST_FAULTS", ""))
_faults_lock = threading.Lock()


def fault(point: str) -> None:
    """Raise InjectedFault if FOVEA_TEST_FAULTS still asks for one at `point`."""
    if not _faults:
        return
    with _faults_lock:
        left = _faults.get(point, 0)
        if left <= 0:
            return
        _faults[point] = left - 1
    raise InjectedFault(f"injected fault at {point} (FOVEA_TEST_FAULTS)")


class Supervisor:
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._lock = threading.Lock()
        self.restarts: dict[str, int] = {}
        self._failures_in_a_row: dict[str, int] = {}
        self._resume_at: dict[str, float] = {}
        self._logged_at: dict[str, float] = {}

    def failed(self, component: str, error: BaseException) -> float:
        """Log (rate-limited) and count a failure; returns the backoff before the next try."""
        now = self.clock()
        with self._lock:
            self.restarts[component] = self.restarts.get(component, 0) + 1
            n = self._failures_in_a_row[component] = self._failures_in_a_row.get(component, 0) + 1
            backoff = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (n - 1))
            self._resume_at[component] = now + backoff
            quiet = now - self._logged_at.get(component, -LOG_EVERY) < LOG_EVERY
            if not quiet:
                self._logged_at[component] = now
        if not quiet:
            log.error("%s failed (restarting in %.1fs): %s", component, backoff,
                      f"{type(error).__name__}: {error}", exc_info=not isinstance(error, InjectedFault))
        return backoff

    def succeeded(self, component: str) -> None:
        with self._lock:
            self._failures_in_a_row.pop(component, None)

    def waiting(self, component: str) -> bool:
        """True while a component that failed waits out its backoff."""
        with self._lock:
            return self.clock() < self._resume_at.get(component, 0.0)

    def call(self, component: str, fn: Callable[[], object]) -> bool | None:
        """Run fn unless the component is backing off: True if it ran and returned,
        False if it raised (logged, counted), None if it was not run (backing off)."""
        if self.waiting(component):
            return None
        try:
            fault(component)
            fn()
        except Exception as e:
            self.failed(component, e)
            return False
        self.succeeded(component)
        return True

    def thread(self, component: str, body: Callable[[], None], stop: threading.Event) -> threading.Thread:
        """A daemon thread that runs body() until `stop` is set, and runs it again
        (after the backoff) when it raises. body returns when stop is set."""

        def run():
            while not stop.is_set():
                started = self.clock()
                try:
                    body()
                    return
                except Exception as e:
                    if self.clock() - started > BACKOFF_MAX:  # it had been working: start the backoff over
                        self.succeeded(component)
                    stop.wait(self.failed(component, e))

        t = threading.Thread(target=run, name=component, daemon=True)
        t.start()
        return t

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self.restarts)
