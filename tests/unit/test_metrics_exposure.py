"""The metrics port's exposure options: TLS from PEM files, and /metrics behind a
Kubernetes token (TokenReview + SubjectAccessReview against the API emulator)."""

from __future__ import annotations

import kubernetes.client
import pytest
import requests
from prometheus_client import CollectorRegistry, Counter

from agent.auth import TokenAccess
from agent.errors import FoveaError
from agent.server import MetricsServer, TlsFiles
from tests.conftest import free_port, self_signed_cert
from tests.k8s_emulator import K8sEmulator


@pytest.fixture
def registry():
    reg = CollectorRegistry()
    Counter("fovea_test_scrapes", "a metric to see in the body", registry=reg).inc(3)
    return reg


def serve(registry, **kw) -> MetricsServer:
    server = MetricsServer("127.0.0.1", free_port(), registry, lambda: (True, "ok"), lambda: (True, "ready"), **kw)
    server.start()
    return server


def test_tls_serves_https_and_picks_up_a_renewed_certificate(tmp_path, registry):
    cert, key = self_signed_cert(tmp_path)
    server = serve(registry, tls=TlsFiles(str(cert), str(key)))
    url = f"https://127.0.0.1:{server.server_address[1]}"
    try:
        assert "fovea_test_scrapes_total 3.0" in requests.get(url + "/metrics", verify=str(cert), timeout=5).text
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(url.replace("https", "http") + "/healthz", timeout=5)  # no plain HTTP beside it
        new_cert, new_key = self_signed_cert(tmp_path, "renewed")
        cert.write_bytes(new_cert.read_bytes())
        key.write_bytes(new_key.read_bytes())
        assert requests.get(url + "/healthz", verify=str(new_cert), timeout=5).status_code == 200
    finally:
        server.stop()


def test_bad_tls_files_are_a_one_line_error(tmp_path):
    with pytest.raises(FoveaError, match="cannot read TLS certificate"):
        TlsFiles(str(tmp_path / "missing.crt"), str(tmp_path / "missing.key"))
    (tmp_path / "bad.crt").write_text("not a certificate")
    with pytest.raises(FoveaError, match="cannot load TLS certificate"):
        TlsFiles(str(tmp_path / "bad.crt"), str(tmp_path / "bad.crt"))


def test_metrics_need_a_token_allowed_to_get_metrics_and_probes_do_not(registry):
    api = K8sEmulator().start()
    api.add_user("prom-token", "system:serviceaccount:monitoring:prometheus", ("system:serviceaccounts",))
    api.add_user("app-token", "system:serviceaccount:shop:web")
    api.allow_url("system:serviceaccount:monitoring:prometheus", "get", "/metrics")
    now = [0.0]
    access = TokenAccess(kubernetes.client.ApiClient(api.client_configuration()), ttl=60, clock=lambda: now[0])
    server = serve(registry, authorize=access.check)
    url = f"http://127.0.0.1:{server.server_address[1]}"

    def get(path, token=None):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return requests.get(url + path, headers=headers, timeout=5)

    try:
        assert get("/healthz").status_code == 200 and get("/readyz").status_code == 200
        r = get("/metrics")
        assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
        assert get("/metrics", "forged").status_code == 401
        r = get("/metrics", "app-token")
        assert r.status_code == 403 and "system:serviceaccount:shop:web may not get /metrics" in r.text
        assert "fovea_test_scrapes_total 3.0" in get("/metrics", "prom-token").text

        # Answers are cached: within the TTL a scrape asks the API nothing.
        reviews = lambda: [(r.resource, r.verb, r.code) for r in api.requests if r.resource.endswith("reviews")]
        before = len(reviews())
        assert get("/metrics", "prom-token").status_code == 200 and len(reviews()) == before
        assert ("tokenreviews", "create", 201) in reviews() and ("subjectaccessreviews", "create", 201) in reviews()

        # An API outage after the TTL: 503, never a scrape let through unchecked, and nothing cached.
        now[0] = 61
        api.stop()
        assert get("/metrics", "prom-token").status_code == 503
        api.start()
        assert get("/metrics", "prom-token").status_code == 200
    finally:
        server.stop()
        api.stop()


def test_capture_download_reaches_an_agent_that_serves_https(tmp_path, registry):
    """kubectl fovea downloads through the API server's pod proxy; with metrics.tls the agent
    probes itself over HTTPS, and the download goes to it over HTTPS too."""
    from agent.cli.capture import Api, _from_agent
    from tests.k8s_emulator import make_namespace, make_pod

    cert, key = self_signed_cert(tmp_path)
    artifact = tmp_path / "web-debug-n1.pcap"
    artifact.write_bytes(b"\xd4\xc3\xb2\xa1pcap")
    server = serve(registry, tls=TlsFiles(str(cert), str(key)))
    server.captures = lambda k, token: artifact if (k, token) == ("abc-1/web-debug-n1.pcap", "t0k") else None
    api = K8sEmulator().start()
    try:
        api.create(make_namespace("fovea-system"))
        pod = make_pod("fovea-x1", "fovea-system", "n1", "10.0.0.9", labels={"app.kubernetes.io/name": "fovea"})
        pod["spec"]["containers"][0].update(
            ports=[{"name": "metrics", "containerPort": server.server_address[1]}],
            livenessProbe={"httpGet": {"path": "/healthz", "port": "metrics", "scheme": "HTTPS"}})
        api.create(pod)
        client = Api(str(api.write_kubeconfig(tmp_path / "kubeconfig")), None, None)
        stream = _from_agent(client, "fovea-system", "n1", "hostpath://n1/abc-1/web-debug-n1.pcap", "t0k")
        assert b"".join(stream) == artifact.read_bytes()
        assert any(r.name == f"https:fovea-x1:{server.server_address[1]}" for r in api.requests)
    finally:
        api.stop()
        server.stop()
