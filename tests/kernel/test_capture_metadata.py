"""The metadata bundle holds the target pods' network state (and the node's only when node-wide)."""

from __future__ import annotations

import hashlib
import json
import platform
import socket
import tarfile
import threading
import time

import pytest

from agent.nsenter import in_netns
from capture.engine import CaptureRun, Interface, Limits
from capture.metadata import PodNetns, collect_bundle
from tests.conftest import require

pytestmark = pytest.mark.kernel
PORT = 15080


@pytest.fixture(scope="module")
def pod_state(lab):
    """Pod a has its own iptables rule (so its namespace tracks connections) and an open
    connection to pod b while the bundle is collected."""
    import shutil

    for tool in ("nsenter", "iptables-save", "nft", "conntrack", "ss"):
        require(shutil.which(tool) is not None, f"needs {tool}")
    a, b = lab.pods[0], lab.pods[1]
    mark = f"fovea-test-{lab.prefix}"
    lab.run(a.netns, "iptables", "-A", "OUTPUT", "-p", "tcp", "--dport", str(PORT), "-m", "conntrack",
            "--ctstate", "NEW,ESTABLISHED", "-m", "comment", "--comment", mark, "-j", "ACCEPT")
    listener = lab.socket(b.netns, socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((b.ipv4, PORT))
    listener.listen(1)
    accepted = []
    t = threading.Thread(target=lambda: accepted.append(listener.accept()[0]))
    t.start()
    client = lab.socket(a.netns, socket.AF_INET, socket.SOCK_STREAM)
    client.connect((b.ipv4, PORT))
    t.join(10)
    try:
        yield mark
    finally:
        client.close()
        for conn in accepted:
            conn.close()
        listener.close()
        lab.run(a.netns, "iptables", "-D", "OUTPUT", "-p", "tcp", "--dport", str(PORT), "-m", "conntrack",
                "--ctstate", "NEW,ESTABLISHED", "-m", "comment", "--comment", mark, "-j", "ACCEPT", check=False)


@pytest.fixture(scope="module")
def capture(lab, tmp_path_factory):
    a, b = lab.pods[0], lab.pods[1]
    path = tmp_path_factory.mktemp("bundle") / "web-debug-node1.pcap"
    run = CaptureRun([Interface(a.host_if, "pod lab/a")], "icmp", Limits(duration=30), path)
    run.start()
    lab.run(a.netns, "ping", "-c", "3", "-i", "0.2", b.ipv4)
    time.sleep(0.2)
    run.stop()
    result = run.wait(30)
    assert result.packets == 6
    return result


SPEC = {"target": {"podNames": ["a"]}, "filter": "icmp", "duration": "30s", "includeMetadata": True,
        "output": {"hostPath": {}}}


def read(bundle) -> dict[str, bytes]:
    with tarfile.open(bundle) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def test_pod_bundle_holds_the_pods_state_and_nothing_of_the_host(lab, pod_state, capture, tmp_path):
    a, b = lab.pods[0], lab.pods[1]
    pod = PodNetns("lab", "a", f"/run/netns/{a.netns}", (a.ipv4, a.ipv6))
    bundle = collect_bundle(tmp_path / "web-debug-node1.tar.gz", capture.path, SPEC, capture, [pod],
                            node_wide=False, versions={"agent": "0.1.0"})
    assert bundle.exists() and not list(tmp_path.glob("*.partial"))
    files = read(bundle)
    top = "web-debug-node1"
    pod_dir = f"{top}/pods/lab_a"
    expected = {f"{pod_dir}/{n}" for n in ("links.json", "addresses.json", "routes.json", "rules.json",
                                            "neighbours.json", "iptables.txt", "ip6tables.txt",
                                            "nftables.txt", "conntrack.txt", "sockets.txt")}
    assert set(files) == expected | {f"{top}/web-debug-node1.pcap", f"{top}/capture.json"}

    assert hashlib.sha256(files[f"{top}/web-debug-node1.pcap"]).hexdigest() == capture.sha256
    info = json.loads(files[f"{top}/capture.json"])
    assert info["spec"] == SPEC and info["nodeWide"] is False
    assert info["result"]["packets"] == 6 and info["result"]["sha256"] == capture.sha256
    assert info["versions"]["agent"] == "0.1.0" and info["versions"]["kernel"] == platform.release()
    assert info["collected"]["pods/lab_a"]["errors"] == {}

    addresses = files[f"{pod_dir}/addresses.json"].decode()
    assert a.ipv4 in addresses and a.ipv6 in addresses
    assert a.gateway4 in files[f"{pod_dir}/routes.json"].decode()
    assert a.gateway4 in files[f"{pod_dir}/neighbours.json"].decode()
    assert pod_state in files[f"{pod_dir}/iptables.txt"].decode()
    assert f"tcp dport {PORT}" in files[f"{pod_dir}/nftables.txt"].decode()
    conntrack = files[f"{pod_dir}/conntrack.txt"].decode()
    assert any(f"src={a.ipv4}" in ln and f"dport={PORT}" in ln for ln in conntrack.splitlines())
    assert "TCP:" in files[f"{pod_dir}/sockets.txt"].decode()

    # nothing of the host: none of its interfaces or other pods' addresses
    everything = b"".join(v for k, v in files.items() if not k.endswith(".pcap")).decode()
    for host_only in (a.host_if, b.host_if, lab.uplink, lab.world.ipv4, lab.world.gateway4):
        assert host_only not in everything
    assert not any("/node/" in name for name in files)


def test_node_wide_bundle_adds_the_node(lab, pod_state, capture, tmp_path):
    a = lab.pods[0]
    pod = PodNetns("lab", "a", f"/run/netns/{a.netns}", (a.ipv4,))
    done = []

    def collect():  # from a thread that is itself inside the pod's namespace
        with in_netns(a.netns):
            done.append(collect_bundle(tmp_path / "n.tar.gz", capture.path, SPEC, capture, [pod],
                                       node_wide=True, versions={"agent": "0.1.0"}))

    t = threading.Thread(target=collect)
    t.start()
    t.join()
    bundle = done[0]
    files = read(bundle)
    assert a.host_if in files["n/node/links.json"].decode()
    assert a.gateway4 in files["n/node/addresses.json"].decode()
    assert a.ipv4 in files["n/node/neighbours.json"].decode()
    assert {"n/node/iptables.txt", "n/node/nftables.txt", "n/node/conntrack.txt", "n/node/sockets.txt",
            "n/pods/lab_a/addresses.json"} <= set(files)
    # host conntrack lines, if any, only for the target pods' addresses
    assert all(a.ipv4 in ln for ln in files["n/node/conntrack.txt"].decode().splitlines())
    info = json.loads(files["n/capture.json"])
    assert info["nodeWide"] is True and set(info["collected"]) == {"node", "pods/lab_a"}


def test_unreachable_namespace_is_noted_not_fatal(capture, tmp_path):
    pod = PodNetns("lab", "gone", "/run/netns/fovea-no-such-netns", ("10.255.255.1",))
    files = read(collect_bundle(tmp_path / "g.tar.gz", capture.path, SPEC, capture, [pod],
                                node_wide=False, versions={}))
    info = json.loads(files["g/capture.json"])
    errors = info["collected"]["pods/lab_gone"]["errors"]
    assert "netlink" in errors and "iptables.txt" in errors
    assert "g/web-debug-node1.pcap" in files
