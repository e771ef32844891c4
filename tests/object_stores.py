"""Object stores on loopback for output tests: moto's S3 server and azurite's
Blob service, each started on a free port and stopped afterwards."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO, free_port, require

AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="  # public, fixed


def _wait_port(port: int, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{what} exited"
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} did not listen on {port}")


@contextlib.contextmanager
def server(argv: list[str], port: int, what: str):
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_port(port, proc, what)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def moto_s3():
    """moto's S3 server; yields its endpoint URL."""
    moto = Path(sys.executable).parent / "moto_server"
    require(moto.exists(), "needs moto_server (pip install moto[server])")
    port = free_port()
    with server([str(moto), "-H", "127.0.0.1", "-p", str(port)], port, "moto_server"):
        yield f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def azurite_blob():
    """azurite's Blob service; yields the account URL."""
    local = REPO / ".venv" / "node" / "node_modules" / ".bin" / "azurite-blob"
    exe = str(local) if local.exists() else shutil.which("azurite-blob")
    require(exe is not None, "needs azurite-blob (npm install azurite)")
    port = free_port()
    with server([exe, "--inMemoryPersistence", "--blobHost", "127.0.0.1", "--blobPort", str(port),
                 "--skipApiVersionCheck", "--silent"], port, "azurite"):
        yield f"http://127.0.0.1:{port}/{AZURITE_ACCOUNT}"
