import os
import random
import threading
import time

import pytest

from agent.nsenter import in_netns, run_in_netns


def netns_inode() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


def test_missing_namespace_is_an_oserror_and_nothing_moves():
    before = netns_inode()
    with pytest.raises(OSError):
        with in_netns("/nonexistent/ns/net"):
            pass
    assert netns_inode() == before


@pytest.fixture
def two_netns():
    if os.geteuid() != 0:
        pytest.skip("creating a network namespace needs root")
    from pyroute2 import netns

    names = ["fvns%06x" % random.randrange(16**6) for _ in range(2)]
    for name in names:
        netns.create(name)
    try:
        yield [f"/run/netns/{name}" for name in names]
    finally:
        for name in names:
            netns.remove(name)


def test_threads_switching_at_once_each_return_where_they_were(two_netns):
    """One thread works from the agent's namespace, another from inside a
    second one; both step into a third, interleaved. Each must come back to
    where it was, not where the other one was."""
    one, two = two_netns
    home = netns_inode()
    errors = []

    def from_home():
        for _ in range(50):
            with in_netns(one):
                time.sleep(0.001)
            if netns_inode() != home:
                errors.append("home thread came back elsewhere")

    def from_two():
        with in_netns(two):
            where = netns_inode()
            for _ in range(50):
                with in_netns(one):
                    time.sleep(0.001)
                if netns_inode() != where:
                    errors.append("second thread came back elsewhere")

    threads = [threading.Thread(target=fn) for fn in (from_home, from_two)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert netns_inode() == home


def test_run_in_netns_works_on_a_thread_of_its_own(two_netns):
    before = netns_inode()
    inside = run_in_netns(two_netns[0], netns_inode)
    assert inside == os.stat(two_netns[0]).st_ino != before
    assert run_in_netns(None, netns_inode) == before  # None: this process's namespace
    assert netns_inode() == before
    with pytest.raises(ZeroDivisionError):  # the work's exception comes back to the caller
        run_in_netns(two_netns[1], lambda: 1 / 0)
    with pytest.raises(OSError):
        run_in_netns("/nonexistent/ns/net", netns_inode)
    assert netns_inode() == before
