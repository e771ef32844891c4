"""agent/k8s/cache.py: the real kubernetes client inside KubeCache, against the API emulator."""

from __future__ import annotations

import logging
import sys
import time

import kubernetes
import pytest
from k8s_emulator import K8sEmulator, make_namespace, make_node, make_pod, make_service
from kubernetes.client import ApiClient

from agent.errors import FoveaError
from agent.k8s import NamespaceRecord, NodeRecord, PodRecord, ServiceRecord
from agent.k8s.cache import KubeCache, make_api_client
from agent.k8s.listwatch import Backoff

FAST = dict(backoff_initial=0.05, backoff_max=0.2, watch_timeout=5, connect_timeout=1, list_timeout=5)


def eventually(check, timeout: float = 3.0, what: str = ""):
    """check() once it is truthy; fail with `what` after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what or check}")
        time.sleep(0.02)


@pytest.fixture
def api():
    with K8sEmulator(bookmark_interval=0.2) as emu:
        emu.create(make_namespace("shop"))
        emu.create(make_namespace("tools", annotations={"fovea.dev/observe": "true"}))
        yield emu


@pytest.fixture
def make_cache(api):
    caches, clients = [], []

    def make(node="n1", cluster_wide=False, on_change=None, start=True, **kwargs):
        client = ApiClient(api.client_configuration())
        cache = KubeCache(client, node, cluster_wide, on_change, **{**FAST, **kwargs})
        caches.append(cache)
        clients.append(client)
        if start:
            cache.start()
            assert cache.wait_synced(5), cache.status()
        return cache

    yield make
    for c in caches:
        c.stop()
    for c in clients:
        c.close()


def status(cache, kind):
    return next(s for s in cache.status() if s.kind == kind)


def test_initial_list_is_limited_to_this_node(api, make_cache):
    api.create(make_pod("web-1", "shop", node="n1", ip="10.0.1.1"))
    api.create(make_pod("web-2", "shop", node="n2", ip="10.0.2.1"))
    api.create(make_pod("dns-1", "tools", node="n1", ip="10.0.1.2"))
    cache = make_cache()
    assert cache.synced
    assert sorted(p.name for p in cache.local_pods()) == ["dns-1", "web-1"]
    assert cache.pod_by_ip("10.0.1.1").name == "web-1"
    assert cache.pod_by_ip("10.0.2.1") is None  # another node's pod is never fetched
    assert cache.stats() == {"pods": 2, "namespaces": 2}
    listed_at = api.resource_version
    eventually(lambda: [r.verb for r in api.requests if r.resource == "pods"] == ["list", "watch"])
    pod_requests = [r for r in api.requests if r.resource == "pods"]
    assert all(r.query.get("fieldSelector") == "spec.nodeName=n1" for r in pod_requests)
    watch = pod_requests[1]
    assert watch.query["allowWatchBookmarks"] == "True" and watch.query["resourceVersion"] == listed_at


def test_watch_keeps_the_cache_in_step(api, make_cache):
    changes = []
    cache = make_cache(on_change=lambda kind, old, new: changes.append((kind, old and old.name, new and new.name)))
    changes.clear()
    api.create(make_pod("web-1", "shop", node="n1", phase="Pending"))  # no IP yet
    eventually(lambda: cache.pod("shop", "web-1"))
    assert cache.pod_by_ip("10.0.1.1") is None
    api.patch("pods", "web-1", {"status": {"phase": "Running", "podIP": "10.0.1.1",
                                           "podIPs": [{"ip": "10.0.1.1"}]}}, "shop")
    pod = eventually(lambda: cache.pod_by_ip("10.0.1.1"))
    assert pod.phase == "Running" and pod.workload_kind == "Pod"
    api.delete("pods", "web-1", "shop")
    eventually(lambda: cache.pod("shop", "web-1") is None)
    assert cache.pod_by_ip("10.0.1.1") is None and cache.local_pods() == ()
    assert changes == [("pods", None, "web-1"), ("pods", "web-1", "web-1"), ("pods", "web-1", None)]


def test_a_pod_scheduled_later_joins_the_local_pods(api, make_cache):
    cache = make_cache()
    api.create(make_pod("late", "shop", phase="Pending"))
    time.sleep(0.3)
    assert cache.pod("shop", "late") is None  # not on this node (yet)
    api.patch("pods", "late", {"spec": {"nodeName": "n1"}, "status": {"podIP": "10.0.1.9"}}, "shop")
    eventually(lambda: [p.name for p in cache.local_pods()] == ["late"])
    assert cache.pod_by_ip("10.0.1.9").name == "late"


def test_ip_reuse_prefers_the_live_pod_and_survives_the_old_ones_removal(api, make_cache):
    api.create(make_pod("old", "shop", node="n1", ip="10.0.1.5"))
    cache = make_cache()
    assert cache.pod_by_ip("10.0.1.5").name == "old"
    api.terminate("old", "shop")  # deletionTimestamp set: the old pod is going
    api.create(make_pod("new", "shop", node="n1", ip="10.0.1.5"))
    eventually(lambda: cache.pod_by_ip("10.0.1.5").name == "new", what="the new pod owns the IP")
    api.delete("pods", "old", "shop")
    eventually(lambda: cache.pod("shop", "old") is None)
    assert cache.pod_by_ip("10.0.1.5").name == "new"  # removing the old pod left the new mapping
    # and the other way round: a finished pod and a running one with the same IP
    api.create(make_pod("done", "shop", node="n1", ip="10.0.1.6", phase="Succeeded"))
    api.create(make_pod("live", "shop", node="n1", ip="10.0.1.6"))
    eventually(lambda: cache.pod("shop", "live") and cache.pod("shop", "done"))
    assert cache.pod_by_ip("10.0.1.6").name == "live"
    api.delete("pods", "live", "shop")
    eventually(lambda: cache.pod_by_ip("10.0.1.6").name == "done")
    # an IP that changes moves its mapping
    api.patch("pods", "new", {"status": {"podIP": "10.0.1.7", "podIPs": [{"ip": "10.0.1.7"}]}}, "shop")
    eventually(lambda: cache.pod_by_ip("10.0.1.7"))
    assert cache.pod_by_ip("10.0.1.5") is None


def test_a_recreated_pod_of_the_same_name(api, make_cache):
    api.create(make_pod("db-0", "shop", node="n1", ip="10.0.1.8"))
    cache = make_cache()
    first = cache.pod("shop", "db-0")
    api.delete("pods", "db-0", "shop")
    api.create(make_pod("db-0", "shop", node="n1", ip="10.0.1.8"))
    eventually(lambda: cache.pod("shop", "db-0") and cache.pod("shop", "db-0").uid != first.uid)
    assert cache.pod_by_ip("10.0.1.8").uid == cache.pod("shop", "db-0").uid
    # a late deletion of the older pod does not remove the newer one
    cache._delete("pods", first)
    assert cache.pod("shop", "db-0") is not None and cache.pod_by_ip("10.0.1.8") is not None


def test_410_relists_and_reports_what_vanished_in_the_gap(api, make_cache):
    api.create(make_pod("stays", "shop", node="n1", ip="10.0.1.1"))
    api.create(make_pod("goes", "shop", node="n1", ip="10.0.1.2"))
    changes = []
    cache = make_cache(on_change=lambda kind, old, new: changes.append((kind, old and old.name, new and new.name)))
    changes.clear()
    api.stop()
    api.delete("pods", "goes", "shop")
    api.create(make_pod("came", "shop", node="n1", ip="10.0.1.3"))
    api.patch("namespaces", "shop", {"metadata": {"annotations": {"fovea.dev/observe": "true"}}})
    api.compact()  # the history of the gap is gone: resuming must fail with 410
    api.start()
    eventually(lambda: cache.pod("shop", "came") and cache.pod("shop", "goes") is None, what="relist")
    eventually(lambda: cache.namespace("shop").observe)
    assert cache.pod_by_ip("10.0.1.2") is None and cache.pod_by_ip("10.0.1.3").name == "came"
    assert status(cache, "pods").lists == 2 and status(cache, "namespaces").lists == 2
    assert sorted(changes, key=str) == [
        ("namespaces", "shop", "shop"), ("pods", "goes", None), ("pods", None, "came")]
    watches = [r for r in api.requests if r.resource == "pods" and r.verb == "watch"]
    assert any(r.code == 200 for r in watches)


def test_outage_then_resume_without_relisting(api, make_cache):
    cache = make_cache()
    api.stop()
    api.create(make_pod("during", "shop", node="n1", ip="10.0.1.4"))
    time.sleep(0.5)  # a few failed reconnects
    assert status(cache, "pods").failures > 0 and status(cache, "pods").last_error
    assert cache.synced  # the last state still answers
    api.start()
    eventually(lambda: cache.pod_by_ip("10.0.1.4"), what="catch up after the outage")
    assert status(cache, "pods").lists == 1  # resumed from its resourceVersion
    eventually(lambda: status(cache, "pods").failures == 0)


def test_bookmarks_advance_the_resource_version(api, make_cache):
    cache = make_cache()
    before = status(cache, "pods").resource_version
    for i in range(3):  # pods of another node: this cache's watch never sees them
        api.create(make_pod(f"other-{i}", "shop", node="n2"))
    eventually(lambda: status(cache, "pods").resource_version == api.resource_version, what="a bookmark")
    assert int(status(cache, "pods").resource_version) > int(before)
    assert cache.stats()["pods"] == 0
    # thanks to the bookmark, a compaction and an outage need no relist
    api.compact()
    api.stop()
    api.start()
    api.create(make_pod("mine", "shop", node="n1"))
    eventually(lambda: cache.pod("shop", "mine"))
    assert status(cache, "pods").lists == 1


def test_namespace_annotation_toggles_observation(api, make_cache):
    api.create(make_pod("a", "shop", node="n1", ip="10.0.1.1"))
    api.create(make_pod("b", "shop", node="n1", ip="10.0.1.2", annotations={"fovea.dev/observe": "true"}))
    api.create(make_pod("c", "tools", node="n1", ip="10.0.1.3"))
    cache = make_cache()
    a, b, c = (cache.pod_by_ip(f"10.0.1.{i}") for i in (1, 2, 3))
    assert (cache.pod_observed(a), cache.pod_observed(b), cache.pod_observed(c)) == (False, True, True)
    api.patch("namespaces", "shop", {"metadata": {"annotations": {"fovea.dev/observe": "true"}}})
    eventually(lambda: cache.pod_observed(a))
    api.patch("namespaces", "shop", {"metadata": {"annotations": {"fovea.dev/observe": "false"}}})
    eventually(lambda: not cache.pod_observed(a))
    assert cache.pod_observed(b)
    assert cache.namespace("shop") == NamespaceRecord("shop", False)
    api.patch("pods", "a", {"metadata": {"annotations": {"fovea.dev/observe": "true"}}}, "shop")
    eventually(lambda: cache.pod_observed(cache.pod_by_ip("10.0.1.1")))


def test_cluster_wide_adds_all_pods_services_and_nodes(api, make_cache):
    api.create(make_node("n1", ("192.168.0.1",)))
    api.create(make_node("n2", ("192.168.0.2",)))
    api.create(make_pod("web-1", "shop", node="n1", ip="10.0.1.1"))
    api.create(make_pod("web-2", "shop", node="n2", ip="10.0.2.1",
                        owner=("ReplicaSet", "web-5f6b8"), labels={"pod-template-hash": "5f6b8"}))
    api.create(make_pod("proxy-n2", "tools", node="n2", ip="192.168.0.2", host_network=True))
    api.create(make_service("web", "shop", cluster_ip="10.96.0.10"))
    api.create(make_service("db", "shop", cluster_ip="10.96.0.11"))
    cache = make_cache(cluster_wide=True)
    assert cache.stats() == {"pods": 3, "namespaces": 2, "services": 2, "nodes": 2}
    assert [p.name for p in cache.local_pods()] == ["web-1"]
    remote = cache.pod_by_ip("10.0.2.1")
    assert (remote.node, remote.workload_kind, remote.workload_name) == ("n2", "Deployment", "web")
    assert cache.service_by_ip("10.96.0.10") == ServiceRecord("shop", "web", ("10.96.0.10",))
    assert cache.node_by_ip("192.168.0.2") == NodeRecord("n2", ("192.168.0.2",))
    assert cache.pod_by_ip("192.168.0.2").host_network  # only a hostNetwork pod claims a node IP
    api.delete("services", "web", "shop")
    api.create(make_service("web2", "shop", cluster_ip="10.96.0.10"))  # a ClusterIP handed out again
    eventually(lambda: cache.service_by_ip("10.96.0.10").name == "web2")
    api.delete("nodes", "n2")
    eventually(lambda: cache.node_by_ip("192.168.0.2") is None)


def test_pod_networks_are_the_nodes_pod_cidrs(api, make_cache):
    n1 = make_node("n1", "192.168.0.1")
    n1["spec"]["podCIDRs"] = ["10.0.1.0/24", "fd00:1::/64"]
    api.create(n1)
    n2 = make_node("n2", "192.168.0.2")
    n2["spec"]["podCIDR"] = "10.0.2.0/24"  # the older single field
    api.create(n2)
    cache = make_cache(cluster_wide=True)
    inside = ("10.0.1.200", "10.0.2.7", "fd00:1::5")
    assert all(cache.in_pod_network(ip) for ip in inside)
    assert not any(cache.in_pod_network(ip) for ip in ("10.0.3.1", "192.168.0.1", "fd00:2::5", "not-an-ip"))
    api.delete("nodes", "n2")
    eventually(lambda: not cache.in_pod_network("10.0.2.7"))
    assert cache.in_pod_network("10.0.1.200")


def test_a_host_network_pod_never_hides_a_pod_network_pod(api, make_cache):
    api.create(make_pod("hn", "tools", node="n1", ip="10.0.1.1", host_network=True))
    api.create(make_pod("real", "shop", node="n1", ip="10.0.1.1"))
    cache = make_cache()
    assert cache.pod_by_ip("10.0.1.1").name == "real"


def test_only_slim_records_are_kept(api, make_cache):
    for i in range(20):
        api.create(make_pod(f"p{i}", "shop", node="n1", ip=f"10.0.1.{i + 1}", labels={"x": "y" * 100}))
    cache = make_cache(cluster_wide=True)
    api.create(make_service("web", "shop"))
    api.create(make_node("n1", "192.168.0.1"))
    eventually(lambda: cache.stats()["services"] == 1 and cache.stats()["nodes"] == 1)
    kinds = {"pods": PodRecord, "namespaces": NamespaceRecord, "services": ServiceRecord, "nodes": NodeRecord}
    for kind, store in cache._stores.items():
        assert store and all(type(r) is kinds[kind] for r in store.values())
    for index in (cache._pod_ips, cache._service_ips, cache._node_ips):
        assert all(type(r) in kinds.values() for r in index.best.values())
    models = sys.modules["kubernetes.client.models"]
    assert not any(type(v).__module__.startswith(models.__name__) for v in cache.__dict__.values())
    pod = cache.pod("shop", "p1")
    assert not hasattr(pod, "__dict__") and sys.getsizeof(pod) < 200


def test_pages_of_a_large_list(api, make_cache):
    for i in range(7):
        api.create(make_pod(f"p{i}", "shop", node="n1"))
    cache = make_cache(page_size=3)
    assert cache.stats()["pods"] == 7
    lists = [r for r in api.requests if r.resource == "pods" and r.verb == "list"]
    assert len(lists) == 3 and all(r.query["limit"] == "3" for r in lists)
    assert "continue" in lists[1].query


def test_paged_lists_and_relists_keep_every_ip_resolving(api, make_cache):
    """Pods appear and vanish across paged lists, a 410 relist and the watch: every IP names
    its pod, vanished ones name nothing, and an IP claimed once holds no claims dict."""
    for i in range(10):
        api.create(make_pod(f"p{i}", "shop", node=f"n{i % 3}", ip=f"10.0.2.{i + 1}"))
    cache = make_cache(node="n0", cluster_wide=True, page_size=4)
    lists = [r for r in api.requests if r.resource == "pods" and r.verb == "list"]
    assert [r.query.get("limit") for r in lists] == ["4", "4", "4"] and "continue" in lists[2].query
    assert all(cache.pod_by_ip(f"10.0.2.{i + 1}").name == f"p{i}" for i in range(10))
    assert [p.name for p in sorted(cache.local_pods(), key=lambda p: p.name)] == ["p0", "p3", "p6", "p9"]
    assert cache._pod_ips.contested() == 0

    api.stop()  # in the gap: two pods go, two come (one of them on this node), one changes its IP
    api.delete("pods", "p1", "shop")
    api.delete("pods", "p3", "shop")
    api.create(make_pod("q1", "shop", node="n2", ip="10.0.2.21"))
    api.create(make_pod("q2", "shop", node="n0", ip="10.0.2.22"))
    api.patch("pods", "p4", {"status": {"podIP": "10.0.2.24", "podIPs": [{"ip": "10.0.2.24"}]}}, "shop")
    api.compact()  # the gap's history is gone: 410, then a paged relist
    api.start()
    eventually(lambda: status(cache, "pods").lists == 2, what="relist")
    eventually(lambda: cache.pod_by_ip("10.0.2.24"), what="p4's new IP")
    expected = {f"10.0.2.{i + 1}": f"p{i}" for i in (0, 2, 5, 6, 7, 8, 9)}
    expected.update({"10.0.2.21": "q1", "10.0.2.22": "q2", "10.0.2.24": "p4"})
    assert {ip: cache.pod_by_ip(ip).name for ip in expected} == expected
    assert all(cache.pod_by_ip(ip) is None for ip in ("10.0.2.2", "10.0.2.4", "10.0.2.5"))
    assert sorted(p.name for p in cache.local_pods()) == ["p0", "p6", "p9", "q2"]
    assert cache.stats()["pods"] == 10 and len(cache._pod_ips.best) == 10

    # Two pods on one IP (the old one terminating) share a claims dict only while both exist.
    api.terminate("p0", "shop")
    api.create(make_pod("p0-next", "shop", node="n0", ip="10.0.2.1"))
    eventually(lambda: cache.pod_by_ip("10.0.2.1").name == "p0-next")
    assert cache._pod_ips.contested() == 1
    api.delete("pods", "p0", "shop")
    eventually(lambda: cache._pod_ips.contested() == 0, what="the old claim goes")
    assert cache.pod_by_ip("10.0.2.1").name == "p0-next"
    api.delete("pods", "p0-next", "shop")
    eventually(lambda: cache.pod_by_ip("10.0.2.1") is None)


def test_starts_while_the_api_server_is_away(api, make_cache, caplog):
    api.create(make_pod("a", "shop", node="n1", ip="10.0.1.1"))
    api.stop()
    caplog.set_level(logging.DEBUG, logger="agent.k8s.cache")
    cache = make_cache(start=False, warn_interval=60)
    cache.start()
    eventually(lambda: status(cache, "pods").failures >= 3, what="three failed lists")
    assert not cache.synced and cache.pod_by_ip("10.0.1.1") is None
    st = status(cache, "pods")
    assert st.failures >= 3 and "list failed" in st.last_error and not st.synced
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, [r.getMessage() for r in warnings]  # one per kind, then quiet
    assert all("retrying" in r.getMessage() for r in warnings)
    api.start()
    assert cache.wait_synced(3)
    assert cache.pod_by_ip("10.0.1.1").name == "a"


def test_a_failing_subscriber_does_not_stop_the_watch(api, make_cache):
    def boom(kind, old, new):
        raise ValueError("subscriber bug")

    cache = make_cache(on_change=boom)
    api.create(make_pod("a", "shop", node="n1", ip="10.0.1.1"))
    api.create(make_pod("b", "shop", node="n1", ip="10.0.1.2"))
    eventually(lambda: cache.pod_by_ip("10.0.1.2"))


def test_stop_is_prompt_with_watches_open(api, make_cache):
    cache = make_cache(watch_timeout=300)
    started = time.monotonic()
    cache.stop()
    assert time.monotonic() - started < 2
    assert not any(t.thread.is_alive() for t in cache._reflectors)


def test_backoff_grows_with_jitter_and_resets():
    b = Backoff(0.5, 4.0)
    delays = [b.next() for _ in range(6)]
    for delay, cap in zip(delays, [0.5, 1, 2, 4, 4, 4]):
        assert cap / 2 <= delay <= cap
    b.reset()
    assert b.next() <= 0.5


# --- make_api_client

def test_make_api_client_from_a_kubeconfig(api, tmp_path, monkeypatch):
    path = api.write_kubeconfig(tmp_path / "kubeconfig")
    client = make_api_client(str(path))
    assert client.configuration.host == api.url and client.configuration.retries == 0
    assert len(kubernetes.client.CoreV1Api(client).list_namespace().items) == 2
    monkeypatch.setenv("KUBECONFIG", str(path))
    assert make_api_client(None).configuration.host == api.url


def test_make_api_client_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(FoveaError) as e:
        make_api_client(None)
    assert "no Kubernetes API" in str(e.value) and "--standalone" in e.value.hint
    with pytest.raises(FoveaError, match="does not exist"):
        make_api_client(str(tmp_path / "missing"))
    bad = tmp_path / "bad"
    bad.write_text("apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\nusers: []\n")
    with pytest.raises(FoveaError, match=f"cannot use kubeconfig {bad}"):
        make_api_client(str(bad))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    with pytest.raises(FoveaError, match="in-cluster service account"):
        make_api_client(None)  # no service account token file here
