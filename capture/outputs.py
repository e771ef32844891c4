"""Where finished captures go: the agent's base directory, S3-compatible storage, Azure Blob.

The rules that make outputs safe to hand to application teams:
- hostPath: a path built from a spec never leaves the agent's base directory
  (no `..`, no absolute parts, no symlinks on the way);
- uploads: only to endpoints on the cluster admin's allowlist, and never to a
  loopback, link-local or cloud metadata address, whatever the allowlist says
  (checked on the addresses the name resolves to); the client then connects to
  the very address that was checked (`pinned`), with TLS still verified for the
  name, so a second DNS answer cannot move the upload; plain http only where
  the allowlist says so; credentials and SAS tokens never appear in messages.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from agent.errors import FoveaError

log = logging.getLogger(__name__)

# Always refused: loopback (the node's own services: the agent runs on the host network),
# link-local (where cloud metadata services live) and the known metadata and host-agent
# addresses that are not link-local.
FORBIDDEN_NETWORKS = [ipaddress.ip_network(n) for n in (
    "127.0.0.0/8", "::1/128",  # loopback
    "169.254.0.0/16",  # IPv4 link-local, incl. 169.254.169.254 (AWS, GCP, Azure IMDS)
    "fe80::/10",  # IPv6 link-local
    "fd00:ec2::254/128",  # AWS IMDS over IPv6
    "168.63.129.16/32",  # Azure WireServer
    "100.100.100.200/32",  # Alibaba Cloud metadata
    "0.0.0.0/8", "::/128",  # "this host"
    "224.0.0.0/4", "ff00::/8",  # multicast
)]
TIMEOUT = 30  # seconds, connect and read


@dataclass(frozen=True)
class Artifact:
    location: str  # a path on the node, or the object's URL (never with credentials)
    size: int
    sha256: str


def file_digest(path: Path) -> Artifact:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return Artifact(str(path), size, digest.hexdigest())


# -- hostPath ----------------------------------------------------------------------


def host_path(base: Path, *parts: str) -> Path:
    """`base/parts...`, refused (FoveaError) unless it stays inside `base`: no absolute or
    empty parts, no `.` or `..`, and no symlink anywhere below `base`."""
    base = Path(os.path.realpath(base))
    relative: list[str] = []
    for part in parts:
        if not part or part.startswith("/") or "\0" in part:
            raise _escape(part)
        for name in part.split("/"):
            if name in ("", ".", ".."):
                raise _escape(part)
            relative.append(name)
    path = base.joinpath(*relative)
    here = base
    for name in relative:
        here = here / name
        if here.is_symlink():
            raise _escape("/".join(parts), f"{here} is a symbolic link")
    if os.path.commonpath([base, os.path.realpath(path)]) != str(base):
        raise _escape("/".join(parts))
    return path


def _escape(what: str, why: str = "") -> FoveaError:
    detail = f" ({why})" if why else ""
    return FoveaError(f"output path {what!r} would leave the capture directory{detail}",
                      "use plain names: no '/', '..', absolute paths or links")


# -- endpoint allowlist ------------------------------------------------------------


def _forbidden(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return any(ip in net for net in FORBIDDEN_NETWORKS if net.version == ip.version)


def _matches(entry: str, scheme: str, host: str, port: int, addresses: list[str]) -> bool:
    entry = entry.strip().lower().rstrip("/")
    allowed_scheme = "https"
    if "://" in entry:
        allowed_scheme, entry = entry.split("://", 1)
    if scheme != allowed_scheme:
        return False
    if "/" in entry:  # a network: every address the host resolves to must be in it
        try:
            net = ipaddress.ip_network(entry, strict=False)
        except ValueError:
            return False
        return all(ipaddress.ip_address(a.split("%")[0]) in net for a in addresses)
    parsed = urlsplit("//" + entry)
    try:
        if parsed.port is not None and parsed.port != port:
            return False
    except ValueError:
        return False
    pattern = parsed.hostname or ""
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])
    return host == pattern


def check_endpoint(url: str, allowlist: list[str]) -> str:
    """The address to connect to for an upload URL (the first the name resolved to; every
    one was checked), or FoveaError if the URL is not on the allowlist or resolves to a
    loopback, link-local or metadata address. Entries: `host`, `host:port`, `*.domain`,
    `scheme://host[:port]`, or a network (`10.0.0.0/8`). Without a scheme, https only."""
    shown = _without_query(url)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FoveaError(f"upload endpoint {shown!r} is not an http(s) URL")
    if parts.username or parts.password:
        raise FoveaError(f"upload endpoint {_without_query(url, userinfo=False)!r} has credentials in it",
                         "put credentials in the Secret, not the URL")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise FoveaError(f"upload endpoint {shown!r} has a bad port") from None
    host = parts.hostname.lower()
    if _is_address(host) and _forbidden(host):
        raise _metadata(shown, host)
    networks = [e for e in allowlist if "/" in e.split("://")[-1].rstrip("/")]
    by_name = any(_matches(e, parts.scheme, host, port, []) for e in allowlist if e not in networks)
    if not by_name and not networks:  # refused without even a DNS query
        raise _not_allowed(shown, allowlist)
    try:
        answers = [info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]
    except (socket.gaierror, UnicodeError) as e:
        raise FoveaError(f"upload endpoint {shown!r}: cannot resolve {host}: {e}") from None
    addresses = list(dict.fromkeys(answers))  # in the resolver's order: the first is the one used
    if not addresses:
        raise FoveaError(f"upload endpoint {shown!r}: {host} resolves to no address")
    bad = [a for a in addresses if _forbidden(a)]
    if bad:
        raise _metadata(shown, ", ".join(bad))
    if not by_name and not any(_matches(e, parts.scheme, host, port, addresses) for e in networks):
        raise _not_allowed(shown, allowlist)
    return addresses[0]


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%")[0])
        return True
    except ValueError:
        return False


def _metadata(shown: str, addresses: str) -> FoveaError:
    return FoveaError(f"upload endpoint {shown!r} resolves to {addresses}, a loopback, link-local or metadata "
                      "address", "uploads never go there, whatever the allowlist says")


def _not_allowed(shown: str, allowlist: list[str]) -> FoveaError:
    return FoveaError(f"upload endpoint {shown!r} is not on the allowlist",
                      "ask the cluster admin to add it to the agent's capture upload allowlist"
                      if allowlist else "the agent's capture upload allowlist is empty")


def _without_query(url: str, userinfo: bool = True) -> str:
    """The URL as it may be shown: no query (a SAS token), no credentials."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1] if parts.netloc else ""
    if parts.username and not userinfo:
        netloc = "***@" + netloc
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _object_name(name: str) -> str:
    if not name or name.startswith("/") or any(p in ("", ".", "..") for p in name.split("/")) \
            or any(ord(c) < 32 for c in name):
        raise FoveaError(f"object name {name!r} is not valid", "use a relative name without '..'")
    return name


# -- pinning: connect to the checked address, speak TLS to the name --------------------


class _Pinned:
    """A urllib3 connection that opens its socket to `address` (the one check_endpoint
    passed) instead of resolving its host again; Host, SNI and the certificate check
    still use the name."""

    address = ""

    def _new_conn(self):
        name = self._dns_host
        self._dns_host = self.address  # urllib3 resolves only this attribute
        try:
            return super()._new_conn()
        finally:
            self._dns_host = name


def pinned_pools(address: str, http_pool, https_pool) -> dict:
    """urllib3 pool classes by scheme (for a PoolManager's pool_classes_by_scheme) whose
    connections all go to `address`."""
    def pin(pool):
        conn = type(f"Pinned{pool.ConnectionCls.__name__}", (_Pinned, pool.ConnectionCls), {"address": address})
        return type(f"Pinned{pool.__name__}", (pool,), {"ConnectionCls": conn})

    return {"http": pin(http_pool), "https": pin(https_pool)}


def _pin_boto(client, address: str) -> None:
    from botocore.awsrequest import AWSHTTPConnectionPool, AWSHTTPSConnectionPool

    session = client._endpoint.http_session  # botocore has no public hook for its connection pools
    session._manager.pool_classes_by_scheme = pinned_pools(address, AWSHTTPConnectionPool, AWSHTTPSConnectionPool)
    session._proxy_managers.clear()


def _pinned_requests_session(address: str):
    """A requests session (for azure-core's transport) whose every connection goes to
    `address`, with no proxy taken from the environment."""
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
    from urllib3.util.retry import Retry

    class PinnedAdapter(HTTPAdapter):
        def init_poolmanager(self, *args, **kwargs):
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = pinned_pools(address, HTTPConnectionPool, HTTPSConnectionPool)

    session = requests.Session()
    session.trust_env = False  # a proxy from the environment would be a different target
    for scheme in ("http://", "https://"):  # azure-core retries itself, urllib3 must not (as its own adapter)
        session.mount(scheme, PinnedAdapter(max_retries=Retry(total=False, redirect=False, raise_on_status=False)))
    return session


# -- S3 -------------------------------------------------------------------------------


def upload_s3(path: Path, *, endpoint: str, bucket: str, key: str, region: str | None,
              access_key: str, secret_key: str, allowlist: list[str]) -> Artifact:
    """Upload to any S3-compatible endpoint (path-style addressing), once it passed
    check_endpoint; the object carries its sha256 in its metadata."""
    return put_s3(path, check_endpoint(endpoint, allowlist), endpoint=endpoint, bucket=bucket, key=key,
                  region=region, access_key=access_key, secret_key=secret_key)


def put_s3(path: Path, address: str, *, endpoint: str, bucket: str, key: str, region: str | None,
           access_key: str, secret_key: str) -> Artifact:
    """upload_s3 to an address already checked: every connection goes to `address`."""
    import boto3
    from boto3.exceptions import Boto3Error
    from boto3.s3.transfer import TransferConfig
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    key = _object_name(key)
    local = file_digest(path)
    client = boto3.client(
        "s3", endpoint_url=endpoint, region_name=region or "us-east-1",
        aws_access_key_id=access_key, aws_secret_access_key=secret_key,
        config=Config(
            s3={"addressing_style": "path"}, connect_timeout=TIMEOUT, read_timeout=TIMEOUT,
            retries={"max_attempts": 3, "mode": "standard"},
            # Not every S3-compatible store accepts the newer default CRC checksums.
            request_checksum_calculation="when_required", response_checksum_validation="when_required",
            proxies={},  # straight to the checked address, never through a proxy from the environment
        ),
    )
    _pin_boto(client, address)
    try:
        client.upload_file(str(path), bucket, key, ExtraArgs={"Metadata": {"sha256": local.sha256}},
                           Config=TransferConfig(multipart_threshold=64 << 20, max_concurrency=2))
    except (Boto3Error, BotoCoreError, ClientError) as e:
        raise FoveaError(f"upload to {_without_query(endpoint)} bucket {bucket!r} failed: {e}") from None
    finally:
        client.close()
    return Artifact(f"{_without_query(endpoint).rstrip('/')}/{bucket}/{key}", local.size, local.sha256)


# -- Azure Blob -------------------------------------------------------------------------


def blob_url(sas_url: str, blob_name: str) -> str:
    """The blob's URL inside the container a SAS URL names (the SAS query kept)."""
    parts = urlsplit(sas_url)
    path = parts.path.rstrip("/") + "/" + quote(_object_name(blob_name))
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def upload_azure_blob(path: Path, *, sas_url: str, blob_name: str, allowlist: list[str]) -> Artifact:
    """Upload into the container of a container SAS URL, once it passed check_endpoint; the
    SAS token never leaves this call."""
    return put_azure_blob(path, check_endpoint(sas_url, allowlist), sas_url=sas_url, blob_name=blob_name)


def put_azure_blob(path: Path, address: str, *, sas_url: str, blob_name: str) -> Artifact:
    """upload_azure_blob to an address already checked: every connection goes to `address`."""
    from azure.core.exceptions import AzureError
    from azure.core.pipeline.transport import RequestsTransport
    from azure.storage.blob import BlobClient

    url = blob_url(sas_url, blob_name)
    local = file_digest(path)
    query = urlsplit(sas_url).query
    try:
        transport = RequestsTransport(session=_pinned_requests_session(address), session_owner=True,
                                      use_env_settings=False)
        with BlobClient.from_blob_url(url, permit_redirects=False, connection_timeout=TIMEOUT,
                                      read_timeout=TIMEOUT, retry_total=3, transport=transport) as blob, \
                open(path, "rb") as f:
            blob.upload_blob(f, length=local.size, overwrite=True, metadata={"sha256": local.sha256},
                             max_concurrency=2)
    except AzureError as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        if query:
            message = message.replace(query, "<SAS>")
        raise FoveaError(f"upload to {_without_query(url)} failed: {message}") from None
    return Artifact(_without_query(url), local.size, local.sha256)
