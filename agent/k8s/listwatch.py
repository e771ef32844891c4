"""List, then watch, one kind of Kubernetes object: the loop behind the agent's cache
(agent/k8s/cache.py) and the capture controller (capture/controller.py).

A thread of its own ("reflector", as client-go calls it):

- it reads raw JSON (`_preload_content=False`), paged, and hands on what `convert`
  makes of each object, never the client's model objects (~49 KiB a pod); a page
  is decoded one item at a time (decode_page), so a page of 500 pods never lives
  as ~10 MB of dicts at once;
- it watches from the list's resourceVersion and resumes a broken watch from the
  last one it saw; bookmarks (allowWatchBookmarks) keep that version fresh when its
  own objects are quiet, so a resume rarely falls outside the server's history;
- 410 Gone/Expired (or "too large") means the version is unusable: it lists again
  and `on_list` gets the whole new state;
- failures back off exponentially with jitter, reset by the next success, and warn
  at most once per `warn_interval`;
- it never dies: only `stop` ends it.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import threading
import time
from dataclasses import dataclass
from typing import Callable

import urllib3
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Timing:
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    watch_timeout: float = 300.0  # server-side timeoutSeconds of a watch (x1 to x1.5, spread)
    page_size: int = 500
    connect_timeout: float = 10.0
    list_timeout: float = 60.0
    read_slack: float = 30.0  # a watch silent this long past its timeout is dead
    warn_interval: float = 60.0


@dataclass(frozen=True)
class ReflectorStatus:
    kind: str
    synced: bool  # the first list is done
    resource_version: str  # the last one seen (list, event or bookmark)
    lists: int  # lists done (more than 1: relists after 410)
    failures: int  # consecutive failures, 0 when healthy
    last_error: str


class Backoff:
    """Exponential backoff with "equal jitter": half the delay fixed, half random."""

    def __init__(self, initial: float, maximum: float):
        self.initial, self.maximum, self.attempt = initial, maximum, 0

    def next(self) -> float:
        delay = min(self.maximum, self.initial * 2 ** min(self.attempt, 30))
        self.attempt += 1
        return delay / 2 + random.uniform(0, delay / 2)

    def reset(self) -> None:
        self.attempt = 0


class QuietLog:
    """A warning at most once per interval per key; the rest at debug level, counted."""

    def __init__(self, interval: float, logger: logging.Logger = log):
        self.interval, self.logger = interval, logger
        self._lock = threading.Lock()
        self._warned: dict[str, tuple[float, int]] = {}

    def warn(self, key: str, msg: str, *args, exc_info: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            last, suppressed = self._warned.get(key, (-math.inf, 0))
            loud = now - last >= self.interval
            self._warned[key] = (now, 0) if loud else (last, suppressed + 1)
        if loud:
            if suppressed:
                msg += " (%d similar message(s) since the last warning)"
                args += (suppressed,)
            self.logger.warning(msg, *args, exc_info=exc_info)
        else:
            self.logger.debug(msg, *args, exc_info=exc_info)


_decoder = json.JSONDecoder()
_space = re.compile(r"[ \t\n\r]*")


def decode_page(text: str, convert: Callable[[dict], object]) -> tuple[dict, list]:
    """A list response ({"metadata": ..., "items": [...], ...}, any key order): its top-level
    fields but "items", and convert(item) of each item, decoded and converted one at a time."""
    def skip(i: int) -> int:
        return _space.match(text, i).end()

    def expect(i: int, chars: str) -> tuple[str, int]:
        c = text[i:i + 1]
        if not c or c not in chars:
            raise ValueError(f"a list response is not a JSON object with an items array (at character {i})")
        return c, skip(i + 1)

    fields, items = {}, []
    _, i = expect(skip(0), "{")
    if text[i:i + 1] == "}":
        return fields, items
    while True:
        key, i = _decoder.raw_decode(text, i)
        if not isinstance(key, str):
            expect(i, "")  # a key that is not a string: the error above
        _, i = expect(skip(i), ":")
        if key == "items" and text[i:i + 1] == "[":
            i = skip(i + 1)
            if text[i:i + 1] == "]":
                i += 1
            else:
                while True:
                    item, i = _decoder.raw_decode(text, i)
                    items.append(convert(item))
                    c, i = expect(skip(i), ",]")
                    if c == "]":
                        break
        else:
            fields[key], i = _decoder.raw_decode(text, i)
        c, i = expect(skip(i), ",}")
        if c == "}":
            return fields, items


class _Expired(Exception):
    """410: the resourceVersion is older than the server's history."""


def describe_error(e: Exception) -> str:
    """An API failure in one line: the cause, without urllib3's retry wording and the whole URL."""
    if isinstance(e, urllib3.exceptions.MaxRetryError) and e.reason is not None:
        e = e.reason
    if isinstance(e, ApiException):
        reason = e.reason
        try:
            reason = json.loads(e.body).get("message") or reason
        except (TypeError, ValueError, AttributeError):
            pass
        return f"API error {e.status}: {reason}"
    text = str(e).strip() or type(e).__name__
    return text if len(text) < 300 else text[:300] + "..."


def _too_large(status: dict) -> bool:
    """The server has not reached our resourceVersion (another API server, or one restored
    from a backup): client-go lists afresh, and so do we."""
    causes = (status.get("details") or {}).get("causes") or []
    return any(c.get("reason") == "ResourceVersionTooLarge" for c in causes)


class ListWatch:
    """List+watch of one kind. `list_fn` is a client list call (e.g. CoreV1Api.list_namespace,
    or list_cluster_custom_object with its group, version and plural bound), `kwargs` its
    selectors. `on_list(objects)` gets the whole state after each (re)list, `on_event(type,
    object)` each ADDED, MODIFIED or DELETED, `on_synced()` the end of the first list; all
    are called from this thread, objects as `convert` made them."""

    def __init__(self, kind: str, list_fn: Callable, *, on_list: Callable[[list], None],
                 on_event: Callable[[str, object], None], stop: threading.Event, kwargs: dict | None = None,
                 convert: Callable[[dict], object] = lambda o: o, on_synced: Callable[[], None] | None = None,
                 timing: Timing = Timing(), label: str = "", describe: Callable[[Exception], str] = describe_error,
                 thread_name: str = ""):
        self.kind = kind
        self.label = label or f"k8s {kind}"
        self.list_fn, self.kwargs, self.convert = list_fn, kwargs or {}, convert
        self.on_list, self.on_event, self.on_synced = on_list, on_event, on_synced
        self.stop, self.timing, self.describe = stop, timing, describe
        self.rv: str | None = None  # None: list before watching
        self.synced = False
        self.lists = 0
        self.failures = 0
        self.last_error = ""
        self.doing = "list"
        self.backoff = Backoff(timing.backoff_initial, timing.backoff_max)
        self.warnings = QuietLog(timing.warn_interval)
        self.thread = threading.Thread(target=self._run, name=thread_name or f"k8s-{kind}", daemon=True)
        self._resp = None
        self._resp_lock = threading.Lock()

    def start(self) -> "ListWatch":
        self.thread.start()
        return self

    def status(self) -> ReflectorStatus:
        return ReflectorStatus(self.kind, self.synced, self.rv or "", self.lists, self.failures, self.last_error)

    def interrupt(self) -> None:
        """Unblock a read in progress (after setting `stop`)."""
        with self._resp_lock:
            resp = self._resp
        if resp is None:
            return
        try:
            resp.shutdown()  # urllib3 >= 2.3: shuts the socket down, the reader wakes
        except Exception:  # noqa: BLE001 (best effort: the read timeout ends it anyway)
            log.debug("%s: cannot interrupt the watch", self.label, exc_info=True)

    def _run(self) -> None:
        stop = self.stop
        expired_in_a_row = 0
        while not stop.is_set():
            try:
                if self.rv is None:
                    self._list()
                self._watch()
                expired_in_a_row = 0
            except _Expired:
                if stop.is_set():
                    break
                log.info("%s: resourceVersion %s is too old for the API server, listing again", self.label, self.rv)
                self.rv = None
                expired_in_a_row += 1
                if expired_in_a_row > 1:  # the server keeps expiring fresh versions: do not spin
                    stop.wait(self.backoff.next())
            except Exception as e:  # noqa: BLE001 (any failure: back off and try again, never die)
                if stop.is_set():
                    break
                self._failed(e)
        log.debug("%s: stopped", self.label)

    def _failed(self, e: Exception) -> None:
        self.failures += 1
        self.last_error = f"{self.doing} failed: {self.describe(e)}"
        delay = self.backoff.next()
        self.warnings.warn(self.kind, "%s: %s (failure %d); retrying in %.1fs%s", self.label, self.last_error,
                           self.failures, delay, "" if self.synced else "; not synced yet")
        self.stop.wait(delay)

    def _succeeded(self) -> None:
        if self.failures:
            log.info("%s: talking to the API server again after %d failure(s)", self.label, self.failures)
        self.failures = 0
        self.last_error = ""
        self.backoff.reset()

    def _list(self) -> None:
        t = self.timing
        objects, rv, cont, pages = [], None, None, 0
        self.doing = "list"
        while True:
            try:
                resp = self.list_fn(limit=t.page_size, _continue=cont, _preload_content=False,
                                    _request_timeout=(t.connect_timeout, t.list_timeout), **self.kwargs)
            except ApiException as e:
                if e.status == 410:
                    raise _Expired() from None  # the continue token expired: list again from the start
                raise
            try:
                data, page = decode_page(resp.data.decode("utf-8"), self.convert)
            finally:
                resp.release_conn()
            meta = data.get("metadata") or {}
            rv = rv or meta.get("resourceVersion")
            objects.extend(page)
            pages += 1
            cont = meta.get("continue")
            if not cont:
                break
        if not rv:
            raise ValueError("the list has no resourceVersion")
        self.on_list(objects)
        self.rv = rv
        self.lists += 1
        self._succeeded()
        log.log(logging.INFO if self.lists == 1 else logging.DEBUG,
                "%s: listed %d at resourceVersion %s (%d page(s))", self.label, len(objects), rv, pages)
        if not self.synced:
            self.synced = True
            if self.on_synced is not None:
                self.on_synced()

    def _watch(self) -> None:
        t = self.timing
        timeout = max(1, int(t.watch_timeout * random.uniform(1.0, 1.5)))  # spread the reconnects
        started, events = time.monotonic(), 0
        self.doing = "watch"
        try:
            resp = self.list_fn(watch=True, resource_version=self.rv, allow_watch_bookmarks=True,
                                timeout_seconds=timeout, _preload_content=False,
                                _request_timeout=(t.connect_timeout, timeout + t.read_slack), **self.kwargs)
        except ApiException as e:
            if e.status == 410:
                raise _Expired() from None
            raise
        with self._resp_lock:
            self._resp = resp
        try:
            if self.stop.is_set():
                return
            for line in iter_resp_lines(resp):
                if self.stop.is_set():
                    return
                if not line.strip():
                    continue
                event = json.loads(line)
                type_, obj = event.get("type"), event.get("object") or {}
                if type_ == "ERROR":
                    if obj.get("code") == 410 or _too_large(obj):
                        raise _Expired()
                    raise RuntimeError(f"watch error {obj.get('code')} {obj.get('reason')}: {obj.get('message')}")
                rv = (obj.get("metadata") or {}).get("resourceVersion")
                if type_ in ("ADDED", "MODIFIED", "DELETED"):
                    self.on_event(type_, self.convert(obj))
                elif type_ != "BOOKMARK":
                    log.debug("%s: ignoring a watch event of type %r", self.label, type_)
                    continue
                if rv:
                    self.rv = rv
                events += 1
                if events == 1:
                    self._succeeded()
        finally:
            with self._resp_lock:
                self._resp = None
            resp.close()
            resp.release_conn()
        if events == 0 and time.monotonic() - started < 1.0 and not self.stop.is_set():
            # A watch that ends at once, empty, is a failure (a proxy cutting it, say): back off.
            raise RuntimeError("the watch ended at once without an event")
