"""agent/k8s/listwatch.py, the one list+watch loop (the cache's and the capture controller's),
with the real kubernetes client against the API emulator."""

from __future__ import annotations

import functools
import threading
import time

import pytest
from kubernetes import client

from agent.k8s.listwatch import ListWatch, Timing, decode_page
from tests.crd_schema import api_errors, crd
from tests.k8s_emulator import K8sEmulator, make_namespace, make_pod

FAST = Timing(backoff_initial=0.05, backoff_max=0.4, watch_timeout=5, connect_timeout=1, list_timeout=5,
              page_size=2)


def eventually(check, timeout: float = 5.0, what: str = ""):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what or check}")
        time.sleep(0.02)
    return value


class Seen:
    """What the loop handed on: each (re)list's names, then the events."""

    def __init__(self):
        self.lists: list[list[str]] = []
        self.events: list[tuple[str, str]] = []
        self.synced = threading.Event()

    def on_list(self, objects):
        self.lists.append(sorted(objects))

    def on_event(self, type_, name):
        self.events.append((type_, name))


@pytest.fixture
def api():
    with K8sEmulator(bookmark_interval=0.2) as emu:
        emu.register_crd(crd("captures"), validate=api_errors)
        emu.create(make_namespace("shop"))
        yield emu


@pytest.fixture
def run(api):
    stop, loops, clients = threading.Event(), [], []

    def start(list_fn_of, kind: str, **kwargs) -> tuple[ListWatch, Seen]:
        api_client = client.ApiClient(api.client_configuration())
        clients.append(api_client)
        seen = Seen()
        loop = ListWatch(kind, list_fn_of(api_client), on_list=seen.on_list, on_event=seen.on_event,
                         on_synced=seen.synced.set, convert=lambda o: o["metadata"]["name"], stop=stop,
                         timing=FAST, **kwargs).start()
        loops.append(loop)
        return loop, seen

    yield start
    stop.set()
    for loop in loops:
        loop.interrupt()
        loop.thread.join(5)
        assert not loop.thread.is_alive()
    for c in clients:
        c.close()


def pods(api_client):
    return client.CoreV1Api(api_client).list_pod_for_all_namespaces


def captures(api_client):
    return functools.partial(client.CustomObjectsApi(api_client).list_cluster_custom_object,
                             "fovea.dev", "v1alpha1", "captures")


def capture(name: str) -> dict:
    return {"apiVersion": "fovea.dev/v1alpha1", "kind": "Capture", "metadata": {"name": name, "namespace": "shop"},
            "spec": {"target": {"podSelector": {"matchLabels": {"app": "web"}}}, "duration": "5s"}}


def test_lists_in_pages_then_watches_from_the_lists_version(api, run):
    for i in range(5):
        api.create(make_pod(f"p{i}", "shop", node="n1"))
    api.create(make_pod("elsewhere", "shop", node="n2"))
    loop, seen = run(pods, "pods", kwargs={"field_selector": "spec.nodeName=n1"})
    assert seen.synced.wait(5)
    assert seen.lists == [["p0", "p1", "p2", "p3", "p4"]]
    listed_at = loop.status().resource_version
    lists = [r for r in api.requests if r.resource == "pods" and r.verb == "list"]
    assert [r.query.get("limit") for r in lists] == ["2", "2", "2"]
    watch = eventually(lambda: next((r for r in api.requests if r.resource == "pods" and r.verb == "watch"), None))
    assert watch.query["resourceVersion"] == listed_at and watch.query["fieldSelector"] == "spec.nodeName=n1"
    api.create(make_pod("new", "shop", node="n1"))
    api.delete("pods", "p0", "shop")
    eventually(lambda: seen.events == [("ADDED", "new"), ("DELETED", "p0")], what=f"events, got {seen.events}")
    assert loop.status().lists == 1


def test_410_lists_again(api, run):
    loop, seen = run(captures, "captures")
    assert seen.synced.wait(5) and seen.lists == [[]]
    api.create(capture("one"))
    eventually(lambda: ("ADDED", "one") in seen.events)
    api.stop()
    api.create(capture("two"))
    api.compact()  # the history of the gap is gone: the watch's version is 410 Gone
    api.start()
    eventually(lambda: len(seen.lists) == 2, what="a relist")
    assert seen.lists[1] == ["one", "two"] and loop.status().lists == 2
    api.create(capture("three"))
    eventually(lambda: ("ADDED", "three") in seen.events, what="watching after the relist")


def test_backoff_grows_while_failing_and_resets_on_success(api, run):
    api.stop()
    started = time.monotonic()
    loop, seen = run(pods, "pods")
    eventually(lambda: loop.failures >= 4, what="four failed lists")
    # between them, waits of at least half of 0.05, 0.1 and 0.2 s (the caps double)
    assert time.monotonic() - started >= (0.05 + 0.1 + 0.2) / 2
    assert loop.backoff.attempt >= 4 and "list failed" in loop.status().last_error
    assert not seen.synced.is_set()
    api.start()
    assert seen.synced.wait(5)
    eventually(lambda: loop.status().failures == 0)
    assert loop.backoff.attempt == 0 and loop.status().last_error == ""


def test_failure_is_described_by_the_caller(api, run):
    loop, _ = run(missing_crd, "things", describe=lambda e: f"no such CRD here ({e.status})")
    eventually(lambda: loop.failures >= 1)
    assert loop.status().last_error == "list failed: no such CRD here (404)"


def missing_crd(api_client):
    return functools.partial(client.CustomObjectsApi(api_client).list_cluster_custom_object,
                             "fovea.dev", "v1alpha1", "things")


def test_decode_page_converts_item_by_item_in_any_key_order():
    alive = []  # the items decoded but not yet converted: never more than one
    text = ' {"kind": "PodList", "items" : [ {"n": 1}, {"n": [2]} ],\n "metadata": {"continue": "c"}} '

    def convert(item):
        alive.append(item)
        n = len(alive)
        alive.clear()
        return (item["n"], n)

    assert decode_page(text, convert) == ({"kind": "PodList", "metadata": {"continue": "c"}}, [(1, 1), ([2], 1)])
    assert decode_page('{"items": []}', convert) == ({}, [])
    assert decode_page('{"items": null, "metadata": {}}', convert) == ({"items": None, "metadata": {}}, [])


@pytest.mark.parametrize("text", ["", "[]", '{"items": [1 2]}', '{"items": [1,', '{"a": 1', '{1: 2}', '{"a" 1}'])
def test_decode_page_rejects_what_is_not_a_list_response(text):
    with pytest.raises(ValueError):
        decode_page(text, lambda o: o)
