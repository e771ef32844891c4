"""The status of a Capture: what each node reports, and the aggregate phase.

Every agent computes the aggregate from the same inputs (expectedNodes and
nodes.<node>) inside a read-modify-write of the status subresource, so however
many nodes report at once, the last successful write holds every report and
the phase that follows from them.
"""

from __future__ import annotations

import datetime

PENDING, RUNNING, SUCCEEDED, FAILED, PARTIAL = "Pending", "Running", "Succeeded", "Failed", "PartiallySucceeded"
TERMINAL = (SUCCEEDED, FAILED, PARTIAL)
OPEN = (PENDING, RUNNING)
NODE_DONE = (SUCCEEDED, FAILED)


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def at(seconds: float) -> str:
    """A wall-clock time (seconds since the epoch) as the status writes times."""
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def waiting(node: dict) -> bool:
    """A node report of a capture that waits for a slot: Pending, with the reason."""
    return node.get("phase") == PENDING and bool(node.get("message"))


def parse_time(text: str) -> float:
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=datetime.timezone.utc).timestamp()


def fail(status: dict, message: str) -> dict:
    """The whole capture failed before any node captured (a bad spec, a boundary)."""
    status.update(phase=FAILED, message=message, completionTime=now())
    status.setdefault("expectedNodes", status.get("expectedNodes") or [])
    _condition(status, FAILED, message)
    return status


def aggregate(status: dict, overdue: bool = False) -> dict:
    """Phase, counts and completion from the node reports. overdue: duration + grace have
    passed, so a node that has not reported never will (its agent is gone)."""
    expected = status.get("expectedNodes") or []
    nodes = status.setdefault("nodes", {})
    if overdue:
        for node in expected:
            if (nodes.get(node) or {}).get("phase") not in NODE_DONE:
                nodes[node] = dict(nodes.get(node) or {}, phase=FAILED, completionTime=now(),
                                   message=f"no report from the agent on node {node} within the duration "
                                           "and the grace period (is the agent running there?)")
    done = [n for n in expected if (nodes.get(n) or {}).get("phase") in NODE_DONE]
    ok = [n for n in expected if (nodes.get(n) or {}).get("phase") == SUCCEEDED]
    status["nodesDone"] = f"{len(done)}/{len(expected)}"
    status["packets"] = sum(int((nodes.get(n) or {}).get("packets") or 0) for n in expected)
    if expected and len(done) == len(expected):
        if len(ok) == len(expected):
            phase, message = SUCCEEDED, f"captured on {len(ok)} node(s)"
        elif ok:
            failed = [n for n in expected if n not in ok]
            phase = PARTIAL
            message = f"captured on {len(ok)} of {len(expected)} node(s); failed on " + "; ".join(
                f"{n}: {nodes[n].get('message', '')}" for n in failed)
        else:
            phase = FAILED
            messages = list(dict.fromkeys(nodes[n].get("message", "") for n in expected))
            message = messages[0] if len(messages) == 1 else "; ".join(f"{n}: {nodes[n].get('message', '')}"
                                                                        for n in expected)
        status.update(phase=phase, message=message, completionTime=now())
        _condition(status, phase, message)
    elif expected:
        queued = [n for n in expected if waiting(nodes.get(n) or {})]
        active = [n for n in expected if (nodes.get(n) or {}).get("phase") in (RUNNING, *NODE_DONE)]
        # Pending while every node that reported waits for a slot; the message says why.
        status["phase"] = PENDING if queued and not active else RUNNING
        status["message"] = "; ".join(f"{n}: {nodes[n]['message']}" for n in queued) if len(queued) > 1 else \
            nodes[queued[0]]["message"] if queued else ""
    return status


def _condition(status: dict, reason: str, message: str) -> None:
    status["conditions"] = [c for c in status.get("conditions") or [] if c.get("type") != "Complete"] + [
        {"type": "Complete", "status": "True", "reason": reason, "message": message[:1024],
         "lastTransitionTime": now()}]
