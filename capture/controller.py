"""The capture controller in each agent: watches Capture and ClusterCapture, runs the
part of each capture that lives on this node, and reports it in the status.

One worker thread owns all state; the watch threads and the capture threads hand
it messages through a queue, so nothing here needs a lock. For each capture:

1. the spec is validated again (capture/spec.py): a bad one ends in Failed;
2. the first agent to see it resolves the target across the cluster, checks the
   boundaries (a namespaced Capture: its own namespace's pods only, never a
   hostNetwork pod) and fixes `status.expectedNodes` (a write that conflicts
   with another agent's is re-read, and the other agent's choice is kept);
3. an agent whose node is expected captures its pods' interfaces (or the
   node's uplinks for a node target) and reports in `status.nodes.<node>`;
4. every status write is a read-modify-write with the resourceVersion, retried
   on 409, and recomputes the aggregate phase from all the node reports;
5. any agent finalizes a capture whose duration + grace have passed with nodes
   that never reported (PartiallySucceeded, or Failed if none did).

Deleting the resource stops the capture and removes its files. A node report
left Running by an agent that restarted is turned into Failed by that agent
when it sees the capture again: nothing stays Running forever.
"""

from __future__ import annotations

import base64
import copy
import functools
import hmac
import json
import logging
import queue
import random
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from kubernetes import client as k8s_client
from kubernetes.client.exceptions import ApiException

from agent.errors import FoveaError
from agent.events import CaptureReport
from agent.k8s.listwatch import ListWatch, Timing, describe_error
from capture import status as st
from capture.spec import GROUP, KINDS, VERSION, CaptureSpec, SpecError, parse

log = logging.getLogger(__name__)

PLURAL_KIND = {v: k for k, v in KINDS.items()}
WATCH_TIMING = Timing(connect_timeout=5, list_timeout=30, watch_timeout=60, read_slack=15)


@dataclass
class LocalTarget:
    """What this node captures for one capture."""

    interfaces: list[tuple[str, str]]  # (host interface, comment)
    pods: list[tuple[str, str, str, tuple[str, ...]]]  # (namespace, name, netns path, IPs) for the bundle
    node_wide: bool  # the node's own state goes in the bundle (ClusterCapture only)


@dataclass
class Job:
    """A capture running on this node."""

    uid: str
    plural: str
    namespace: str
    name: str
    spec: CaptureSpec
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    deleted: bool = False
    began: float = 0.0  # wall-clock seconds this node's part started


class CaptureController:
    def __init__(self, api_client: k8s_client.ApiClient, node: str, base_dir: str, agent_namespace: str,
                 grace: float, run_job: Callable, local_target: Callable, check_filter=None,
                 tick: float = 1.0, publish: Callable | None = None):
        """run_job(job, target, secret, directory, started) -> the node report (dict), calling
        started() once capturing; local_target(pods, spec) -> LocalTarget.;
        Both come from capture/node.py; tests may pass their own. publish(CaptureReport)
        hands each finished part on (a span per capture run)."""
        self.api = k8s_client.CustomObjectsApi(api_client)
        self.core = k8s_client.CoreV1Api(api_client)
        self.node = node
        self.base = Path(base_dir)
        self.agent_namespace = agent_namespace
        self.grace = grace
        self.run_job = run_job
        self.local_target = local_target
        self.check_filter = check_filter
        self.tick = tick
        self.publish = publish
        self.jobs: dict[str, Job] = {}
        self.objects: dict[str, tuple[str, dict]] = {}  # uid -> (plural, newest object seen)
        self._artifacts: dict[str, tuple[Path, str]] = {}  # "<uid>/<file>" -> (path, token)
        self._artifacts_lock = threading.Lock()  # read by the HTTP server's threads
        self._queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._watches: list[ListWatch] = []
        self._warned: dict[str, float] = {}
        self._ticks = 0

    # --- lifecycle

    def start(self) -> None:
        try:
            self.base.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as e:
            raise FoveaError(f"cannot create the capture directory {self.base}: {e.strerror}",
                             "set captures.baseDir to a writable directory") from None
        for plural in KINDS.values():
            watch = self._list_watch(plural)
            self._watches.append(watch)
            self._threads.append(watch.thread)
        self._threads.append(threading.Thread(target=self._work, name="capture-controller", daemon=True))
        for t in self._threads:
            t.start()
        log.info("capture controller: node %s, files under %s", self.node, self.base)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop watching; a capture still running is stopped and reported Failed."""
        self._stop.set()
        for watch in self._watches:
            watch.interrupt()
        self._queue.put(("stop",))
        for t in self._threads:
            t.join(timeout)
        cut = [job for job in self.jobs.values() if job.thread is None or job.thread.is_alive()]
        for job in cut:
            job.stop.set()
            job.deleted = True  # its file is not kept: the report below says it failed
        for job in cut:
            if job.thread:
                job.thread.join(timeout)
        while True:  # jobs that finished before the stop still report their result
            try:
                msg = self._queue.get_nowait()
            except queue.Empty:
                break
            if msg[0] == "done" and not msg[1].deleted:
                self._handle(msg)
        for job in cut:
            self._report(job, {"phase": st.FAILED, "completionTime": st.now(),
                               "message": f"the agent on node {self.node} stopped during the capture"})
            shutil.rmtree(self.base / job.uid, ignore_errors=True)

    # --- downloads (called by the HTTP server)

    def artifact(self, key: str, token: str) -> Path | None:
        """The file of a finished hostPath artifact, only for its download token."""
        with self._artifacts_lock:
            entry = self._artifacts.get(key)
        if entry is None or not token or not hmac.compare_digest(entry[1].encode(), token.encode()):
            return None
        return entry[0] if entry[0].is_file() else None

    def _publish(self, uid: str, status: dict) -> None:
        art = ((status.get("nodes") or {}).get(self.node) or {}).get("artifact") or {}
        location, token = art.get("location", ""), art.get("downloadToken", "")
        prefix = f"hostpath://{self.node}/"
        if not location.startswith(prefix) or not token:
            return
        key = location[len(prefix):]
        path = self.base / key
        # The key comes from the API: it must name a file in this capture's directory, nothing else.
        if path.parent != self.base / uid or path.name in ("", ".", ".."):
            return
        with self._artifacts_lock:
            self._artifacts[key] = (path, token)

    def _unpublish(self, uid: str) -> None:
        with self._artifacts_lock:
            for key in [k for k in self._artifacts if k.split("/", 1)[0] == uid]:
                del self._artifacts[key]

    # --- watching

    def _list_watch(self, plural: str) -> ListWatch:
        """Each (re)list and event of one kind becomes a message for the worker."""
        def describe(e: Exception) -> str:
            if isinstance(e, ApiException) and e.status == 404:
                return f"the {plural}.{GROUP} CRD is not installed (kubectl apply -f deploy/crds/)"
            return describe_error(e)

        return ListWatch(
            plural, functools.partial(self.api.list_cluster_custom_object, GROUP, VERSION, plural),
            on_list=lambda items: self._queue.put(("sync", plural, items)),
            on_event=lambda type_, obj: self._queue.put(("event", plural, type_, obj)),
            stop=self._stop, timing=WATCH_TIMING, label=f"capture controller: {plural}", describe=describe,
            thread_name=f"capture-watch-{plural}")

    def _warn_once(self, key: str, msg: str, *args) -> None:
        if key not in self._warned:
            self._warned[key] = time.monotonic()
            log.warning(msg, *args)

    # --- the worker: all state changes happen here

    def _work(self) -> None:
        next_tick = time.monotonic()
        while not self._stop.is_set():
            try:
                msg = self._queue.get(timeout=max(0.0, next_tick - time.monotonic()))
            except queue.Empty:
                msg = None
            try:
                if msg is not None:
                    self._handle(msg)
                if time.monotonic() >= next_tick:
                    self._tick()
                    next_tick = time.monotonic() + self.tick
            except Exception:  # noqa: BLE001 (one capture's trouble must not stop the others)
                log.exception("capture controller: handling %s failed", msg[0] if msg else "a tick")

    def _handle(self, msg: tuple) -> None:
        if msg[0] == "sync":
            _, plural, items = msg
            uids = {(o.get("metadata") or {}).get("uid") for o in items}
            for uid, (p, obj) in list(self.objects.items()):
                if p == plural and uid not in uids:
                    self._deleted(uid)  # deleted while the watch was down
            for obj in items:
                self._seen(plural, obj)
        elif msg[0] == "event":
            _, plural, type_, obj = msg
            if type_ == "DELETED":
                self._deleted((obj.get("metadata") or {}).get("uid"))
            else:
                self._seen(plural, obj)
        elif msg[0] == "running":  # the engine has every interface open
            job = msg[1]
            if self.jobs.get(job.uid) is job and not job.deleted:
                self._report(job, {"phase": st.RUNNING, "startTime": st.now()})
        elif msg[0] == "done":
            _, job, report = msg
            self.jobs.pop(job.uid, None)
            if job.deleted:
                shutil.rmtree(self.base / job.uid, ignore_errors=True)
                return
            self._report(job, report)
            self._hand_on(job, report)

    def _hand_on(self, job: Job, report: dict) -> None:
        if self.publish is None:
            return
        self.publish(CaptureReport(
            kind="Capture" if job.namespace else "ClusterCapture", namespace=job.namespace, name=job.name,
            uid=job.uid, start=job.began or time.time(), end=time.time(), phase=report.get("phase", ""),
            packets=int(report.get("packets") or 0), bytes=int(report.get("bytes") or 0),
            dropped_packets=int(report.get("droppedPackets") or 0), filter=job.spec.filter or "",
            location=(report.get("artifact") or {}).get("location", ""), message=report.get("message", "")))

    def _seen(self, plural: str, obj: dict) -> None:
        uid = obj["metadata"]["uid"]
        old = self.objects.get(uid)
        if old is not None and _rv(old[1]) > _rv(obj):
            return  # an older version than one already handled (our own write came back first)
        self.objects[uid] = (plural, obj)
        self._reconcile(plural, obj)

    def _deleted(self, uid: str | None) -> None:
        if uid is None:
            return
        self.objects.pop(uid, None)
        self._unpublish(uid)
        job = self.jobs.get(uid)
        if job is not None:
            log.info("capture %s deleted: stopping it", _ref(job.plural, job.namespace, job.name))
            job.deleted = True
            job.stop.set()  # the job's thread ends; "done" removes its files
        else:
            shutil.rmtree(self.base / uid, ignore_errors=True)

    def _tick(self) -> None:
        """Finalize captures whose nodes did not all report in time (any agent may); every
        few ticks, handle again the captures still open (a step that failed on an API error
        is retried, not left until the next event)."""
        now = time.time()
        self._ticks += 1
        if self._ticks % 5 == 0:
            for uid, (plural, obj) in list(self.objects.items()):
                if uid not in self.jobs and (obj.get("status") or {}).get("phase") not in st.TERMINAL:
                    self._reconcile(plural, obj)
        for uid, (plural, obj) in list(self.objects.items()):
            status = obj.get("status") or {}
            if status.get("phase") != st.RUNNING or not status.get("startTime") or uid in self.jobs:
                continue
            try:
                duration = parse(obj).duration
            except SpecError:
                continue
            if now < st.parse_time(status["startTime"]) + duration + self.grace:
                continue
            updated = self._update_status(plural, obj, lambda s: None if s.get("phase") != st.RUNNING
                                          else st.aggregate(s, overdue=True))
            if updated is not None:
                log.info("capture %s: finalized after duration + grace: %s", _ref_of(plural, obj),
                         (updated.get("status") or {}).get("phase"))

    # --- one capture

    def _reconcile(self, plural: str, obj: dict) -> None:
        meta, status = obj["metadata"], obj.get("status") or {}
        uid = meta["uid"]
        if status.get("phase") in st.TERMINAL:
            self._publish(uid, status)
            return
        if meta.get("deletionTimestamp"):
            return
        try:
            spec = parse(obj, self.check_filter)
        except SpecError as e:
            self._fail(plural, obj, str(e))
            return
        if not status.get("expectedNodes"):
            try:
                nodes = self._expected_nodes(spec)
            except SpecError as e:
                self._fail(plural, obj, str(e))
                return
            except ApiException as e:
                log.warning("capture %s: cannot resolve its target yet: API error %s", _ref_of(plural, obj), e.status)
                return

            def start(s: dict):
                if s.get("expectedNodes") or s.get("phase") in st.TERMINAL:
                    return None  # another agent was first: its choice holds
                s.update(expectedNodes=nodes, phase=st.RUNNING, startTime=st.now(), message="")
                return st.aggregate(s)

            obj = self._update_status(plural, obj, start) or obj
            status = obj.get("status") or {}
            if status.get("phase") != st.RUNNING:
                return
        if self.node not in status.get("expectedNodes") or []:
            return
        mine = (status.get("nodes") or {}).get(self.node) or {}
        if uid in self.jobs or mine.get("phase") in st.NODE_DONE:
            return
        if mine.get("phase") in (st.PENDING, st.RUNNING):
            # Ours, running, but no job here: this agent restarted during the capture.
            # Discard what it had before the status says so.
            shutil.rmtree(self.base / uid, ignore_errors=True)
            self._report(Job(uid, plural, meta.get("namespace", ""), meta["name"], spec), {
                "phase": st.FAILED, "completionTime": st.now(),
                "message": f"the agent on node {self.node} restarted during the capture; what it had captured "
                           "was discarded"})
            return
        self._start(plural, obj, spec)

    def _start(self, plural: str, obj: dict, spec: CaptureSpec) -> None:
        meta = obj["metadata"]
        job = Job(meta["uid"], plural, meta.get("namespace", ""), meta["name"], spec)
        try:
            target = self.local_target(self._target_pods(spec, self.node), spec)
        except SpecError as e:
            self._report(job, {"phase": st.FAILED, "completionTime": st.now(), "message": str(e)})
            return
        except ApiException as e:
            log.warning("capture %s: cannot list its pods: API error %s", _ref_of(plural, obj), e.status)
            return  # the next event or relist tries again
        self.jobs[job.uid] = job
        updated = self._report(job, {"phase": st.PENDING})
        if updated is None or (updated.get("status") or {}).get("phase") != st.RUNNING:
            self.jobs.pop(job.uid, None)
            return
        log.info("capture %s: capturing on %s", _ref_of(plural, obj), ", ".join(i for i, _ in target.interfaces))
        job.thread = threading.Thread(target=self._run, args=(job, target), name=f"capture-{job.name}", daemon=True)
        job.thread.start()

    def _run(self, job: Job, target: LocalTarget) -> None:
        job.began = time.time()
        try:
            secret = self._secret(job) if job.spec.output.secret else {}
            report = self.run_job(job, target, secret, self.base / job.uid,
                                  lambda: self._queue.put(("running", job)))
        except SpecError as e:
            report = {"phase": st.FAILED, "message": str(e)}
        except ApiException as e:
            report = {"phase": st.FAILED, "message": _api_problem(e, job, job.namespace or self.agent_namespace)}
        except Exception as e:  # noqa: BLE001 (reported in the status, never lost)
            log.exception("capture %s failed", _ref(job.plural, job.namespace, job.name))
            report = {"phase": st.FAILED, "message": f"{type(e).__name__}: {e}"}
        report.setdefault("completionTime", st.now())
        self._queue.put(("done", job, report))

    def _secret(self, job: Job) -> dict[str, str]:
        """The Secret the spec names: `get` only, from the Capture's namespace (a ClusterCapture:
        the agent's). Its values are handed to the upload and never logged."""
        ns = job.namespace or self.agent_namespace
        secret = self.core.read_namespaced_secret(job.spec.output.secret, ns, _request_timeout=(5, 30))
        return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}

    def _report(self, job: Job, report: dict) -> dict | None:
        """Write this node's report and the aggregate that follows from it."""
        node = self.node

        def write(s: dict):
            if s.get("phase") in st.TERMINAL and report.get("phase") == st.RUNNING:
                return None
            if s.get("phase") in st.TERMINAL:
                return None  # finalized without us (we were too late): the report would change nothing
            nodes = s.setdefault("nodes", {})
            nodes[node] = dict(nodes.get(node) or {}, **report)
            return st.aggregate(s)

        obj = self.objects.get(job.uid, (job.plural, None))[1] or {
            "metadata": {"name": job.name, "namespace": job.namespace, "uid": job.uid}}
        return self._update_status(job.plural, obj, write)

    def _fail(self, plural: str, obj: dict, message: str) -> None:
        log.info("capture %s failed: %s", _ref_of(plural, obj), message)
        self._update_status(plural, obj, lambda s: None if s.get("phase") in st.TERMINAL else st.fail(s, message))

    # --- the API

    def _update_status(self, plural: str, obj: dict, mutate: Callable[[dict], dict | None]) -> dict | None:
        """Read-modify-write of the status subresource with the resourceVersion, retried on
        409: mutate(status) returns the new status, or None for no change. Returns the object
        as written (or as read when unchanged), None if it is gone."""
        meta = obj["metadata"]
        ns, name = meta.get("namespace", ""), meta["name"]
        current = obj if meta.get("resourceVersion") else None
        for attempt in range(20):
            if current is None:
                try:
                    current = self._get(plural, ns, name)
                except ApiException as e:
                    if e.status == 404:
                        return None
                    raise
            if meta.get("uid") and current["metadata"].get("uid") != meta["uid"]:
                return None  # a new object of the same name: not the capture we are working on
            new_status = mutate(copy.deepcopy(current.get("status") or {}))
            if new_status is None:
                return current
            body = dict(current, status=new_status)
            try:
                if ns:
                    written = self.api.replace_namespaced_custom_object_status(GROUP, VERSION, ns, plural, name, body)
                else:
                    written = self.api.replace_cluster_custom_object_status(GROUP, VERSION, plural, name, body)
            except ApiException as e:
                if e.status == 409:
                    current = None  # someone else wrote first: read again and redo the change
                    time.sleep(random.uniform(0, 0.05 * min(attempt + 1, 10)))
                    continue
                if e.status == 404:
                    return None
                if e.status == 422:  # an API server that refuses the object as it stands: say so, once
                    self._warn_once(f"invalid:{current['metadata'].get('uid')}",
                                    "capture %s: the API server refuses its status update: %s",
                                    _ref(plural, ns, name), _api_message(e))
                    return None
                raise
            uid = written["metadata"]["uid"]
            if uid in self.objects and _rv(self.objects[uid][1]) < _rv(written):
                self.objects[uid] = (plural, written)
            return written
        raise RuntimeError(f"status of {_ref(plural, ns, name)}: still conflicting after 20 attempts")

    def _get(self, plural: str, ns: str, name: str) -> dict:
        if ns:
            return self.api.get_namespaced_custom_object(GROUP, VERSION, ns, plural, name, _request_timeout=(5, 30))
        return self.api.get_cluster_custom_object(GROUP, VERSION, plural, name, _request_timeout=(5, 30))

    def _expected_nodes(self, spec: CaptureSpec) -> list[str]:
        if spec.target.nodes:
            nodes = self._target_nodes(spec)
            if not nodes:
                raise SpecError("no node matches the target", "check nodeNames or nodeSelector")
            return nodes
        pods = self._target_pods(spec, None)
        nodes = sorted({p["spec"]["nodeName"] for p in pods})
        if not nodes:
            where = f"namespace {spec.namespace}" if spec.namespace else "the selected namespaces"
            raise SpecError(f"no running pod in {where} matches the target", "check the selector or pod names")
        return nodes

    def _target_nodes(self, spec: CaptureSpec) -> list[str]:
        t = spec.target
        if t.node_selector is not None:
            items = self._list(self.core.list_node, label_selector=t.node_selector.to_query())
            return sorted(n["metadata"]["name"] for n in items)
        names = {n["metadata"]["name"] for n in self._list(self.core.list_node)}
        missing = [n for n in t.node_names if n not in names]
        if missing:
            raise SpecError(f"no node named {', '.join(missing)}", "check spec.target.nodeNames")
        return sorted(t.node_names)

    def _target_pods(self, spec: CaptureSpec, node: str | None) -> list[dict]:
        """The target pods that run (on `node`, or anywhere), with the boundaries checked."""
        t = spec.target
        fields = f"spec.nodeName={node}" if node else None
        if spec.target.nodes:
            return []
        if not spec.cluster:
            selector = t.pod_selector.to_query() if t.pod_selector is not None else None
            pods = self._list(self.core.list_namespaced_pod, spec.namespace, label_selector=selector,
                              field_selector=fields)
            if t.pod_names:
                by_name = {p["metadata"]["name"]: p for p in pods}
                if node is None:
                    missing = [n for n in t.pod_names if n not in by_name]
                    if missing:
                        raise SpecError(f"no pod named {', '.join(missing)} in namespace {spec.namespace}",
                                        "a Capture reaches only the pods of its own namespace; a ClusterCapture "
                                        "reaches others")
                pods = [by_name[n] for n in t.pod_names if n in by_name]
            for p in pods:
                if (p.get("spec") or {}).get("hostNetwork"):
                    raise SpecError(f"pod {spec.namespace}/{p['metadata']['name']} uses the node's network "
                                    "(hostNetwork): capturing it would capture the whole node",
                                    "that needs a ClusterCapture")
        else:
            namespaces = {n["metadata"]["name"] for n in self._list(
                self.core.list_namespace, label_selector=t.namespace_selector.to_query() or None)}
            selector = t.pod_selector.to_query() if t.pod_selector is not None else None
            pods = [p for p in self._list(self.core.list_pod_for_all_namespaces, label_selector=selector or None,
                                          field_selector=fields)
                    if p["metadata"].get("namespace") in namespaces]
        return [p for p in pods if (p.get("spec") or {}).get("nodeName")
                and (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
                and not p["metadata"].get("deletionTimestamp")]

    @staticmethod
    def _list(fn, *args, **kwargs) -> list[dict]:
        kwargs = {k: v for k, v in kwargs.items() if v}
        resp = fn(*args, _preload_content=False, _request_timeout=(5, 30), **kwargs)
        try:
            return json.loads(resp.data).get("items") or []
        finally:
            resp.release_conn()


def _rv(obj: dict) -> int:
    try:
        return int((obj.get("metadata") or {}).get("resourceVersion") or 0)
    except ValueError:
        return 0


def _ref(plural: str, ns: str, name: str) -> str:
    return f"{PLURAL_KIND[plural]} {ns + '/' if ns else ''}{name}"


def _ref_of(plural: str, obj: dict) -> str:
    meta = obj.get("metadata") or {}
    return _ref(plural, meta.get("namespace", ""), meta.get("name", ""))


def _api_message(e: ApiException) -> str:
    try:
        return json.loads(e.body).get("message") or e.reason
    except (TypeError, ValueError, AttributeError):
        return str(e.reason)


def _api_problem(e: ApiException, job: Job, ns: str) -> str:
    if e.status == 404:
        return f"Secret {job.spec.output.secret} not found in namespace {ns}"
    if e.status == 403:
        return f"the agent may not read Secret {job.spec.output.secret} in namespace {ns}"
    return f"API error {e.status} ({e.reason})"
