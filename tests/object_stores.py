"""Object stores for output tests: moto's S3 server and azurite's Blob service.

Uploads never go to loopback, so the stores listen in a network namespace of
the tests' own, on an address the host reaches through a veth pair (a "store
host"); each store is stopped afterwards and the namespace removed at exit."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO, free_octet, free_port, require, unique_prefix

AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="  # public, fixed


class StoreHost:
    """A network namespace with one address, 10.<o>.250.2, reachable from the host."""

    def __init__(self):
        require(os.geteuid() == 0, "needs root (the object stores run in a network namespace of their own)")
        self.name = f"{unique_prefix()}os"
        octet = free_octet()
        self.address = f"10.{octet}.250.2"
        self.host_side = f"10.{octet}.250.1"  # the host's end of the pair: a non-loopback address in the host
        host_if, ns_if = f"{self.name}h", f"{self.name}n"
        steps = [
            ["ip", "netns", "add", self.name],
            ["ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if, "netns", self.name],
            ["ip", "addr", "add", f"{self.host_side}/30", "dev", host_if],
            ["ip", "link", "set", host_if, "up"],
            ["ip", "-n", self.name, "addr", "add", f"{self.address}/30", "dev", ns_if],
            ["ip", "-n", self.name, "link", "set", ns_if, "up"],
            ["ip", "-n", self.name, "link", "set", "lo", "up"],
        ]
        atexit.register(self.remove)
        for step in steps:
            subprocess.run(step, check=True, capture_output=True)

    def remove(self) -> None:
        # Deleting the namespace deletes the veth pair (and the host's route) with it.
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


_store_host: StoreHost | None = None


def store_host() -> StoreHost:
    global _store_host
    if _store_host is None:
        _store_host = StoreHost()
    return _store_host


def store_address() -> str:
    """The address the test object stores listen on (never loopback)."""
    return store_host().address


def _wait_port(host: str, port: int, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{what} exited"
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} did not listen on {port}")


@contextlib.contextmanager
def server(argv: list[str], host: str, port: int, what: str, env: dict | None = None):
    argv = ["ip", "netns", "exec", store_host().name, *argv]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, **(env or {})))
    try:
        _wait_port(host, port, proc, what)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def moto_s3(host: str | None = None, port: int | None = None):
    """moto's S3 server; yields its endpoint URL."""
    moto = Path(sys.executable).parent / "moto_server"
    require(moto.exists(), "needs moto_server (pip install moto[server])")
    host, port = host or store_address(), port or free_port()
    # Path-style addressing whatever the Host header's name is (the uploads' is not an address).
    with server([str(moto), "-H", host, "-p", str(port)], host, port, "moto_server",
                env={"S3_IGNORE_SUBDOMAIN_BUCKETNAME": "true"}):
        yield f"http://{host}:{port}"


@contextlib.contextmanager
def azurite_blob(host: str | None = None, port: int | None = None):
    """azurite's Blob service; yields the account URL."""
    local = REPO / ".venv" / "node" / "node_modules" / ".bin" / "azurite-blob"
    exe = str(local) if local.exists() else shutil.which("azurite-blob")
    require(exe is not None, "needs azurite-blob (npm install azurite)")
    host, port = host or store_address(), port or free_port()
    with server([exe, "--inMemoryPersistence", "--blobHost", host, "--blobPort", str(port),
                 "--skipApiVersionCheck", "--disableProductStyleUrl", "--silent"], host, port, "azurite"):
        yield f"http://{host}:{port}/{AZURITE_ACCOUNT}"
