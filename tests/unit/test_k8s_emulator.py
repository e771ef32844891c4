"""tests/k8s_emulator.py, checked with the real kubernetes client (and real kubectl)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import kubernetes
import pytest
from tests.conftest import require
from k8s_emulator import (
    ApiError,
    K8sEmulator,
    make_namespace,
    make_node,
    make_pod,
    make_secret,
    make_service,
)
from kubernetes.client import ApiClient, CoreV1Api, CustomObjectsApi
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines


@pytest.fixture
def api():
    with K8sEmulator(bookmark_interval=0.2) as emu:
        emu.create(make_namespace("shop"))
        emu.create(make_namespace("infra"))
        yield emu


@pytest.fixture
def client(api):
    c = ApiClient(api.client_configuration())
    yield c
    c.close()


@pytest.fixture
def core(client):
    return CoreV1Api(client)


def names(items) -> list[str]:
    return [i.metadata.name for i in items]


def status_of(e: ApiException) -> dict:
    body = json.loads(e.body)
    assert body["kind"] == "Status" and body["status"] == "Failure"
    return body


def raw_watch(fn, *args, **kwargs) -> list[dict]:
    """Every event of one watch call, as JSON (the call must have timeout_seconds)."""
    resp = fn(*args, watch=True, _preload_content=False, **kwargs)
    try:
        return [json.loads(line) for line in iter_resp_lines(resp) if line]
    finally:
        resp.release_conn()


def seed_pods(api):
    api.create(make_pod("web-1", "shop", node="n1", ip="10.0.1.1", labels={"app": "web", "tier": "front"}))
    api.create(make_pod("web-2", "shop", node="n2", ip="10.0.2.1", labels={"app": "web"}))
    api.create(make_pod("db-1", "shop", node="n1", ip="10.0.1.2", labels={"app": "db"}, phase="Pending"))
    api.create(make_pod("dns-1", "infra", node="n1", ip="10.0.1.3", labels={"app": "dns", "tier": "back"}))
    api.create(make_pod("unscheduled", "infra", phase="Pending"))


# --- list

def test_list_cluster_wide_and_namespaced(api, core):
    seed_pods(api)
    everything = core.list_pod_for_all_namespaces()
    assert sorted(names(everything.items)) == ["db-1", "dns-1", "unscheduled", "web-1", "web-2"]
    assert int(everything.metadata.resource_version) == int(api.resource_version)
    assert sorted(names(core.list_namespaced_pod("infra").items)) == ["dns-1", "unscheduled"]
    assert names(core.list_namespaced_pod("nowhere").items) == []


@pytest.mark.parametrize("selector, expected", [
    ("spec.nodeName=n1", ["db-1", "dns-1", "web-1"]),
    ("spec.nodeName==n2", ["web-2"]),
    ("spec.nodeName!=n1", ["unscheduled", "web-2"]),
    ("spec.nodeName=", ["unscheduled"]),  # a missing field is the empty string
    ("spec.nodeName=n1,status.phase=Running", ["dns-1", "web-1"]),
    ("status.phase!=Running", ["db-1", "unscheduled"]),
    ("metadata.name=web-2", ["web-2"]),
    ("metadata.namespace=infra", ["dns-1", "unscheduled"]),
])
def test_field_selectors(api, core, selector, expected):
    seed_pods(api)
    assert sorted(names(core.list_pod_for_all_namespaces(field_selector=selector).items)) == expected


@pytest.mark.parametrize("selector, expected", [
    ("app=web", ["web-1", "web-2"]),
    ("app==web", ["web-1", "web-2"]),
    ("app!=web", ["db-1", "dns-1", "unscheduled"]),  # != also matches pods without the label
    ("app in (db, dns)", ["db-1", "dns-1"]),
    ("app notin (web,db)", ["dns-1", "unscheduled"]),
    ("tier", ["dns-1", "web-1"]),
    ("!tier", ["db-1", "unscheduled", "web-2"]),
    ("app=web,tier=front", ["web-1"]),
    ("app in (web,dns),!tier", ["web-2"]),
])
def test_label_selectors(api, core, selector, expected):
    seed_pods(api)
    assert sorted(names(core.list_pod_for_all_namespaces(label_selector=selector).items)) == expected


def test_bad_selectors_are_400(api, core):
    with pytest.raises(ApiException) as e:
        core.list_pod_for_all_namespaces(field_selector="spec.containers=x")
    assert e.value.status == 400 and "field label not supported" in status_of(e.value)["message"]
    with pytest.raises(ApiException) as e:
        core.list_pod_for_all_namespaces(label_selector="bad key!=x")
    assert e.value.status == 400


def test_list_pages_with_limit_and_continue(api, core):
    for i in range(7):
        api.create(make_pod(f"p{i}", "shop", node="n1"))
    first = core.list_namespaced_pod("shop", limit=3)
    assert names(first.items) == ["p0", "p1", "p2"] and first.metadata.remaining_item_count == 4
    second = core.list_namespaced_pod("shop", limit=3, _continue=first.metadata._continue)
    third = core.list_namespaced_pod("shop", limit=3, _continue=second.metadata._continue)
    assert names(second.items) == ["p3", "p4", "p5"] and names(third.items) == ["p6"]
    assert third.metadata._continue is None
    assert second.metadata.resource_version == first.metadata.resource_version
    api.create(make_pod("late", "shop"))
    api.compact()
    with pytest.raises(ApiException) as e:
        core.list_namespaced_pod("shop", limit=3, _continue=first.metadata._continue)
    assert e.value.status == 410 and status_of(e.value)["reason"] == "Expired"


# --- watch

def test_watch_sees_added_modified_deleted_in_order(api, core):
    start = core.list_namespaced_pod("shop").metadata.resource_version
    events: list = []
    w = kubernetes.watch.Watch()

    def consume():
        for ev in w.stream(core.list_namespaced_pod, "shop", resource_version=start, timeout_seconds=3):
            events.append((ev["type"], ev["object"].metadata.name, ev["object"].metadata.resource_version))
            if len(events) == 3:
                w.stop()

    t = threading.Thread(target=consume)
    t.start()
    time.sleep(0.2)
    core.create_namespaced_pod("shop", make_pod("web-1", "shop", node="n1"))
    core.patch_namespaced_pod("web-1", "shop", {"metadata": {"labels": {"v": "2"}}})
    core.delete_namespaced_pod("web-1", "shop")
    t.join(5)
    assert [(t_, n) for t_, n, _ in events] == [("ADDED", "web-1"), ("MODIFIED", "web-1"), ("DELETED", "web-1")]
    rvs = [int(rv) for _, _, rv in events]
    assert rvs == sorted(rvs) and len(set(rvs)) == 3 and rvs[-1] == int(api.resource_version)


def test_watch_resumes_from_a_resource_version(api, core):
    api.create(make_pod("a", "shop"))
    middle = api.resource_version
    api.create(make_pod("b", "shop"))
    api.patch("pods", "a", {"metadata": {"labels": {"x": "1"}}}, "shop")
    events = raw_watch(core.list_namespaced_pod, "shop", resource_version=middle, timeout_seconds=1)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "b"), ("MODIFIED", "a")]


def test_watch_without_resource_version_starts_with_the_current_objects(api, core):
    api.create(make_pod("a", "shop"))
    events = raw_watch(core.list_namespaced_pod, "shop", timeout_seconds=1)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "a")]


def test_watch_applies_selectors_and_reports_objects_leaving_them(api, core):
    start = api.resource_version
    api.create(make_pod("a", "shop", node="n1", labels={"app": "web"}))
    api.create(make_pod("b", "shop", node="n2", labels={"app": "web"}))
    api.patch("pods", "a", {"metadata": {"labels": {"app": "db"}}}, "shop")  # leaves app=web
    api.patch("pods", "a", {"metadata": {"labels": {"app": "web"}}}, "shop")  # comes back
    api.delete("pods", "a", "shop")
    events = raw_watch(core.list_pod_for_all_namespaces, resource_version=start, timeout_seconds=1,
                       label_selector="app=web", field_selector="spec.nodeName=n1")
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("ADDED", "a"), ("DELETED", "a"), ("ADDED", "a"), ("DELETED", "a")]


def test_watch_from_a_compacted_version_gets_410_expired(api, core):
    api.create(make_pod("a", "shop"))
    old = api.resource_version
    api.create(make_pod("b", "shop"))
    api.compact()
    events = raw_watch(core.list_namespaced_pod, "shop", resource_version=old, timeout_seconds=1)
    assert len(events) == 1 and events[0]["type"] == "ERROR"
    assert events[0]["object"]["code"] == 410 and events[0]["object"]["reason"] == "Expired"
    # the client's own Watch turns it into an ApiException (it does not retry when given a timeout)
    with pytest.raises(ApiException) as e:
        list(kubernetes.watch.Watch().stream(core.list_namespaced_pod, "shop", resource_version=old,
                                             timeout_seconds=1))
    assert e.value.status == 410
    # the current version is still fine
    assert raw_watch(core.list_namespaced_pod, "shop", resource_version=api.resource_version,
                     timeout_seconds=1) == []


def test_history_limit_compacts_by_itself(core):
    with K8sEmulator(history_limit=3) as api:
        api.create(make_namespace("shop"))
        first = api.resource_version
        for i in range(5):
            api.create(make_pod(f"p{i}", "shop"))
        events = raw_watch(CoreV1Api(ApiClient(api.client_configuration())).list_namespaced_pod, "shop",
                           resource_version=first, timeout_seconds=1)
        assert events[0]["object"]["code"] == 410


def test_bookmarks_carry_the_newest_resource_version(api, core):
    start = api.resource_version

    def write_elsewhere():
        time.sleep(0.3)
        api.create(make_secret("s", "infra"))  # not a pod: no pod event, but the version moves

    threading.Thread(target=write_elsewhere).start()
    events = raw_watch(core.list_namespaced_pod, "shop", resource_version=start, timeout_seconds=1,
                       allow_watch_bookmarks=True)
    assert events and {e["type"] for e in events} == {"BOOKMARK"}
    assert events[-1]["object"]["metadata"] == {"resourceVersion": api.resource_version}
    assert int(api.resource_version) > int(start)
    assert raw_watch(core.list_namespaced_pod, "shop", resource_version=start, timeout_seconds=1) == []


def test_watch_honours_timeout_seconds(api, core):
    started = time.monotonic()
    raw_watch(core.list_namespaced_pod, "shop", resource_version=api.resource_version, timeout_seconds=1)
    assert 0.9 < time.monotonic() - started < 3


# --- writes

def test_update_with_a_stale_resource_version_is_409(api, core):
    api.create(make_pod("a", "shop"))
    pod = core.read_namespaced_pod("a", "shop")
    pod.metadata.labels = {"v": "1"}
    updated = core.replace_namespaced_pod("a", "shop", pod)
    assert int(updated.metadata.resource_version) > int(pod.metadata.resource_version)
    pod.metadata.labels = {"v": "2"}  # still carries the old resourceVersion
    with pytest.raises(ApiException) as e:
        core.replace_namespaced_pod("a", "shop", pod)
    assert e.value.status == 409 and status_of(e.value)["reason"] == "Conflict"
    with pytest.raises(ApiException) as e:
        core.patch_namespaced_pod("a", "shop", {"metadata": {"resourceVersion": pod.metadata.resource_version,
                                                             "labels": {"v": "3"}}})
    assert e.value.status == 409
    # a no-op write changes nothing
    same = core.patch_namespaced_pod("a", "shop", {"metadata": {"labels": {"v": "1"}}})
    assert same.metadata.resource_version == updated.metadata.resource_version


def test_patch_kinds(api, core):
    api.create(make_pod("a", "shop", labels={"keep": "1", "drop": "1"}))
    core.patch_namespaced_pod("a", "shop", {"metadata": {"labels": {"drop": None, "new": "1"}}})
    assert core.read_namespaced_pod("a", "shop").metadata.labels == {"keep": "1", "new": "1"}
    core.patch_namespaced_pod("a", "shop", [{"op": "replace", "path": "/metadata/labels/keep", "value": "2"},
                                            {"op": "remove", "path": "/metadata/labels/new"}])
    assert core.read_namespaced_pod("a", "shop").metadata.labels == {"keep": "2"}
    with pytest.raises(ApiException) as e:
        core.patch_namespaced_pod("a", "shop", [{"op": "test", "path": "/metadata/labels/keep", "value": "9"}])
    assert e.value.status == 422


def test_errors_are_status_objects(api, core):
    with pytest.raises(ApiException) as e:
        core.read_namespaced_pod("missing", "shop")
    assert e.value.status == 404 and status_of(e.value)["reason"] == "NotFound"
    assert status_of(e.value)["details"] == {"name": "missing", "group": "", "kind": "pods"}
    core.create_namespaced_pod("shop", make_pod("a", "shop"))
    with pytest.raises(ApiException) as e:
        core.create_namespaced_pod("shop", make_pod("a", "shop"))
    assert e.value.status == 409 and status_of(e.value)["reason"] == "AlreadyExists"
    with pytest.raises(ApiException) as e:
        core.create_namespaced_pod("shop", make_pod("Not_A_Name", "shop"))
    assert e.value.status == 422 and status_of(e.value)["reason"] == "Invalid"
    with pytest.raises(ApiException) as e:
        core.create_namespaced_pod("nowhere", make_pod("a", "nowhere"))
    assert e.value.status == 404 and 'namespaces "nowhere" not found' in status_of(e.value)["message"]


def test_create_sets_metadata_and_resets_status(api, core):
    created = core.create_namespaced_pod("shop", make_pod("a", "shop", ip="10.9.9.9"))
    m = created.metadata
    assert m.uid and m.creation_timestamp and m.generation == 1 and int(m.resource_version) > 1
    assert created.status.phase == "Pending" and created.status.pod_ip is None  # the kubelet sets those
    svc = core.create_namespaced_service("shop", make_service("web", "shop"))
    assert svc.spec.cluster_ip and svc.spec.cluster_ips == [svc.spec.cluster_ip]
    gen = core.create_namespace({"metadata": {"generateName": "tmp-"}})
    assert gen.metadata.name.startswith("tmp-") and len(gen.metadata.name) == 9


def test_finalizers_delay_deletion(api, core):
    api.create({**make_pod("a", "shop"), "metadata": {"name": "a", "namespace": "shop", "finalizers": ["x/y"]}})
    core.delete_namespaced_pod("a", "shop")
    pod = core.read_namespaced_pod("a", "shop")
    assert pod.metadata.deletion_timestamp is not None
    core.patch_namespaced_pod("a", "shop", {"metadata": {"finalizers": None}})
    with pytest.raises(ApiException) as e:
        core.read_namespaced_pod("a", "shop")
    assert e.value.status == 404


def test_deleting_a_namespace_deletes_its_objects(api, core):
    seed_pods(api)
    start = api.resource_version
    core.delete_namespace("infra")
    assert sorted(names(core.list_pod_for_all_namespaces().items)) == ["db-1", "web-1", "web-2"]
    events = raw_watch(core.list_pod_for_all_namespaces, resource_version=start, timeout_seconds=1)
    assert sorted((e["type"], e["object"]["metadata"]["name"]) for e in events) == [
        ("DELETED", "dns-1"), ("DELETED", "unscheduled")]


# --- custom resources and the status subresource

def test_custom_resource_status_subresource(api, client):
    api.register("fovea.dev", "v1alpha1", "captures", "Capture", namespaced=True)
    api.register("fovea.dev", "v1alpha1", "clustercaptures", "ClusterCapture", namespaced=False)
    co = CustomObjectsApi(client)
    body = {"apiVersion": "fovea.dev/v1alpha1", "kind": "Capture", "metadata": {"name": "c1"},
            "spec": {"duration": "60s"}, "status": {"phase": "Succeeded"}}
    created = co.create_namespaced_custom_object("fovea.dev", "v1alpha1", "shop", "captures", body)
    assert "status" not in created and created["metadata"]["generation"] == 1  # status is not the user's
    # /status changes only the status
    after = co.patch_namespaced_custom_object_status(
        "fovea.dev", "v1alpha1", "shop", "captures", "c1",
        {"spec": {"duration": "1s"}, "status": {"phase": "Running", "nodes": {"n1": {"packets": 3}}}})
    assert after["status"] == {"phase": "Running", "nodes": {"n1": {"packets": 3}}}
    assert after["spec"] == {"duration": "60s"} and after["metadata"]["generation"] == 1
    # the main resource ignores status, and counts spec changes in generation
    after["spec"]["duration"] = "30s"
    after["status"] = {"phase": "Failed"}
    replaced = co.replace_namespaced_custom_object("fovea.dev", "v1alpha1", "shop", "captures", "c1", after)
    assert replaced["status"]["phase"] == "Running" and replaced["metadata"]["generation"] == 2
    # PUT /status with a stale version conflicts
    with pytest.raises(ApiException) as e:
        co.replace_namespaced_custom_object_status("fovea.dev", "v1alpha1", "shop", "captures", "c1", after)
    assert e.value.status == 409
    listed = co.list_cluster_custom_object("fovea.dev", "v1alpha1", "captures")
    assert [i["metadata"]["name"] for i in listed["items"]] == ["c1"] and listed["kind"] == "CaptureList"
    # cluster-scoped
    cc = co.create_cluster_custom_object("fovea.dev", "v1alpha1", "clustercaptures", {
        "apiVersion": "fovea.dev/v1alpha1", "kind": "ClusterCapture", "metadata": {"name": "all"}, "spec": {}})
    assert "namespace" not in cc["metadata"]
    co.patch_cluster_custom_object_status("fovea.dev", "v1alpha1", "clustercaptures", "all",
                                          {"status": {"phase": "Pending"}})
    assert co.get_cluster_custom_object("fovea.dev", "v1alpha1", "clustercaptures", "all")["status"] == {
        "phase": "Pending"}
    co.delete_namespaced_custom_object("fovea.dev", "v1alpha1", "shop", "captures", "c1")
    assert co.list_namespaced_custom_object("fovea.dev", "v1alpha1", "shop", "captures")["items"] == []


def test_validate_hook_answers_invalid(api, client):
    def validate(obj):
        return [] if obj.get("spec", {}).get("duration") else ["spec.duration: Required value"]

    api.register("fovea.dev", "v1alpha1", "captures", "Capture", namespaced=True, validate=validate)
    co = CustomObjectsApi(client)
    with pytest.raises(ApiException) as e:
        co.create_namespaced_custom_object("fovea.dev", "v1alpha1", "shop", "captures", {
            "apiVersion": "fovea.dev/v1alpha1", "kind": "Capture", "metadata": {"name": "c"}, "spec": {}})
    assert e.value.status == 422 and "spec.duration" in status_of(e.value)["message"]


def test_discovery(api, client):
    api.register("fovea.dev", "v1alpha1", "captures", "Capture", namespaced=True)
    core_resources = {r.name: r for r in CoreV1Api(client).get_api_resources().resources}
    assert core_resources["pods"].namespaced and not core_resources["nodes"].namespaced
    assert "pods/status" in core_resources and "watch" in core_resources["pods"].verbs
    groups = {g.name for g in kubernetes.client.ApisApi(client).get_api_versions().groups}
    assert {"fovea.dev", "discovery.k8s.io"} <= groups
    crs = CustomObjectsApi(client).get_api_resources("fovea.dev", "v1alpha1")
    assert {r.name for r in crs.resources} == {"captures", "captures/status"}
    assert kubernetes.client.VersionApi(client).get_code().major == "1"


# --- outage

def test_outage_cuts_watches_and_restart_keeps_state(api, core):
    api.create(make_pod("a", "shop"))
    rv = api.resource_version
    port = api.port
    ended = threading.Event()
    failure: list = []

    def watch():
        try:
            raw_watch(core.list_namespaced_pod, "shop", resource_version=rv, timeout_seconds=30)
        except Exception as e:  # noqa: BLE001
            failure.append(e)
        ended.set()

    threading.Thread(target=watch, daemon=True).start()
    time.sleep(0.3)
    api.stop()
    assert ended.wait(3), "the open watch was not cut"
    assert failure, "a cut watch must end in an error, not a clean end"
    with pytest.raises(Exception):
        core.list_namespaced_pod("shop", _request_timeout=2)
    api.create(make_pod("b", "shop"))  # changes while the server is away (etcd goes on)
    api.start()
    assert api.port == port
    assert sorted(names(core.list_namespaced_pod("shop").items)) == ["a", "b"]
    events = raw_watch(core.list_namespaced_pod, "shop", resource_version=rv, timeout_seconds=1)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "b")]


# --- request log, RBAC, auth

def test_request_log_names_verbs_like_rbac(api, core):
    api.clear_requests()
    core.create_namespaced_pod("shop", make_pod("a", "shop"))
    core.read_namespaced_pod("a", "shop")
    core.list_pod_for_all_namespaces()
    raw_watch(core.list_namespaced_pod, "shop", resource_version=api.resource_version, timeout_seconds=1)
    core.patch_namespaced_pod("a", "shop", {"metadata": {"labels": {"x": "y"}}})
    core.patch_namespaced_pod_status("a", "shop", {"status": {"phase": "Running"}})
    core.delete_namespaced_pod("a", "shop")
    log = [(r.verb, r.resource, r.subresource, r.namespace, r.name) for r in api.requests]
    assert log == [
        ("create", "pods", "", "shop", ""),
        ("get", "pods", "", "shop", "a"),
        ("list", "pods", "", "", ""),
        ("watch", "pods", "", "shop", ""),
        ("patch", "pods", "", "shop", "a"),
        ("patch", "pods", "status", "shop", "a"),
        ("delete", "pods", "", "shop", "a"),
    ]
    assert ("patch", "", "pods/status") in api.permissions_used()
    assert api.requests[0].code == 201 and api.requests[1].query == {}


def test_rbac_rules_forbid_the_rest(api, core):
    api.set_rbac([{"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]}],
                 {"shop": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"],
                            "resourceNames": ["s3-creds"]}]})
    api.create(make_secret("s3-creds", "shop"))
    api.create(make_secret("other", "shop"))
    core.list_pod_for_all_namespaces()
    core.read_namespaced_secret("s3-creds", "shop")
    for call in (lambda: core.read_namespaced_secret("other", "shop"),
                 lambda: core.list_namespaced_secret("shop"),
                 lambda: core.read_namespaced_secret("s3-creds", "infra"),
                 lambda: core.list_namespace()):
        with pytest.raises(ApiException) as e:
            call()
        assert e.value.status == 403 and status_of(e.value)["reason"] == "Forbidden"
    api.set_rbac(None)
    core.list_namespace()


def test_static_token(tmp_path):
    with K8sEmulator(token="s3cret") as api:
        with pytest.raises(ApiException) as e:
            CoreV1Api(ApiClient(api.client_configuration(token=""))).list_namespace()
        assert e.value.status == 401
        assert CoreV1Api(ApiClient(api.client_configuration())).list_namespace().items == []
        path = api.write_kubeconfig(tmp_path / "kubeconfig")
        client = kubernetes.config.new_client_from_config(config_file=str(path), persist_config=False)
        assert CoreV1Api(client).list_namespace().items == []


# --- pod proxy

class _Hello(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        body = f"hello {self.path} {self.headers.get('X-Token', '-')}".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_pod_proxy_forwards_to_loopback(api, core):
    backend = ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    try:
        api.create(make_pod("agent-x", "infra", node="n1"))
        port = backend.server_address[1]
        resp = core.connect_get_namespaced_pod_proxy_with_path(f"agent-x:{port}", "infra", "captures/c.pcap",
                                                               _preload_content=False)
        assert resp.data == b"hello /captures/c.pcap -"
        resp = core.api_client.call_api(
            f"/api/v1/namespaces/infra/pods/http:agent-x:{port}/proxy/x", "GET", query_params=[("token", "t")],
            header_params={"X-Token": "abc"}, _preload_content=False)
        assert resp.data == b"hello /x?token=t abc"
        with pytest.raises(ApiException) as e:
            core.connect_get_namespaced_pod_proxy_with_path(f"gone:{port}", "infra", "x")
        assert e.value.status == 404
        assert api.requests[-2].verb == "get" and api.requests[-2].subresource == "proxy"
    finally:
        backend.shutdown()
        backend.server_close()


# --- kubectl

def kubectl(api, tmp_path, *args: str) -> subprocess.CompletedProcess:
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
    env = dict(os.environ, KUBECONFIG=str(kubeconfig), HOME=str(tmp_path))  # HOME: a fresh discovery cache
    return subprocess.run(["kubectl", *args], capture_output=True, text=True, env=env, timeout=60)


def test_kubectl_get_and_apply(api, tmp_path):
    require(shutil.which("kubectl") is not None, "kubectl is not installed (Debian: kubernetes-client)")
    api.register("fovea.dev", "v1alpha1", "captures", "Capture", namespaced=True)
    seed_pods(api)
    out = kubectl(api, tmp_path, "get", "pods", "-A")
    assert out.returncode == 0, out.stderr
    lines = [line.split() for line in out.stdout.splitlines()]
    assert lines[0][:3] == ["NAMESPACE", "NAME", "READY"]
    assert sorted((cols[0], cols[1]) for cols in lines[1:]) == [
        ("infra", "dns-1"), ("infra", "unscheduled"), ("shop", "db-1"), ("shop", "web-1"), ("shop", "web-2")]
    out = kubectl(api, tmp_path, "get", "pods", "-n", "shop", "-l", "app=web", "-o", "name")
    assert out.stdout.split() == ["pod/web-1", "pod/web-2"], out.stderr
    manifest = tmp_path / "capture.yaml"
    manifest.write_text("apiVersion: fovea.dev/v1alpha1\nkind: Capture\n"
                        "metadata: {name: c1, namespace: shop}\nspec: {duration: 60s}\n")
    out = kubectl(api, tmp_path, "apply", "-f", str(manifest))
    assert out.returncode == 0 and "created" in out.stdout, out.stderr
    assert api.get("captures", "c1", "shop")["spec"] == {"duration": "60s"}
    out = kubectl(api, tmp_path, "annotate", "namespace", "shop", "fovea.dev/observe=true")
    assert out.returncode == 0, out.stderr
    assert api.get("namespaces", "shop")["metadata"]["annotations"] == {"fovea.dev/observe": "true"}


def test_builders_round_trip(api):
    api.create(make_node("n1", ("192.168.0.10",)))
    node = api.get("nodes", "n1")
    assert node["status"]["addresses"][0] == {"type": "InternalIP", "address": "192.168.0.10"}
    assert "namespace" not in node["metadata"]
    svc = api.create(make_service("web", "shop", cluster_ip="10.96.0.10"))
    assert svc["spec"]["clusterIPs"] == ["10.96.0.10"]


def test_registered_crd_validates_and_prints_its_columns(tmp_path):
    """register_crd: the CRD's names, scope and status subresource; its printer columns in
    `kubectl get`; requests carry the client's User-Agent."""
    from tests.crd_schema import api_errors, crd

    require(shutil.which("kubectl") is not None, "kubectl (Debian kubernetes-client)")
    api = K8sEmulator().start()
    try:
        rt = api.register_crd(crd("captures"), validate=api_errors)
        assert (rt.kind, rt.namespaced, rt.subresources, rt.short_names) == ("Capture", True, ("status",), ("fcap",))
        api.create(make_namespace("shop"))
        api.create({"apiVersion": "fovea.dev/v1alpha1", "kind": "Capture", "metadata": {"name": "c", "namespace": "shop"},
                    "spec": {"target": {"podNames": ["a"]}, "duration": "5s"},
                    "status": {"phase": "Running", "nodesDone": "0/2", "packets": 7}})
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig", namespace="shop")
        out = subprocess.run(["kubectl", "--kubeconfig", str(kubeconfig), "get", "fcap"], capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split("\n")[0].split() == ["NAME", "PHASE", "NODES", "PACKETS", "AGE"]
        assert out.stdout.split("\n")[1].split()[:4] == ["c", "Running", "0/2", "7"]
        assert any(r.user_agent.startswith("kubectl/") for r in api.requests)
        bad = subprocess.run(["kubectl", "--kubeconfig", str(kubeconfig), "create", "-f", "-"], input=(
            "apiVersion: fovea.dev/v1alpha1\nkind: Capture\nmetadata: {name: bad}\n"
            "spec: {target: {podNames: [a]}, duration: 2h}\n"), capture_output=True, text=True, timeout=60)
        assert bad.returncode == 1 and "duration must be more than 0 and at most 1h" in bad.stderr, bad.stderr
    finally:
        api.stop()


def test_updates_ratchet_validation():
    """As Kubernetes 1.30+: an update keeps errors the stored object already had (a status
    write to an object stored before a stricter schema), and refuses new ones."""
    api = K8sEmulator()
    strict = {"on": False}

    def validate(obj):
        spec = obj.get("spec") or {}
        return [f"spec.{k}: too big" for k in ("a", "b") if strict["on"] and spec.get(k, 0) > 1]

    api.register("example.com", "v1", "things", "Thing", True, validate=validate)
    api.create(make_namespace("ns"))
    api.create({"apiVersion": "example.com/v1", "kind": "Thing", "metadata": {"name": "t", "namespace": "ns"},
                "spec": {"a": 5}})
    strict["on"] = True
    api.patch("things", "t", {"status": {"seen": True}}, "ns")  # the old error ratchets
    with pytest.raises(ApiError) as e:
        api.patch("things", "t", {"spec": {"b": 7}}, "ns")
    assert e.value.code == 422 and "spec.b: too big" in e.value.message and "spec.a" not in e.value.message
