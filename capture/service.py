"""The one way into `capture` from the agent's runtime: start this node's Capture controller.

The runtime imports nothing else of this package (tests/unit/test_layout.py checks it);
`capture` itself uses the agent's core freely.
"""

from __future__ import annotations

from collections.abc import Callable

from agent.config import Config
from agent.k8s.cache import make_api_client
from capture import node
from capture.controller import CaptureController
from capture.engine import check_filter


def start_captures(config: Config, uplinks: list[str], scan: Callable, publish: Callable) -> CaptureController:
    """The running controller: `.artifact(...)` serves downloads, `.stop()` ends every capture.

    `scan` lists this node's pod interfaces, `publish` takes capture reports for the span exporter.
    """
    c = config.captures
    controller = CaptureController(
        make_api_client(config.kubeconfig or None), config.node, c.baseDir, config.agent_namespace, c.gracePeriod,
        run_job=lambda job, target, secret, directory, started: node.run_job(
            job, target, secret, directory, started, config.node, c.uploadAllowlist),
        local_target=lambda pods, spec: node.local_target(pods, spec, scan, uplinks),
        check_filter=check_filter, publish=publish)
    controller.start()  # creates the base directory first: a failure there starts nothing
    return controller
