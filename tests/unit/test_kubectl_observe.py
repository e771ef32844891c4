"""`kubectl fovea observe --node N`: the agent pod found through the API emulator, a real
port-forward process (a stand-in `kubectl` first on PATH that relays to a real flow stream
server), the client's output, and the port-forward stopped at the end, Ctrl-C included."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.config import Config, ObserveConfig
from agent.errors import FoveaError
from agent.events import EventHub
from agent.cli.capture import Api, agent_pod
from agent.cli.kubectl import OBSERVE_PORT, free_port, kubectl_main, port_forward_command
from tests.k8s_emulator import K8sEmulator, make_namespace, make_pod
from tests.unit.test_traces import dns, flow

# `kubectl port-forward` as far as this test needs: listen on the local port, carry each
# connection to the flow stream on $FAKE_AGENT_PORT, log like kubectl when that is refused.
FAKE_KUBECTL = r'''
import json, os, select, socket, sys, threading
with open(os.environ["FAKE_KUBECTL_LOG"], "a") as f:
    f.write(json.dumps({"argv": sys.argv[1:], "pid": os.getpid()}) + "\n")
if os.environ.get("FAKE_KUBECTL_FAIL"):
    print(os.environ["FAKE_KUBECTL_FAIL"], file=sys.stderr)
    sys.exit(1)
local, remote = sys.argv[sys.argv.index("port-forward") + 4].split(":")
srv = socket.create_server(("127.0.0.1", int(local)))
print(f"Forwarding from 127.0.0.1:{local} -> {remote}", flush=True)

def relay(conn, pod):
    with conn, pod:
        while True:
            for s in select.select([conn, pod], [], [])[0]:
                data = s.recv(65536)
                if not data:
                    return
                (pod if s is conn else conn).sendall(data)

while True:
    conn, _ = srv.accept()
    try:
        pod = socket.create_connection(("127.0.0.1", int(os.environ["FAKE_AGENT_PORT"])))
    except OSError as e:
        print(f"E1122 portforward.go:413] an error occurred forwarding {local} -> {remote}: error forwarding "
              f"port {remote} to pod 1234, uid : dial tcp4 127.0.0.1:{remote}: connect: connection refused",
              file=sys.stderr, flush=True)
        conn.close()
        continue
    threading.Thread(target=relay, args=(conn, pod), daemon=True).start()
'''


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    """The API emulator with agent pods, a flow stream with 3 records, and the stand-in kubectl on PATH."""
    from agent.observe import ObserveServer

    api = K8sEmulator().start()
    api.create(make_namespace("fovea-system"))
    agent = {"app.kubernetes.io/name": "fovea"}
    api.create(make_pod("fovea-old", "fovea-system", "node-a", labels=agent, phase="Failed"))
    api.create(make_pod("fovea-abcde", "fovea-system", "node-a", labels=agent))
    api.create(make_pod("fovea-fghij", "fovea-system", "node-b", labels=agent))
    api.create(make_pod("web-1", "fovea-system", "node-c", labels={"app": "web"}))
    api.kubeconfig = str(api.write_kubeconfig(tmp_path / "kubeconfig", context="dev"))
    hub = EventHub()
    port = free_port()
    srv = ObserveServer(Config(observe=ObserveConfig(socket="", port=port)), hub, node="node-a")
    hub.publish(flow())
    hub.publish(flow(flow_id=2, transport="udp", source="10.1.0.5", source_port=5000, destination="10.1.0.9",
                     destination_port=53, tcp_flags=0))
    hub.publish(dns(client="10.1.0.5", server="10.1.0.9", rcode="NXDOMAIN", name="nope.", qtype="AAAA"))
    deadline = time.monotonic() + 5
    while len(srv.recent) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    kubectl = bin_dir / "kubectl"
    kubectl.write_text(f"#!{sys.executable}\n{FAKE_KUBECTL}")
    kubectl.chmod(0o755)
    log = tmp_path / "kubectl.log"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_KUBECTL_LOG", str(log))
    monkeypatch.setenv("FAKE_AGENT_PORT", str(port))
    api.kubectl_runs = lambda: [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
    api.hub = hub
    yield api
    for run in api.kubectl_runs():  # none should be left; never leave one behind if one is
        if alive(run["pid"]):
            os.kill(run["pid"], signal.SIGKILL)
    srv.close()
    api.stop()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def observe(api, capsys, *argv):
    code = kubectl_main(["observe", "--kubeconfig", api.kubeconfig, "--context", "dev", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_the_port_forward_command_line():
    assert port_forward_command("kubectl", "fovea-system", "fovea-abcde", 40123) == [
        "kubectl", "port-forward", "-n", "fovea-system", "pod/fovea-abcde", f"40123:{OBSERVE_PORT}",
        "--address", "127.0.0.1"]
    assert port_forward_command("/usr/bin/kubectl", "ns", "p", 1, kubeconfig="kc", context="dev")[:5] == [
        "/usr/bin/kubectl", "--kubeconfig", "kc", "--context", "dev"]


def test_the_agent_pod_of_a_node(cluster):
    api = Api(cluster.kubeconfig, "dev", None)
    assert agent_pod(api, "fovea-system", "node-a").metadata.name == "fovea-abcde"  # the running one
    assert agent_pod(api, "fovea-system", "node-b").metadata.name == "fovea-fghij"
    for ns, node in (("fovea-system", "node-c"), ("fovea-system", "node-z"), ("other", "node-a")):
        with pytest.raises(FoveaError, match=f"no Fovea agent pod on node {node} in namespace {ns}"):
            agent_pod(api, ns, node)


def test_observe_through_a_real_port_forward(cluster, capsys):
    code, out, err = observe(cluster, capsys, "--node", "node-a", "-o", "json", "--protocol", "udp")
    assert code == 0, err
    records = [json.loads(x) for x in out.splitlines()]
    assert [(r["type"], r["node"]) for r in records] == [("flow", "node-a"), ("dns", "node-a")]
    assert records[1]["rcode"] == "NXDOMAIN"
    [run] = cluster.kubectl_runs()
    local = int(run["argv"][-3].split(":")[0])
    assert run["argv"] == ["--kubeconfig", cluster.kubeconfig, "--context", "dev", "port-forward", "-n",
                           "fovea-system", "pod/fovea-abcde", f"{local}:{OBSERVE_PORT}", "--address", "127.0.0.1"]
    assert not alive(run["pid"])  # the port-forward is stopped

    code, out, err = observe(cluster, capsys, "--node", "node-a", "--dns")  # human output, another filter
    assert code == 0 and len(out.splitlines()) == 1 and "AAAA nope. NXDOMAIN" in out, err


def test_errors_are_one_line(cluster, capsys, tmp_path, monkeypatch):
    code, _, err = observe(cluster, capsys, "--node", "node-z")
    assert code == 1 and "no Fovea agent pod on node node-z in namespace fovea-system" in err
    assert err.count("\n") == 1 and not cluster.kubectl_runs()

    monkeypatch.setenv("FAKE_KUBECTL_FAIL", 'error: pods "fovea-abcde" is forbidden: cannot create pods/portforward')
    code, _, err = observe(cluster, capsys, "--node", "node-a")
    assert code == 1 and err.count("\n") == 1
    assert 'kubectl port-forward failed: error: pods "fovea-abcde" is forbidden' in err
    monkeypatch.delenv("FAKE_KUBECTL_FAIL")

    monkeypatch.setenv("FAKE_AGENT_PORT", str(free_port()))  # nothing serves the stream there
    code, _, err = observe(cluster, capsys, "--node", "node-a")
    assert code == 1 and err.count("\n") == 1
    assert "port-forward to fovea-system/fovea-abcde failed" in err and "connection refused" in err
    assert not any(alive(r["pid"]) for r in cluster.kubectl_runs())

    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    code, _, err = observe(cluster, capsys, "--node", "node-a")
    assert code == 1 and err == "error: kubectl is not on PATH: install kubectl: kubectl fovea observe runs " \
                                "kubectl port-forward\n"


def test_ctrl_c_stops_the_port_forward(cluster):
    """--follow until Ctrl-C: the plugin exits 130 and its kubectl port-forward is gone."""
    cmd = [sys.executable, "-c", "import sys; from agent.cli.kubectl import kubectl_main; sys.exit(kubectl_main())",
           "observe", "--kubeconfig", cluster.kubeconfig, "--node", "node-a", "--follow", "--dns"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).parents[2])
    try:
        deadline = time.monotonic() + 30
        while not cluster.kubectl_runs() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        # Keep publishing until the follower is there and its first line arrives.
        line = ""
        for i in range(200):
            cluster.hub.publish(dns(id=1000 + i, name="live."))
            if select.select([proc.stdout], [], [], 0.1)[0]:
                line = proc.stdout.readline()
                break
        assert "live." in line, proc.stderr.read() if proc.poll() is not None else line
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    [run] = cluster.kubectl_runs()
    assert not alive(run["pid"])
