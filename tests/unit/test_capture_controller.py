"""capture/controller.py against the API emulator, with a stand-in for the node's capture
(no root, no packets: tests/kernel/test_captures.py runs the real thing)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from kubernetes import client

from capture import status as st
from capture.controller import CaptureController, LocalTarget
from capture.quota import NodeLimits
from tests.crd_schema import api_errors, crd
from tests.k8s_emulator import K8sEmulator, make_namespace, make_pod


class FakeNode:
    """Captures nothing; reports `packets` after `hold` (or when stopped)."""

    def __init__(self, hold: float = 0.0, packets: int = 3):
        self.hold, self.packets = hold, packets
        self.ran: list[str] = []

    def local_target(self, pods, spec):
        return LocalTarget([("fake0", "pod")], [], False)

    def run_job(self, job, target, secret, directory: Path, started):
        directory.mkdir(parents=True)
        (directory / "x.pcap").write_bytes(b"x")
        self.ran.append(job.name)
        started()
        if job.stop.wait(self.hold):
            return {"phase": st.FAILED, "message": "stopped before the end"}
        return {"phase": st.SUCCEEDED, "packets": self.packets,
                "artifact": {"location": f"hostpath://{directory.parent.name}/{job.uid}/x.pcap", "size": 1,
                             "sha256": "0" * 64, "downloadToken": "tok"}}


@pytest.fixture
def api():
    api = K8sEmulator().start()
    for plural in ("captures", "clustercaptures"):
        api.register_crd(crd(plural), validate=api_errors)
    api.create(make_namespace("shop"))
    api.create(make_pod("a-1", "shop", "node-a", "10.0.0.1", labels={"app": "web"}))
    api.create(make_pod("b-1", "shop", "node-b", "10.0.0.2", labels={"app": "web"}))
    yield api
    api.stop()


def controller(api, node: str, tmp_path: Path, fake: FakeNode, grace: float = 30.0,
               limits: NodeLimits | None = None) -> CaptureController:
    c = CaptureController(client.ApiClient(api.client_configuration()), node, str(tmp_path / node), "fovea-system",
                          grace, fake.run_job, fake.local_target, tick=0.1, limits=limits)
    c.start()
    return c


def create(api, name: str, duration: str = "1s", max_bytes: str = "100Mi", **target) -> dict:
    return api.create({"apiVersion": "fovea.dev/v1alpha1", "kind": "Capture",
                       "metadata": {"name": name, "namespace": "shop"},
                       "spec": {"target": target or {"podSelector": {"matchLabels": {"app": "web"}}},
                                "duration": duration, "maxBytes": max_bytes}})


def wait(api, name: str, until, timeout: float = 15) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        s = (api.get("captures", name, "shop") or {}).get("status") or {}
        if until(s):
            return s
        assert time.monotonic() < deadline, s
        time.sleep(0.05)


def expected_nodes_history(api, name: str) -> list[list[str]]:
    """Every value status.expectedNodes took, in order (from the emulator's event history)."""
    values = []
    with api._cond:
        for ev in api._history:
            if ev.obj["metadata"]["name"] == name:
                value = (ev.obj.get("status") or {}).get("expectedNodes")
                if value and (not values or values[-1] != value):
                    values.append(value)
    return values


def done(s):
    return s.get("phase") in st.TERMINAL


def test_two_agents_one_capture(api, tmp_path):
    fa, fb = FakeNode(packets=3), FakeNode(packets=4)
    ca, cb = controller(api, "node-a", tmp_path, fa), controller(api, "node-b", tmp_path, fb)
    try:
        obj = create(api, "two")
        s = wait(api, "two", done)
        assert s["phase"] == "Succeeded" and s["expectedNodes"] == ["node-a", "node-b"]
        assert s["packets"] == 7 and s["nodesDone"] == "2/2" and fa.ran == fb.ran == ["two"]
        assert expected_nodes_history(api, "two") == [["node-a", "node-b"]]
        uid = obj["metadata"]["uid"]
        deadline = time.monotonic() + 5
        while ca.artifact(f"{uid}/x.pcap", "tok") is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert ca.artifact(f"{uid}/x.pcap", "bad") is None and ca.artifact(f"{uid}/x.pcap", "") is None
        assert ca.artifact(f"{uid}/../../x.pcap", "tok") is None
    finally:
        ca.stop()
        cb.stop()


def test_a_node_that_never_reports(api, tmp_path):
    ca = controller(api, "node-a", tmp_path, FakeNode(), grace=0.5)
    try:
        create(api, "half")
        s = wait(api, "half", done)
        assert s["phase"] == "PartiallySucceeded" and s["nodes"]["node-a"]["phase"] == "Succeeded"
        assert s["nodes"]["node-b"]["phase"] == "Failed" and "no report from the agent on node node-b" in (
            s["nodes"]["node-b"]["message"])
    finally:
        ca.stop()


def test_delete_stops_the_job_and_removes_its_files(api, tmp_path):
    fake = FakeNode(hold=60)
    ca = controller(api, "node-a", tmp_path, fake)
    try:
        obj = create(api, "gone", podNames=["a-1"])
        wait(api, "gone", lambda s: (s.get("nodes") or {}).get("node-a", {}).get("phase") == "Running")
        directory = tmp_path / "node-a" / obj["metadata"]["uid"]
        assert directory.is_dir()
        api.delete("captures", "gone", "shop")
        deadline = time.monotonic() + 5
        while directory.exists() or ca.jobs:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        ca.stop()


def test_a_report_left_running_by_a_restart_becomes_failed(api, tmp_path):
    obj = create(api, "orphan", podNames=["a-1"])
    api.patch("captures", "orphan", {"status": {"phase": "Running", "startTime": st.now(), "expectedNodes": ["node-a"],
                                                "nodes": {"node-a": {"phase": "Running"}}}}, "shop")
    (tmp_path / "node-a" / obj["metadata"]["uid"]).mkdir(parents=True)
    fake = FakeNode()
    ca = controller(api, "node-a", tmp_path, fake)
    try:
        s = wait(api, "orphan", done)
        assert s["phase"] == "Failed" and "restarted during the capture" in s["message"] and fake.ran == []
        assert not (tmp_path / "node-a" / obj["metadata"]["uid"]).exists()
    finally:
        ca.stop()


def test_stopping_the_agent_fails_its_running_part(api, tmp_path):
    ca = controller(api, "node-a", tmp_path, FakeNode(hold=60))
    create(api, "cut", podNames=["a-1"])
    wait(api, "cut", lambda s: (s.get("nodes") or {}).get("node-a", {}).get("phase") == "Running")
    ca.stop()
    s = wait(api, "cut", done, timeout=1)
    assert s["phase"] == "Failed" and s["message"] == "the agent on node node-a stopped during the capture"


def test_the_api_server_down_at_the_start(api, tmp_path):
    """Watches back off and resume; the capture then runs."""
    api.stop()
    ca = controller(api, "node-a", tmp_path, FakeNode())
    try:
        time.sleep(0.5)
        api.start()
        create(api, "late", podNames=["a-1"])
        assert wait(api, "late", done, timeout=40)["phase"] == "Succeeded"
    finally:
        ca.stop()


def test_concurrent_first_sight(api, tmp_path):
    """Five agents see a new capture at once: expectedNodes is set once, by one of them."""
    fakes = [FakeNode() for _ in range(5)]
    ctrls = [controller(api, f"node-{x}", tmp_path, f) for x, f in zip("abcde", fakes)]
    try:
        create(api, "race")
        s = wait(api, "race", done)
        assert s["phase"] == "Succeeded" and s["expectedNodes"] == ["node-a", "node-b"]
        assert sum(len(f.ran) for f in fakes) == 2
        assert expected_nodes_history(api, "race") == [["node-a", "node-b"]]
    finally:
        for c in ctrls:
            c.stop()


def node_phase(node: str, phase: str):
    return lambda s: (s.get("nodes") or {}).get(node, {}).get("phase") == phase


def test_past_max_concurrent_a_capture_waits_pending_then_runs(api, tmp_path):
    ca = controller(api, "node-a", tmp_path, FakeNode(hold=1.5), limits=NodeLimits(max_concurrent=1))
    try:
        create(api, "first", duration="10s", podNames=["a-1"])
        wait(api, "first", node_phase("node-a", "Running"))
        create(api, "second", duration="10s", podNames=["a-1"])
        s = wait(api, "second", lambda s: s.get("phase") == "Pending")
        assert s["message"] == s["nodes"]["node-a"]["message"] == (
            "waiting for a capture slot on node node-a: 1 running, 0 waiting before it (captures.maxConcurrent 1)")
        assert ca.stats()["waiting"] == 1 and ca.stats()["running"] == 1
        assert wait(api, "first", done)["phase"] == "Succeeded"
        s = wait(api, "second", done)
        assert s["phase"] == "Succeeded", s
        assert "s late: waited for a capture slot (captures.maxConcurrent 1)" in s["nodes"]["node-a"]["message"]
        assert ca.stats()["waiting"] == 0 and ca.stats()["refused"] == {}
    finally:
        ca.stop()


def test_a_capture_whose_window_ends_while_it_waits_fails(api, tmp_path):
    ca = controller(api, "node-a", tmp_path, FakeNode(hold=4), limits=NodeLimits(max_concurrent=1))
    try:
        create(api, "long", duration="10s", podNames=["a-1"])
        wait(api, "long", node_phase("node-a", "Running"))
        create(api, "short", duration="1s", podNames=["a-1"])
        s = wait(api, "short", done, timeout=10)
        assert s["phase"] == "Failed" and s["message"] == (
            "no capture slot freed on node node-a during the capture's window (1 running, captures.maxConcurrent 1)")
        assert ca.stats()["refused"] == {"concurrency": 1}
    finally:
        ca.stop()


def test_the_node_quota_counts_running_captures_twice_their_max_bytes(api, tmp_path):
    ca = controller(api, "node-a", tmp_path, FakeNode(hold=2), limits=NodeLimits(quota=300 << 20))
    try:
        create(api, "fits", podNames=["a-1"], max_bytes="100Mi")
        wait(api, "fits", node_phase("node-a", "Running"))
        create(api, "too-much", podNames=["a-1"], max_bytes="100Mi")
        s = wait(api, "too-much", done)
        assert s["phase"] == "Failed" and s["message"] == (
            "the capture needs 200Mi of node node-a's capture quota (twice its maxBytes while it is written); "
            "100Mi of captures.nodeQuota 300Mi is free (200Mi held by running captures, 0 bytes kept by finished "
            "ones)"), s
        assert wait(api, "fits", done)["phase"] == "Succeeded"
        create(api, "never", podNames=["a-1"], max_bytes="151Mi")  # more than the quota even on an empty node
        s = wait(api, "never", done)
        assert s["phase"] == "Failed" and "needs 302Mi" in s["message"] and "captures.nodeQuota 300Mi" in s["message"]
        create(api, "now-fits", podNames=["a-1"], max_bytes="100Mi")
        assert wait(api, "now-fits", done)["phase"] == "Succeeded"
        assert ca.stats()["refused"] == {"node_quota": 2}
    finally:
        ca.stop()


def test_a_namespace_share_set_by_an_annotation(api, tmp_path):
    ns = api.get("namespaces", "shop")
    ns["metadata"].setdefault("annotations", {})["fovea.dev/capture-quota"] = "150Mi"
    api.update(ns)
    ca = controller(api, "node-a", tmp_path, FakeNode(), limits=NodeLimits(quota=1 << 30))
    try:
        create(api, "small", podNames=["a-1"], max_bytes="75Mi")
        assert wait(api, "small", done)["phase"] == "Succeeded"
        create(api, "big", podNames=["a-1"], max_bytes="100Mi")
        s = wait(api, "big", done)
        assert s["phase"] == "Failed" and "namespace shop has" in s["message"] and (
            "of its share 150Mi (annotation fovea.dev/capture-quota)") in s["message"], s
        assert ca.stats()["refused"] == {"namespace_quota": 1}
    finally:
        ca.stop()


def test_finished_files_expire_after_the_retention(api, tmp_path):
    ca = controller(api, "node-a", tmp_path, FakeNode(), limits=NodeLimits(retention=1.0))
    try:
        obj = create(api, "brief", podNames=["a-1"])
        uid = obj["metadata"]["uid"]
        s = wait(api, "brief", done)
        art = s["nodes"]["node-a"]["artifact"]
        assert s["phase"] == "Succeeded" and art["downloadToken"] == "tok" and not art.get("expired")
        expires = st.parse_time(art["expiresAt"])
        assert abs(expires - (st.parse_time(s["completionTime"]) + 1)) <= 1
        s = wait(api, "brief", lambda s: s["nodes"]["node-a"]["artifact"].get("expired"), timeout=10)
        assert "downloadToken" not in s["nodes"]["node-a"]["artifact"] and s["phase"] == "Succeeded"
        assert not (tmp_path / "node-a" / uid).exists()
        assert ca.artifact(f"{uid}/x.pcap", "tok") is None
        assert ca.stats()["node_bytes"] == 0
    finally:
        ca.stop()


def test_files_of_captures_deleted_while_the_agent_was_down_are_removed(api, tmp_path):
    kept = create(api, "kept", podNames=["a-1"])  # finished: its files stay
    api.patch("captures", "kept", {"status": {"phase": "Succeeded", "expectedNodes": ["node-a"]}}, "shop")
    for uid in ("0d1e7e7e-dead-4bee-8f00-000000000001", kept["metadata"]["uid"]):
        (tmp_path / "node-a" / uid).mkdir(parents=True)
        (tmp_path / "node-a" / uid / "x.pcap").write_bytes(b"x" * 100)
    ca = controller(api, "node-a", tmp_path, FakeNode())
    try:
        deadline = time.monotonic() + 5
        while (tmp_path / "node-a" / "0d1e7e7e-dead-4bee-8f00-000000000001").exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)
        assert (tmp_path / "node-a" / kept["metadata"]["uid"] / "x.pcap").exists()
    finally:
        ca.stop()
