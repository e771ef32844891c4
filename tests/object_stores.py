"""Object stores for output tests: moto's S3 server and azurite's Blob service,
each started on a free port of this host's own non-loopback address (uploads
never go to loopback) and stopped afterwards."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO, free_port, require

AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="  # public, fixed


def local_address() -> str:
    """This host's IPv4 address towards its default route (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("198.51.100.1", 9))
        except OSError:
            require(False, "a non-loopback IPv4 address on this host (uploads never go to loopback)")
        return s.getsockname()[0]


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
    host, port = host or local_address(), port or free_port()
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
    host, port = host or local_address(), port or free_port()
    with server([exe, "--inMemoryPersistence", "--blobHost", host, "--blobPort", str(port),
                 "--skipApiVersionCheck", "--disableProductStyleUrl", "--silent"], host, port, "azurite"):
        yield f"http://{host}:{port}/{AZURITE_ACCOUNT}"
