"""Run a block of code inside another network namespace (this thread only)."""

from __future__ import annotations

import contextlib

from pyroute2 import netns


@contextlib.contextmanager
def in_netns(name_or_path: str):
    """Run the block with this thread in a network namespace: a name under
    /run/netns or a path such as /proc/<pid>/ns/net."""
    netns.pushns(name_or_path)
    try:
        yield
    finally:
        netns.popns()
