"""agent/k8s: workload resolution, records from API JSON, the standalone pod file."""

from __future__ import annotations

import json
import sys

import pytest

from agent.errors import FoveaError
from agent.k8s.records import (
    NamespaceRecord,
    PodRecord,
    namespace_record,
    node_record,
    pod_record,
    service_record,
)
from agent.k8s.static import StaticPods
from agent.k8s.workload import workload_of


def meta(name="web-7d9c-abcde", owner=None, labels=None, controller=True, extra_owners=()):
    m = {"name": name, "labels": labels or {}}
    refs = list(extra_owners)
    if owner:
        refs.append({"kind": owner[0], "name": owner[1], "controller": controller})
    if refs:
        m["ownerReferences"] = refs
    return m


@pytest.mark.parametrize("metadata, expected", [
    # Deployment -> ReplicaSet "<deployment>-<pod-template-hash>"
    (meta(owner=("ReplicaSet", "web-7d9c"), labels={"pod-template-hash": "7d9c"}), ("Deployment", "web")),
    (meta(owner=("ReplicaSet", "api-v2-5f6b8"), labels={"pod-template-hash": "5f6b8"}), ("Deployment", "api-v2")),
    # a ReplicaSet without the hash label (made by hand), or whose name does not end in it
    (meta(owner=("ReplicaSet", "web-7d9c")), ("ReplicaSet", "web-7d9c")),
    (meta(owner=("ReplicaSet", "web-7d9c"), labels={"pod-template-hash": "0000"}), ("ReplicaSet", "web-7d9c")),
    (meta(owner=("ReplicaSet", "7d9c"), labels={"pod-template-hash": "7d9c"}), ("ReplicaSet", "7d9c")),
    # CronJob -> Job "<cronjob>-<minutes since the epoch>"
    (meta(owner=("Job", "backup-28930560")), ("CronJob", "backup")),
    (meta(owner=("Job", "db-backup-nightly-29012345")), ("CronJob", "db-backup-nightly")),
    (meta(owner=("Job", "migrate-2")), ("Job", "migrate-2")),  # too few digits: a Job made by hand
    (meta(owner=("Job", "migrate")), ("Job", "migrate")),
    (meta(owner=("StatefulSet", "db")), ("StatefulSet", "db")),
    (meta(owner=("DaemonSet", "fovea")), ("DaemonSet", "fovea")),
    (meta(owner=("ReplicationController", "legacy")), ("ReplicationController", "legacy")),
    (meta(owner=("ReplicationController", "app-3"), labels={"deploymentconfig": "app"}), ("DeploymentConfig", "app")),
    (meta(owner=("Node", "node-a"), name="kube-proxy-node-a"), ("Node", "node-a")),  # a static pod's mirror
    (meta(owner=("Rollout", "canary")), ("Rollout", "canary")),  # unknown kinds stay as they are
    (meta(name="debug"), ("Pod", "debug")),  # a bare pod
    # the controller reference wins over other owners
    (meta(owner=("StatefulSet", "db"), extra_owners=[{"kind": "ConfigMap", "name": "x"}]), ("StatefulSet", "db")),
    # without a controller flag, the first owner
    (meta(owner=("DaemonSet", "agent"), controller=False), ("DaemonSet", "agent")),
    ({"name": "broken", "ownerReferences": [{"kind": "ReplicaSet"}]}, ("Pod", "broken")),
])
def test_workload_of(metadata, expected):
    assert workload_of(metadata) == expected


def test_pod_record_from_api_json():
    obj = {
        "metadata": {"name": "web-7d9c-abcde", "namespace": "shop", "uid": "u1",
                     "creationTimestamp": "2025-01-01T00:00:00Z",
                     "labels": {"pod-template-hash": "7d9c"},
                     "annotations": {"fovea.dev/observe": "true"},
                     "ownerReferences": [{"kind": "ReplicaSet", "name": "web-7d9c", "controller": True}]},
        "spec": {"nodeName": "n1", "containers": [{"name": "c"}]},
        "status": {"phase": "Running", "podIP": "10.0.0.5",
                   "podIPs": [{"ip": "10.0.0.5"}, {"ip": "FD00::5"}]},
    }
    assert pod_record(obj) == PodRecord(
        namespace="shop", name="web-7d9c-abcde", uid="u1", node="n1", ips=("10.0.0.5", "fd00::5"),
        host_network=False, observe=True, workload_kind="Deployment", workload_name="web", phase="Running",
        created=1735689600, terminating=False)
    bare = pod_record({"metadata": {"name": "p", "namespace": "n", "annotations": {"fovea.dev/observe": "yes"},
                                    "deletionTimestamp": "2025-01-01T00:00:00Z"},
                       "spec": {"hostNetwork": True}, "status": {"podIP": "192.168.0.1"}})
    assert bare.ips == ("192.168.0.1",) and bare.host_network and not bare.observe and bare.terminating
    assert bare.workload_kind == "Pod" and bare.node == "" and bare.phase == "" and bare.created == 0


def test_records_are_slim():
    pod = pod_record({"metadata": {"name": "p"}})
    assert not hasattr(pod, "__dict__")  # slots
    with pytest.raises(AttributeError):
        pod.name = "other"  # frozen


def test_other_records():
    assert namespace_record({"metadata": {"name": "shop", "annotations": {"fovea.dev/observe": "true"}}}) == \
        NamespaceRecord("shop", True)
    assert not namespace_record({"metadata": {"name": "x"}}).observe
    svc = service_record({"metadata": {"name": "web", "namespace": "shop"},
                          "spec": {"clusterIP": "10.96.0.1", "clusterIPs": ["10.96.0.1", "fd00::1"]}})
    assert svc.cluster_ips == ("10.96.0.1", "fd00::1")
    assert service_record({"metadata": {"name": "h"}, "spec": {"clusterIP": "None"}}).cluster_ips == ()
    assert service_record({"metadata": {"name": "old"}, "spec": {"clusterIP": "10.96.0.2"}}).cluster_ips == (
        "10.96.0.2",)
    node = node_record({"metadata": {"name": "n1"}, "status": {"addresses": [
        {"type": "InternalIP", "address": "192.168.0.10"}, {"type": "Hostname", "address": "n1"},
        {"type": "ExternalIP", "address": "203.0.113.7"}]}})
    assert node.ips == ("192.168.0.10", "203.0.113.7") and node.pod_cidrs == ()
    node = node_record({"metadata": {"name": "n2"}, "spec": {"podCIDR": "10.0.2.0/24",
                                                             "podCIDRs": ["10.0.2.0/24", "fd00:2::/64"]}})
    assert node.pod_cidrs == ("10.0.2.0/24", "fd00:2::/64")


# --- StaticPods

def write(tmp_path, text: str) -> str:
    path = tmp_path / "pods.yaml"
    path.write_text(text)
    return str(path)


def test_static_pods_lookups(tmp_path):
    pods = StaticPods.load(write(tmp_path, """
pods:
  - {ip: 10.1.1.2, namespace: shop, pod: web-1, workloadKind: Deployment, workloadName: web, observe: true}
  - {ip: "fd00::2", namespace: shop, pod: web-1}
  - {ip: 10.1.1.3, namespace: shop, pod: db-0, workloadKind: StatefulSet, workloadName: db}
  - {ip: 10.1.2.2, namespace: tools, pod: debug}
namespaces:
  - {name: tools, observe: true}
"""), node_name="n1")
    web = pods.pod_by_ip("10.1.1.2")
    assert web == PodRecord("shop", "web-1", "", "n1", ("10.1.1.2", "fd00::2"), False, True, "Deployment", "web",
                            "Running")
    assert pods.pod_by_ip("FD00::2") is web and pods.pod_by_ip("::ffff:10.1.1.2") is web
    debug = pods.pod_by_ip("10.1.2.2")
    assert (debug.workload_kind, debug.workload_name, debug.observe) == ("Pod", "debug", False)
    assert pods.pod_observed(debug)  # through its namespace
    assert not pods.pod_observed(pods.pod_by_ip("10.1.1.3"))
    assert pods.pod_observed(web)
    assert pods.pod_by_ip("10.9.9.9") is None
    assert sorted(p.name for p in pods.local_pods()) == ["db-0", "debug", "web-1"]
    assert pods.namespace("shop") == NamespaceRecord("shop", False)
    assert pods.namespace("tools") == NamespaceRecord("tools", True)
    assert pods.namespace("nowhere") is None
    assert pods.service_by_ip("10.1.1.2") is None and pods.node_by_ip("10.1.1.2") is None
    assert pods.synced and pods.stats() == {"pods": 3, "namespaces": 2}
    assert pods.pod("shop", "db-0").ips == ("10.1.1.3",)


def test_static_pods_empty(tmp_path):
    assert StaticPods.empty().local_pods() == ()
    assert StaticPods.load(write(tmp_path, "")).stats() == {"pods": 0, "namespaces": 0}
    assert StaticPods.load(write(tmp_path, "pods: []\n")).pod_by_ip("10.0.0.1") is None


@pytest.mark.parametrize("text, words", [
    ("pods: {ip: 10.0.0.1}", ["needs a list under 'pods'"]),
    ("- a\n- b\n", ["top level must be a mapping"]),
    ("pods: []\nservices: []\n", ["top level"]),
    ("pods: [{ip: 10.0.0.1, namespace: shop}]", ["pods[0] must have ip, namespace, pod", "lacks pod"]),
    ("pods: [{ip: 10.0.0.1, namespace: shop, pod: web, color: red}]", ["pods[0]", "unknown key", "color", "shop/web"]),
    ("pods: [{ip: 10.0.0.1, namespace: shop, pod: a}, {ip: 300.0.0.1, namespace: shop, pod: web}]",
     ["pods[1]: '300.0.0.1' is not an IP address (entry shop/web)"]),
    ("pods: [{ip: 10.0.0.1, namespace: Shop, pod: web}]", ["pods[0] (Shop/web)", "namespace 'Shop'"]),
    ("pods: [{ip: 10.0.0.1, namespace: shop, pod: web_1}]", ["pod 'web_1'"]),
    ("pods: [{ip: 10.0.0.1, namespace: shop, pod: web, observe: 'yes'}]", ["observe must be true or false"]),
    ("pods: [{ip: 10.0.0.1, namespace: shop, pod: web, workloadKind: deployment}]", ["workloadKind"]),
    ("pods: [{ip: 10.0.0.1, namespace: shop, pod: a}, {ip: 10.0.0.1, namespace: shop, pod: b}]",
     ["pods[1] (shop/b)", "IP 10.0.0.1 of shop/b is already given to shop/a"]),
    ("pods: [{ip: 10.0.0.1, namespace: shop, pod: a, observe: true}, "
     "{ip: 10.0.0.2, namespace: shop, pod: a, observe: false}]", ["pods[1]", "observe differs from"]),
    ("pods: [42]", ["pods[0] must be a mapping"]),
    ("namespaces: [{name: shop, observe: 1}]", ["namespaces[0]", "observe"]),
    ("namespaces: [{nom: shop}]", ["namespaces[0]"]),
    ("pods: [", ["not valid YAML"]),
])
def test_static_pods_errors_name_the_entry(tmp_path, text, words):
    with pytest.raises(FoveaError) as e:
        StaticPods.load(write(tmp_path, text))
    for word in words:
        assert word in str(e.value)


def test_static_pods_missing_file(tmp_path):
    with pytest.raises(FoveaError, match="cannot read static pods file"):
        StaticPods.load(str(tmp_path / "nope.yaml"))


def test_remote_pod_records_are_compact():
    """Strings that repeat across pods are one interned copy; per pod only its own fields are new."""
    def pod(name, ip):
        # Each record from its own decoded JSON, as the cache gets them page after page.
        return pod_record(json.loads(json.dumps({
            "metadata": {"name": name, "namespace": "shop", "uid": "u-" + name,
                         "creationTimestamp": "2025-06-01T10:00:00Z", "labels": {"pod-template-hash": "7d9c"},
                         "ownerReferences": [{"kind": "ReplicaSet", "name": "web-7d9c", "controller": True}]},
            "spec": {"nodeName": "node-b"}, "status": {"phase": "Running", "podIP": ip}})))

    a, b = pod("web-7d9c-aaaaa", "10.0.0.1"), pod("web-7d9c-bbbbb", "10.0.0.2")
    for field in ("namespace", "node", "workload_kind", "workload_name", "phase"):
        assert getattr(a, field) is getattr(b, field), field
    assert (a.workload_kind, a.workload_name, a.created) == ("Deployment", "web", 1748772000)
    assert not hasattr(a, "__dict__")
    # what a remote pod costs beyond the shared strings: the record, its name, uid, IPs and time
    own = sum(sys.getsizeof(v) for v in (a, a.name, a.uid, a.ips, *a.ips, a.created))
    assert own < 450, own


@pytest.mark.parametrize("meta, spec", [
    ({"name": "p", "namespace": 7, "creationTimestamp": "yesterday"}, {"nodeName": ["n1"]}),
    ({"name": "p", "namespace": None, "creationTimestamp": 5}, {"nodeName": None}),
])
def test_pod_record_of_malformed_fields(meta, spec):
    """API objects are untrusted: a field of the wrong type becomes empty, never an exception."""
    record = pod_record({"metadata": meta, "spec": spec, "status": {"phase": {"x": 1}}})
    assert (record.namespace, record.node, record.phase, record.created) == ("", "", "", 0)
