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
        (directory / "x.pcapng").write_bytes(b"x")
        self.ran.append(job.name)
        started()
        if job.stop.wait(self.hold):
            return {"phase": st.FAILED, "message": "stopped before the end"}
        return {"phase": st.SUCCEEDED, "packets": self.packets,
                "artifact": {"location": f"hostpath://{directory.parent.name}/{job.uid}/x.pcapng", "size": 1,
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


def controller(api, node: str, tmp_path: Path, fake: FakeNode, grace: float = 30.0) -> CaptureController:
    c = CaptureController(client.ApiClient(api.client_configuration()), node, str(tmp_path / node), "fovea-system",
                          grace, fake.run_job, fake.local_target, tick=0.1)
    c.start()
    return c


def create(api, name: str, duration: str = "1s", **target) -> dict:
    return api.create({"apiVersion": "fovea.dev/v1alpha1", "kind": "Capture",
                       "metadata": {"name": name, "namespace": "shop"},
                       "spec": {"target": target or {"podSelector": {"matchLabels": {"app": "web"}}},
                                "duration": duration}})


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
        while ca.artifact(f"{uid}/x.pcapng", "tok") is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert ca.artifact(f"{uid}/x.pcapng", "bad") is None and ca.artifact(f"{uid}/x.pcapng", "") is None
        assert ca.artifact(f"{uid}/../../x.pcapng", "tok") is None
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
