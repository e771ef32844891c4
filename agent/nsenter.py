"""Run code inside another network namespace: the one way Fovea enters one.

setns(2) moves only the calling thread, and the namespace it came from is
kept in this frame, not in a process-wide stack (pyroute2's pushns/popns keep
one stack for all threads, so two threads switching at once could return into
each other's namespace).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot enter network namespace {what}: {os.strerror(err)}")


@contextlib.contextmanager
def in_netns(name_or_path: str):
    """Run the block with this thread in a network namespace: a name under
    /run/netns or a path such as /proc/<pid>/ns/net."""
    path = name_or_path if "/" in name_or_path else f"/run/netns/{name_or_path}"
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target, path)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(home, "of this thread")
    finally:
        os.close(home)


def run_in_netns(path: str | None, work):
    """`work()` on a thread of its own inside network namespace `path` (None: this process's),
    its result returned and its exception raised here. No other thread's namespace ever changes,
    even if the way back failed."""
    box: dict = {}

    def run():
        try:
            with in_netns(path) if path is not None else contextlib.nullcontext():
                box["value"] = work()
        except Exception as e:
            box["error"] = e

    t = threading.Thread(target=run, name="in-netns")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]
