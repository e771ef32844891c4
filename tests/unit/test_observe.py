"""The flow stream: records named by the attribution stage, filters, the client over a real socket."""

from __future__ import annotations

import json
import threading
import time

import pytest

from agent.cli import fovea as cli
from agent.config import Config, ObserveConfig
from agent.attribution import Attribution
from agent.events import DropEvent, EventHub
from agent.k8s.static import StaticPods
from agent.cli.observe import connect, format_human, stream
from agent.observe import ObserveServer, matches, record_dict
from tests.unit.test_traces import dns, flow, http

NOW = time.time()


@pytest.fixture
def server(tmp_path):
    f = tmp_path / "pods.yaml"
    f.write_text("pods:\n"
                 "- {ip: 10.1.0.5, namespace: shop, pod: web-1, workloadKind: Deployment, workloadName: web}\n"
                 "- {ip: 10.1.0.9, namespace: data, pod: db-0, workloadKind: StatefulSet, workloadName: db}\n")
    hub = EventHub()
    cfg = Config(observe=ObserveConfig(socket=str(tmp_path / "o.sock"), port=0))
    srv = ObserveServer(cfg, hub, Attribution(StaticPods.load(str(f)), "n1"), "n1")
    hub.publish(flow())  # shop/web-1:40001 -> data/db-0:5432, tcp
    hub.publish(flow(flow_id=2, transport="udp", source="10.1.0.5", source_port=5000, destination="8.8.8.8",
                     destination_port=53, tcp_flags=0))
    hub.publish(DropEvent(time=NOW, reason="NETFILTER_DROP", transport="tcp", family=4, source="10.1.0.5",
                          source_port=40002, destination="10.1.0.9", destination_port=5432, packets=1, bytes=60))
    hub.publish(dns(client="10.1.0.5", server="10.1.0.9", rcode="NXDOMAIN", name="nope.", qtype="AAAA"))
    deadline = time.monotonic() + 5
    while len(srv.recent) < 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    yield srv, hub, cfg.observe.socket
    srv.close()


def run_cli(capsys, *args) -> list[str]:
    assert cli.main(["observe", *args]) == 0
    return capsys.readouterr().out.splitlines()


def test_last_records_with_names_and_json(server, capsys):
    _, _, sock = server
    lines = [json.loads(x) for x in run_cli(capsys, "--socket", sock, "-o", "json")]
    assert [d["type"] for d in lines] == ["flow", "flow", "drop", "dns"]
    f = lines[0]
    assert f["source"] == {"address": "10.1.0.5", "port": 40001, "namespace": "shop", "pod": "web-1",
                           "workload": "web"}
    assert f["destination"]["pod"] == "db-0" and f["bytes"] == 5000 and f["tcp_flags"] == "FIN|SYN|PSH|ACK"
    assert lines[1]["destination"] == {"address": "8.8.8.8", "port": 53, "workload": "external"}
    assert lines[2]["reason"] == "NETFILTER_DROP" and lines[2]["verdict"] == "dropped"
    assert lines[3]["rcode"] == "NXDOMAIN" and lines[3]["name"] == "nope."


@pytest.mark.parametrize("args, types", [
    (["--namespace", "data"], ["flow", "drop", "dns"]),
    (["--pod", "shop/web-1"], ["flow", "flow", "drop", "dns"]),
    (["--pod", "other/web-1"], []),
    (["--protocol", "udp"], ["flow", "dns"]),
    (["--port", "5432"], ["flow", "drop"]),
    (["--verdict", "dropped"], ["drop"]),
    (["--dns"], ["dns"]),
    (["--last", "1"], ["dns"]),
])
def test_filters(server, capsys, args, types):
    _, _, sock = server
    lines = run_cli(capsys, "--socket", server[2], "-o", "json", *args)
    assert [json.loads(x)["type"] for x in lines] == types


def test_human_output_is_one_line_per_record(server, capsys):
    lines = run_cli(capsys, "--socket", server[2])
    assert len(lines) == 4
    assert "shop/web-1:40001 -> data/db-0:5432" in lines[0] and "fin" in lines[0]
    assert "DROPPED NETFILTER_DROP" in lines[2]
    assert "AAAA nope. NXDOMAIN 4.2 ms" in lines[3]


def test_http_requests_in_the_stream_with_the_other_filters(server, capsys):
    srv, hub, sock = server
    hub.publish(http(method="POST", status_code=201, duration=0.0123))  # shop/web-1:40001 -> data/db-0:5432
    hub.publish(http(client_port=40009, method="OTHER", status_code=None, duration=None, observer="destination"))
    deadline = time.monotonic() + 5
    while len(srv.recent) < 6 and time.monotonic() < deadline:
        time.sleep(0.02)
    ok, none = [json.loads(x) for x in run_cli(capsys, "--socket", sock, "-o", "json", "--http")]
    assert ok == {"type": "http", "time": ok["time"], "node": "n1", "verdict": "forwarded", "protocol": "tcp",
                  "source": {"address": "10.1.0.5", "port": 40001, "namespace": "shop", "pod": "web-1",
                             "workload": "web"},
                  "destination": {"address": "10.1.0.9", "port": 5432, "namespace": "data", "pod": "db-0",
                                  "workload": "db"},
                  "method": "POST", "path": None, "status_code": 201, "latency": 0.0123, "observer": "source"}
    assert (none["method"], none["status_code"], none["latency"]) == ("OTHER", None, None)
    human = run_cli(capsys, "--socket", sock, "--http")
    assert human[0].endswith("HTTP  tcp  shop/web-1:40001 -> data/db-0:5432  POST 201 12.3 ms")
    assert human[1].endswith("HTTP  tcp  shop/web-1:40009 -> data/db-0:5432  OTHER NO RESPONSE")
    with_path = record_dict(http(path="/cart/items", status_code=404, duration=0.002))
    assert with_path["path"] == "/cart/items" and format_human(with_path).endswith("GET /cart/items 404 2.0 ms")
    types = lambda *args: [json.loads(x)["type"] for x in run_cli(capsys, "--socket", sock, "-o", "json", *args)]  # noqa: E731
    assert types("--http", "--dns") == ["dns", "http", "http"]  # either
    assert types("--http", "--port", "40009") == ["http"]
    assert types("--http", "--pod", "data/db-0", "--protocol", "tcp", "--verdict", "forwarded") == ["http", "http"]
    assert types("--http", "--namespace", "elsewhere") == types("--http", "--protocol", "udp") == []
    assert types("--http", "--verdict", "dropped") == []
    assert types("--port", "5432") == ["flow", "drop", "http", "http"]


def test_follow_streams_new_records(server):
    srv, hub, sock = server
    got = []
    conn = connect(None, sock)

    def read():
        for d in stream(conn, {"follow": True, "filter": {"dns": True}}):
            got.append(d)
            if len(got) == 2:
                return

    t = threading.Thread(target=read, daemon=True)
    t.start()
    deadline = time.monotonic() + 5
    while not srv.followers and time.monotonic() < deadline:
        time.sleep(0.02)
    hub.publish(flow(flow_id=9))
    hub.publish(dns(id=1))
    hub.publish(dns(id=2, rcode=None, duration=None))
    t.join(5)
    conn.close()
    assert [d["id"] for d in got] == [1, 2]
    assert format_human(got[1]).endswith("UNANSWERED no answer")


def test_a_live_socket_is_never_taken_over(server, tmp_path):
    _, hub, sock = server
    other = ObserveServer(Config(observe=ObserveConfig(socket=sock, port=0)), hub)
    try:
        assert other.errors and "another agent" in other.errors[0]
    finally:
        other.close()
    assert connect(None, sock)  # the first one still serves


def test_unreachable_stream_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["observe", "--socket", str(tmp_path / "none.sock")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fovea: error: cannot reach the flow stream at") and "port-forward" in err


@pytest.mark.parametrize("outcome, verdict", [
    ("refused", "refused"), ("timeout", "timeout"), ("established", "forwarded"), ("", "forwarded"),
])
def test_a_connection_attempt_that_failed_has_its_own_verdict(outcome, verdict):
    d = record_dict(flow(connection=outcome))
    assert d["verdict"] == verdict and d["connection"] == (outcome or None)
    assert matches(d, {"verdict": "refused"}) == (verdict == "refused")
    assert format_human(d).endswith(f"  {verdict.upper()}") == (verdict != "forwarded")


@pytest.mark.parametrize("verdict", ["refused", "timeout"])
def test_the_cli_asks_for_failed_connections(server, capsys, verdict):
    srv, hub, sock = server
    hub.publish(flow(flow_id=5, connection=verdict, source_port=40005))
    deadline = time.monotonic() + 5
    while len(srv.recent) < 5 and time.monotonic() < deadline:
        time.sleep(0.02)
    [line] = run_cli(capsys, "--socket", sock, "-o", "json", "--verdict", verdict)
    assert json.loads(line)["source"]["port"] == 40005


def test_matches_needs_every_filter():
    d = {"type": "flow", "protocol": "tcp", "verdict": "forwarded",
         "source": {"namespace": "a", "pod": "p", "port": 1}, "destination": {"port": 2}}
    assert matches(d, {})
    assert matches(d, {"namespace": "a", "port": 2, "protocol": "TCP"})
    assert not matches(d, {"namespace": "a", "port": 3})
