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
from capture.outputs import check_endpoint, host_path, pinned_pools, upload_azure_blob, upload_s3
from tests.conftest import free_port, self_signed_cert
from tests.object_stores import AZURITE_ACCOUNT, AZURITE_KEY, azurite_blob, moto_s3, store_address, store_host

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
    ("http://198.51.100.7:9000", ["http://198.51.100.7:9000"]),
    ("https://198.51.100.7", ["198.51.100.0/24"]),
    ("https://store.example.net", ["192.0.2.0/24"]),
])
def test_allowlisted_endpoints_pass(url, allowlist):
    assert check_endpoint(url, allowlist) in (TEST_NET, "198.51.100.7")  # the address to connect to


@pytest.mark.parametrize("url, allowlist, complaint", [
    ("https://evil.example.org", ["s3.example.com"], "not on the allowlist"),
    ("https://s3.example.com", [], "allowlist is empty"),
    ("http://198.51.100.7:9000", ["198.51.100.7"], "not on the allowlist"),  # http needs saying so
    ("https://198.51.100.7:9001", ["198.51.100.7:9000"], "not on the allowlist"),
    # loopback: the node's own services (the agent is on the host network), whatever the allowlist says
    ("http://127.0.0.1:9000", ["http://127.0.0.1:9000"], "loopback"),
    ("https://127.0.0.2", ["127.0.0.0/8"], "loopback"),
    ("http://localhost:9000", ["http://localhost", "http://127.0.0.0/8", "http://[::1]/128"], "loopback"),
    ("http://[::1]:9000/", ["http://[::1]:9000"], "loopback"),
    ("http://[::ffff:127.0.0.1]/", ["http://::/0"], "loopback"),
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


def test_the_first_answer_is_the_address_used_and_every_answer_is_checked(monkeypatch):
    answers = {"two.example.com": ["198.51.100.7", "198.51.100.8"], "mixed.example.com": ["198.51.100.7", "127.0.0.1"]}
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, port, *a, **kw: [
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in answers[host]])
    assert check_endpoint("https://two.example.com", ["two.example.com"]) == "198.51.100.7"
    with pytest.raises(FoveaError, match="resolves to 127.0.0.1, a loopback"):
        check_endpoint("https://mixed.example.com", ["mixed.example.com"])


def test_sas_token_never_in_messages():
    with pytest.raises(FoveaError) as e:
        check_endpoint("https://acct.blob.example.net/c?sv=1&sig=SECRET", [])
    assert "SECRET" not in str(e.value)


# -- object stores on this host's own address ------------------------------------------


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
    """A TCP port (on loopback by default) that records whether anyone connected."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1"):
        self.sock = socket.create_server((host, port))
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
    address = store_host().host_side
    listener = Listener(host=address)
    try:
        url = f"http://{address}:{listener.port}"
        with pytest.raises(FoveaError, match="not on the allowlist"):
            upload_s3(artifact, endpoint=url, bucket="b", key="k", region=None, access_key="k",
                      secret_key="s", allowlist=[f"http://{address}:{listener.port + 1}"])
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


def test_loopback_is_never_contacted_even_when_allowlisted(artifact):
    listener = Listener()
    try:
        for host in ("127.0.0.1", "localhost"):
            url = f"http://{host}:{listener.port}"
            allowlist = [url, "http://127.0.0.0/8", "http://[::1]/128"]
            with pytest.raises(FoveaError, match="loopback"):
                upload_s3(artifact, endpoint=url, bucket="b", key="k", region=None, access_key="k",
                          secret_key="s", allowlist=allowlist)
            with pytest.raises(FoveaError, match="loopback"):
                upload_azure_blob(artifact, sas_url=f"{url}/acct/c?sig=x", blob_name="k", allowlist=allowlist)
        time.sleep(0.3)
        assert listener.connections == 0
    finally:
        listener.close()


class Rebinding:
    """A resolver for store.test: the allowlisted address on the first question, loopback after
    (a DNS rebinding attack); or both in one answer."""

    def __init__(self, monkeypatch, first: str, one_answer: bool = False):
        self.first, self.one_answer, self.asked = first, one_answer, 0
        real = socket.getaddrinfo

        def resolve(host, port, *a, **kw):
            if host != "store.test":
                return real(host, port, *a, **kw)
            self.asked += 1
            addresses = [first, "127.0.0.1"] if one_answer else [first if self.asked == 1 else "127.0.0.1"]
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in addresses]

        monkeypatch.setattr(socket, "getaddrinfo", resolve)


def test_an_upload_goes_to_the_checked_address_never_to_a_second_answer(artifact, monkeypatch):
    """The object store listens on this host's address A, a trap on 127.0.0.1 on the same port;
    store.test resolves to A first and to loopback afterwards: the upload lands in the store,
    the trap sees nothing, and the name was resolved once."""
    import boto3

    address, port = store_address(), free_port()
    with moto_s3(address, port) as endpoint:
        trap = Listener(port)
        try:
            boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="k",
                         aws_secret_access_key="s").create_bucket(Bucket="caps")
            dns = Rebinding(monkeypatch, address)
            got = upload_s3(artifact, endpoint=f"http://store.test:{port}", bucket="caps", key="k.pcap",
                            region=None, access_key="k", secret_key="s", allowlist=["http://store.test"])
            assert dns.asked == 1
            obj = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="k",
                               aws_secret_access_key="s").get_object(Bucket="caps", Key="k.pcap")
            assert hashlib.sha256(obj["Body"].read()).hexdigest() == got.sha256
            # Both answers at once: refused before any connection.
            Rebinding(monkeypatch, address, one_answer=True)
            with pytest.raises(FoveaError, match="resolves to 127.0.0.1, a loopback"):
                upload_s3(artifact, endpoint=f"http://store.test:{port}", bucket="caps", key="k2.pcap",
                          region=None, access_key="k", secret_key="s", allowlist=["http://store.test"])
            time.sleep(0.3)
            assert trap.connections == 0
        finally:
            trap.close()


def test_azure_upload_goes_to_the_checked_address(artifact, monkeypatch):
    from azure.storage.blob import BlobServiceClient, ContainerSasPermissions, generate_container_sas

    address, port = store_address(), free_port()
    with azurite_blob(address, port) as url:
        trap = Listener(port)
        try:
            service = BlobServiceClient.from_connection_string(
                f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
                f"BlobEndpoint={url};")
            service.create_container("caps")
            sas = generate_container_sas(AZURITE_ACCOUNT, "caps", account_key=AZURITE_KEY,
                                         permission=ContainerSasPermissions(create=True, write=True),
                                         expiry=datetime.now(timezone.utc) + timedelta(hours=1))
            dns = Rebinding(monkeypatch, address)
            got = upload_azure_blob(artifact, sas_url=f"http://store.test:{port}/{AZURITE_ACCOUNT}/caps?{sas}",
                                    blob_name="k.pcap", allowlist=["http://store.test"])
            assert dns.asked == 1
            blob = service.get_blob_client("caps", "k.pcap")
            assert hashlib.sha256(blob.download_blob().readall()).hexdigest() == got.sha256
            time.sleep(0.3)
            assert trap.connections == 0
        finally:
            trap.close()


def test_a_pinned_connection_speaks_tls_to_the_name(tmp_path):
    """Pinned to an address, the connection still sends the name in SNI and checks the
    certificate against the name: a certificate for another name is refused."""
    import ssl

    import urllib3
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    good, good_key = _cert(tmp_path, "store.test")
    other, other_key = self_signed_cert(tmp_path, "other")
    for cert, key, ok in ((good, good_key, True), (other, other_key, False)):
        seen = []
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        ctx.sni_callback = lambda sock, name, _ctx: seen.append(name)
        srv = socket.create_server(("127.0.0.1", 0))
        port = srv.getsockname()[1]

        def serve():
            conn, _ = srv.accept()
            try:
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(4096)
                    tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            except (ssl.SSLError, OSError):
                pass

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        pool = urllib3.PoolManager(ca_certs=str(cert), retries=False)
        pool.pool_classes_by_scheme = pinned_pools("127.0.0.1", HTTPConnectionPool, HTTPSConnectionPool)
        try:
            if ok:
                assert pool.request("GET", f"https://store.test:{port}/").data == b"ok"
            else:
                with pytest.raises(urllib3.exceptions.SSLError):
                    pool.request("GET", f"https://store.test:{port}/")
        finally:
            t.join(5)
            srv.close()
        assert seen == ["store.test"]


def _cert(directory: Path, name: str) -> tuple[Path, Path]:
    import subprocess

    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "1", "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


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
