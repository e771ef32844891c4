"""Capture outputs: the base directory cannot be left, the allowlist holds, uploads arrive whole."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from agent.errors import FoveaError
from capture.outputs import check_endpoint, host_path, upload_azure_blob, upload_s3
from tests.object_stores import AZURITE_ACCOUNT, AZURITE_KEY, azurite_blob, moto_s3

# -- hostPath ----------------------------------------------------------------------


def test_host_path_stays_in_the_base(tmp_path):
    base = tmp_path / "captures"
    base.mkdir()
    assert host_path(base, "shop", "web-debug-node1.pcap") == base / "shop" / "web-debug-node1.pcap"
    assert host_path(base, "a/b.pcap") == base / "a" / "b.pcap"


@pytest.mark.parametrize("parts", [
    ("..", "etc", "passwd"), ("../x",), ("shop/../../x",), ("/etc/passwd",), ("shop", "/abs"),
    ("",), (".",), ("a//b",), ("a\0b",),
])
def test_host_path_refuses_escapes(tmp_path, parts):
    with pytest.raises(FoveaError, match="would leave the capture directory"):
        host_path(tmp_path, *parts)


def test_host_path_refuses_symlinks(tmp_path):
    base, outside = tmp_path / "base", tmp_path / "outside"
    base.mkdir()
    outside.mkdir()
    (base / "out").symlink_to(outside)
    (base / "inside").symlink_to(base)
    (base / "f.pcap").symlink_to(outside / "f.pcap")
    for parts in (("out", "x.pcap"), ("inside", "x.pcap"), ("f.pcap",)):
        with pytest.raises(FoveaError, match="symbolic link"):
            host_path(base, *parts)
    # the base itself may be a link (e.g. a volume mount point)
    link = tmp_path / "base-link"
    link.symlink_to(base)
    assert host_path(link, "ok.pcap") == base / "ok.pcap"


# -- allowlist ---------------------------------------------------------------------

TEST_NET = "192.0.2.10"  # documentation range: never contacted


@pytest.fixture(autouse=True)
def example_names(monkeypatch):
    """example.com names resolve without asking any DNS server."""
    real = socket.getaddrinfo

    def resolver(host, port, *a, **kw):
        if host.endswith(("example.com", "example.org", "example.net")):
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (TEST_NET, port))]
        return real(host, port, *a, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", resolver)


@pytest.mark.parametrize("url, allowlist", [
    ("https://s3.example.com", ["s3.example.com"]),
    ("https://s3.example.com:9000/", ["s3.example.com:9000"]),
    ("https://bucket.s3.example.com", ["*.example.com"]),
    ("http://127.0.0.1:9000", ["http://127.0.0.1:9000"]),
    ("https://127.0.0.1", ["127.0.0.0/8"]),
    ("https://store.example.net", ["192.0.2.0/24"]),
    ("http://localhost:9000", ["http://127.0.0.0/8", "http://[::1]/128"]),
])
def test_allowlisted_endpoints_pass(url, allowlist):
    check_endpoint(url, allowlist)


@pytest.mark.parametrize("url, allowlist, complaint", [
    ("https://evil.example.org", ["s3.example.com"], "not on the allowlist"),
    ("https://s3.example.com", [], "allowlist is empty"),
    ("http://127.0.0.1:9000", ["127.0.0.1"], "not on the allowlist"),  # http needs saying so
    ("https://127.0.0.1:9001", ["127.0.0.1:9000"], "not on the allowlist"),
    ("https://example.com", ["*.example.com"], "not on the allowlist"),
    ("https://store.example.net", ["198.51.100.0/24"], "not on the allowlist"),
    ("https://user:pw@s3.example.com", ["s3.example.com"], "credentials"),
    ("ftp://s3.example.com", ["s3.example.com"], "not an http"),
    ("https://169.254.169.254/latest", ["169.254.0.0/16"], "link-local or metadata"),
    ("http://[fd00:ec2::254]/", ["http://[fd00:ec2::254]"], "link-local or metadata"),
    ("http://[fe80::1]/", ["http://fe80::/10"], "link-local or metadata"),
    ("http://[::ffff:169.254.169.254]/", ["http://::/0"], "link-local or metadata"),
    ("http://168.63.129.16/", ["http://0.0.0.0/0"], "link-local or metadata"),
])
def test_endpoints_refused(url, allowlist, complaint):
    with pytest.raises(FoveaError, match=complaint):
        check_endpoint(url, allowlist)


def test_names_are_checked_after_resolution(monkeypatch):
    real = socket.getaddrinfo

    def resolver(host, *a, **kw):
        if host == "store.example.com":  # an allowed name that points at the metadata service
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("169.254.169.254", 443))]
        return real(host, *a, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    with pytest.raises(FoveaError, match="resolves to 169.254.169.254"):
        check_endpoint("https://store.example.com", ["store.example.com"])


def test_sas_token_never_in_messages():
    with pytest.raises(FoveaError) as e:
        check_endpoint("https://acct.blob.example.net/c?sv=1&sig=SECRET", [])
    assert "SECRET" not in str(e.value)


# -- servers on loopback -------------------------------------------------------------


@pytest.fixture
def artifact(tmp_path) -> Path:
    path = tmp_path / "web-debug-node1.pcap"
    path.write_bytes(os.urandom(300_000))
    return path


@pytest.fixture(scope="module")
def s3():
    with moto_s3() as endpoint:
        yield endpoint


def test_s3_upload_arrives_whole(s3, artifact):
    import boto3

    client = boto3.client("s3", endpoint_url=s3, region_name="us-east-1",
                          aws_access_key_id="k", aws_secret_access_key="s")
    client.create_bucket(Bucket="captures")
    got = upload_s3(artifact, endpoint=s3, bucket="captures", key="shop/web-debug/node1.pcap",
                    region=None, access_key="k", secret_key="s", allowlist=[s3])
    data = artifact.read_bytes()
    assert got.size == len(data)
    assert got.sha256 == hashlib.sha256(data).hexdigest()
    assert got.location == f"{s3}/captures/shop/web-debug/node1.pcap"
    obj = client.get_object(Bucket="captures", Key="shop/web-debug/node1.pcap")
    assert hashlib.sha256(obj["Body"].read()).hexdigest() == got.sha256
    assert obj["Metadata"]["sha256"] == got.sha256


def test_s3_upload_failure_is_one_clear_error(s3, artifact):
    with pytest.raises(FoveaError, match="bucket 'missing'.*NoSuchBucket"):
        upload_s3(artifact, endpoint=s3, bucket="missing", key="x.pcap", region=None,
                  access_key="k", secret_key="s", allowlist=[s3])


class Listener:
    """A TCP port that records whether anyone connected."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.sock.settimeout(0.2)
        self._stop = False
        self.thread = threading.Thread(target=self._accept)
        self.thread.start()

    def _accept(self):
        while not self._stop:
            with contextlib.suppress(OSError):
                conn, _ = self.sock.accept()
                self.connections += 1
                conn.close()

    def close(self):
        self._stop = True
        self.thread.join()
        self.sock.close()


def test_refused_endpoints_are_never_contacted(artifact, monkeypatch):
    listener = Listener()
    try:
        url = f"http://127.0.0.1:{listener.port}"
        with pytest.raises(FoveaError, match="not on the allowlist"):
            upload_s3(artifact, endpoint=url, bucket="b", key="k", region=None, access_key="k",
                      secret_key="s", allowlist=[f"http://127.0.0.1:{listener.port + 1}"])
        with pytest.raises(FoveaError, match="not on the allowlist"):
            upload_azure_blob(artifact, sas_url=f"{url}/acct/c?sig=x", blob_name="k", allowlist=[])
        time.sleep(0.3)
        assert listener.connections == 0
    finally:
        listener.close()
    import boto3

    monkeypatch.setattr(boto3, "client", lambda *a, **kw: pytest.fail("a client was made"))
    with pytest.raises(FoveaError, match="link-local or metadata"):
        upload_s3(artifact, endpoint="http://169.254.169.254", bucket="b", key="k", region=None,
                  access_key="k", secret_key="s", allowlist=["http://169.254.169.254"])


@pytest.fixture(scope="module")
def azurite():
    with azurite_blob() as url:
        yield url


def test_azure_blob_upload_arrives_whole(azurite, artifact):
    from azure.storage.blob import BlobServiceClient, ContainerSasPermissions, generate_container_sas

    conn = (f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
            f"BlobEndpoint={azurite};")
    service = BlobServiceClient.from_connection_string(conn)
    service.create_container("captures")
    sas = generate_container_sas(AZURITE_ACCOUNT, "captures", account_key=AZURITE_KEY,
                                 permission=ContainerSasPermissions(create=True, write=True),
                                 expiry=datetime.now(timezone.utc) + timedelta(hours=1))
    origin = azurite.rsplit("/", 1)[0]
    got = upload_azure_blob(artifact, sas_url=f"{azurite}/captures?{sas}", blob_name="shop/web-debug/node1.pcap",
                            allowlist=[origin])
    data = artifact.read_bytes()
    assert got.sha256 == hashlib.sha256(data).hexdigest() and got.size == len(data)
    assert got.location == f"{azurite}/captures/shop/web-debug/node1.pcap"
    assert "sig=" not in got.location
    blob = service.get_blob_client("captures", "shop/web-debug/node1.pcap")
    assert hashlib.sha256(blob.download_blob().readall()).hexdigest() == got.sha256
    assert blob.get_blob_properties().metadata["sha256"] == got.sha256

    # a SAS without write permission: refused by the server, and the token is not in the message
    read_only = generate_container_sas(AZURITE_ACCOUNT, "captures", account_key=AZURITE_KEY,
                                       permission=ContainerSasPermissions(read=True),
                                       expiry=datetime.now(timezone.utc) + timedelta(hours=1))
    with pytest.raises(FoveaError, match="failed") as e:
        upload_azure_blob(artifact, sas_url=f"{azurite}/captures?{read_only}", blob_name="x.pcap",
                          allowlist=[origin])
    assert read_only not in str(e.value) and "sig=" not in str(e.value)
