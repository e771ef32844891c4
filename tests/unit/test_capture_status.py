"""capture/status.py: the aggregate phase from the node reports."""

from __future__ import annotations

import pytest

from capture import status as st


def status(expected, **nodes):
    return {"expectedNodes": list(expected), "phase": "Running",
            "nodes": {n: ({"phase": p, "packets": 1, "message": f"{n} said so" if p != "Pending" else ""} if p else {})
                      for n, p in nodes.items()}}


@pytest.mark.parametrize("reports, phase", [
    ({"a": "Succeeded", "b": "Succeeded"}, "Succeeded"),
    ({"a": "Succeeded", "b": "Failed"}, "PartiallySucceeded"),
    ({"a": "Failed", "b": "Failed"}, "Failed"),
    ({"a": "Succeeded", "b": "Running"}, "Running"),
    ({"a": "Succeeded"}, "Running"),
    ({"a": "Pending", "b": "Pending"}, "Running"),
])
def test_phase_from_reports(reports, phase):
    s = st.aggregate(status(["a", "b"], **reports))
    assert s["phase"] == phase
    done = sum(1 for p in reports.values() if p in ("Succeeded", "Failed"))
    assert s["nodesDone"] == f"{done}/2"
    assert ("completionTime" in s) == (phase != "Running")


@pytest.mark.parametrize("reports, phase", [
    ({"a": "Succeeded"}, "PartiallySucceeded"),
    ({"a": "Succeeded", "b": "Running"}, "PartiallySucceeded"),
    ({}, "Failed"),
    ({"a": "Succeeded", "b": "Succeeded"}, "Succeeded"),
])
def test_overdue_nodes_count_as_failed(reports, phase):
    s = st.aggregate(status(["a", "b"], **reports), overdue=True)
    assert s["phase"] == phase and s["nodesDone"] == "2/2"
    for n in ("a", "b"):
        if reports.get(n) != "Succeeded":
            assert s["nodes"][n]["phase"] == "Failed" and "no report from the agent on node" in s["nodes"][n]["message"]


def test_messages_and_counts():
    s = st.aggregate(status(["a", "b"], a="Failed", b="Failed"))
    assert s["message"] == "a: a said so; b: b said so" and s["packets"] == 2
    same = {"expectedNodes": ["a", "b"], "nodes": {"a": {"phase": "Failed", "message": "bad filter"},
                                                    "b": {"phase": "Failed", "message": "bad filter"}}}
    assert st.aggregate(same)["message"] == "bad filter"
    s = st.aggregate(status(["a", "b"], a="Succeeded", b="Failed"))
    assert s["message"] == "captured on 1 of 2 node(s); failed on b: b said so"
    assert [c["reason"] for c in s["conditions"]] == ["PartiallySucceeded"]


def test_reports_of_unexpected_nodes_do_not_count():
    s = st.aggregate(status(["a"], a="Succeeded", z="Failed"))
    assert s["phase"] == "Succeeded" and s["packets"] == 1


def test_fail_before_any_node():
    s = st.fail({}, "spec.duration is required")
    assert s["phase"] == "Failed" and s["message"] == "spec.duration is required" and s["expectedNodes"] == []


def test_a_node_waiting_for_a_slot_makes_the_capture_pending_with_its_reason():
    s = status(["a", "b"])
    s["nodes"] = {"a": {"phase": "Pending", "message": "waiting for a capture slot on node a"}}
    s = st.aggregate(s)
    assert s["phase"] == "Pending" and s["message"] == "waiting for a capture slot on node a"
    s["nodes"]["b"] = {"phase": "Running"}
    s = st.aggregate(s)
    assert s["phase"] == "Running" and s["message"] == "waiting for a capture slot on node a"
    s["nodes"]["a"] = {"phase": "Running", "message": ""}
    s = st.aggregate(s)
    assert s["phase"] == "Running" and s["message"] == ""
