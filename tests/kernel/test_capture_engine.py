"""The capture engine on the node lab: filters, limits, files, against what was sent."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from scapy.all import rdpcap
from scapy.layers.inet import TCP, UDP

from agent.errors import FoveaError
from capture.engine import CaptureRun, FilterError, Interface, Limits, check_filter, clean_partials
from tests.conftest import REPO, require

pytestmark = pytest.mark.kernel


def tshark_fields(path: Path, *fields: str, display: str = "") -> list[list[str]]:
    argv = ["tshark", "-n", "-r", str(path), "-T", "fields", *[a for f in fields for a in ("-e", f)]]
    if display:
        argv += ["-Y", display]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return [line.split("\t") for line in out.splitlines()]


@pytest.fixture(scope="module")
def tools():
    for tool in ("tshark", "tcpdump"):
        require(subprocess.run(["which", tool], capture_output=True).returncode == 0, f"needs {tool}")


def tcp_segments(lab, ns: str) -> int:
    """Segments the namespace's TCP sent (new and retransmitted) and received."""
    return sum(lab.snmp(ns, "Tcp", f) for f in ("OutSegs", "RetransSegs", "InSegs"))


def echo_conversation(lab, client, server, port: int, messages: int = 20) -> int:
    """A TCP conversation in lock step (each message under one MSS, sent after the previous
    echo came back): every send is one segment, so the kernel's segment counters are the
    packets on the wire. Returns the segments the client side saw."""
    listener = lab.socket(server.netns, socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((server.ipv4, port))
    listener.listen(1)

    def serve():
        conn, _ = listener.accept()
        with conn:
            while data := conn.recv(4096):
                conn.sendall(data)

    t = threading.Thread(target=serve)
    t.start()
    before = tcp_segments(lab, client.netns)
    with lab.socket(client.netns, socket.AF_INET, socket.SOCK_STREAM) as c:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c.connect((server.ipv4, port))
        for i in range(messages):
            c.sendall(b"m%03d" % i * 25)
            got = b""
            while len(got) < 100:
                got += c.recv(100 - len(got))
        c.shutdown(socket.SHUT_WR)
        assert c.recv(1) == b""
    t.join(10)
    listener.close()
    time.sleep(0.3)  # the last ACK
    return tcp_segments(lab, client.netns) - before


SINK_PORT = 9


@pytest.fixture(scope="module", autouse=True)
def sinks(lab):
    """A reader on the bursts' port in each pod: datagrams are consumed, not dropped (a closed
    port would add kernel drops that other tests on this host count)."""
    stop = threading.Event()
    socks, threads = [], []
    for pod in lab.pods[:2]:
        s = lab.socket(pod.netns, socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE: bursts fit
        s.bind((pod.ipv4, SINK_PORT))
        s.settimeout(0.1)
        socks.append(s)

        def drain(s=s):
            while not stop.is_set():
                try:
                    s.recv(65536)
                except (TimeoutError, OSError):
                    pass

        threads.append(threading.Thread(target=drain, daemon=True))
        threads[-1].start()
    yield
    stop.set()
    for t in threads:
        t.join()
    for s in socks:
        s.close()


def udp_burst(lab, src, dst, count: int, size: int = 200, port: int = SINK_PORT) -> None:
    with lab.socket(src.netns, socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _ in range(count):
            s.sendto(b"x" * size, (dst.ipv4, port))


def check_file(result, tmp: Path) -> None:
    """The file under the final name is the complete one the result describes."""
    data = result.path.read_bytes()
    assert len(data) == result.size
    assert hashlib.sha256(data).hexdigest() == result.sha256
    assert not list(tmp.glob("*.partial"))
    assert oct(result.path.stat().st_mode & 0o777) == "0o600"


def test_filter_keeps_exactly_the_packets_of_its_port(lab, tools, tmp_path):
    a, b = lab.pods[0], lab.pods[1]
    port, other = 15001, 15002
    path = tmp_path / "a.pcap"
    run = CaptureRun([Interface(a.host_if, "pod lab/a")], f"tcp port {port}", Limits(duration=60), path)
    run.start()
    sent = echo_conversation(lab, a, b, port)
    other_sent = echo_conversation(lab, a, b, other)
    run.stop()
    result = run.wait(30)

    assert result.stop_reason == "stopped"
    assert result.dropped_packets == 0
    assert other_sent > 40 and sent > 40  # both conversations happened
    assert result.packets == sent
    check_file(result, tmp_path)

    packets = rdpcap(str(path))
    assert len(packets) == sent
    assert all(TCP in p and port in (p[TCP].sport, p[TCP].dport) for p in packets)
    assert result.bytes == sum(len(p) for p in packets)  # snap length not reached: whole frames

    rows = tshark_fields(path, "tcp.srcport", "tcp.dstport", "frame.interface_name",
                         "frame.interface_description")
    assert len(rows) == sent
    assert all(str(port) in r[:2] for r in rows)
    assert {(r[2], r[3]) for r in rows} == {(a.host_if, "pod lab/a")}
    listing = subprocess.run(["tcpdump", "-n", "-r", str(path)], capture_output=True, text=True, check=True)
    assert len(listing.stdout.splitlines()) == sent


def test_two_interfaces_merge_in_time_order(lab, tools, tmp_path):
    a, b = lab.pods[0], lab.pods[1]
    path = tmp_path / "ab.pcap"
    ifaces = [Interface(a.host_if, "pod lab/a"), Interface(b.host_if, "pod lab/b")]
    run = CaptureRun(ifaces, "udp port 9", Limits(duration=60), path)
    run.start()
    udp_burst(lab, a, b, 30)
    time.sleep(0.3)
    run.stop()
    result = run.wait(30)
    # every datagram crosses a's interface and then b's
    assert result.packets == 60
    rows = tshark_fields(path, "frame.time_epoch", "frame.interface_name")
    assert [r[1] for r in rows].count(a.host_if) == 30
    assert [r[1] for r in rows].count(b.host_if) == 30
    stamps = [float(r[0]) for r in rows]
    assert stamps == sorted(stamps)


def test_max_packets_stops_at_exactly_that_many(lab, tools, tmp_path):
    a, b = lab.pods[0], lab.pods[1]
    path = tmp_path / "n.pcap"
    run = CaptureRun([Interface(a.host_if)], None, Limits(duration=60, max_packets=100), path)
    run.start()
    udp_burst(lab, a, b, 400)
    result = run.wait(30)
    assert result is not None and result.stop_reason == "maxPackets"
    assert result.packets == 100
    assert len(rdpcap(str(path))) == 100
    assert len(tshark_fields(path, "frame.number")) == 100
    check_file(result, tmp_path)


def test_snap_length_cuts_packets_but_bytes_are_wire_bytes(lab, tools, tmp_path):
    a, b = lab.pods[0], lab.pods[1]
    path = tmp_path / "s.pcap"
    run = CaptureRun([Interface(a.host_if)], "udp", Limits(duration=60, max_packets=10, snap_length=96), path)
    run.start()
    udp_burst(lab, a, b, 10, size=300)
    result = run.wait(30)
    frame = 14 + 20 + 8 + 300
    assert result.packets == 10 and result.bytes == 10 * frame
    rows = tshark_fields(path, "frame.cap_len", "frame.len")
    assert rows == [["96", str(frame)]] * 10


def test_impossible_limits_are_refused_and_leave_nothing(lab, tmp_path):
    iface = [Interface(lab.pods[0].host_if, "pod lab/a")]
    for limits in (Limits(duration=0), Limits(duration=5, max_packets=0), Limits(duration=5, max_bytes=-1)):
        with pytest.raises(FoveaError, match="must be positive"):
            CaptureRun(iface, None, limits, tmp_path / "x.pcap")
    run = CaptureRun(iface, None, Limits(duration=5, max_bytes=64), tmp_path / "x.pcap")
    with pytest.raises(FoveaError, match="smaller than the file's header"):
        run.start()
    assert list(tmp_path.iterdir()) == []


def test_unwritable_directory_is_an_error_and_leaves_nothing(lab, tmp_path):
    run = CaptureRun([Interface(lab.pods[0].host_if)], None, Limits(duration=5), tmp_path / "no" / "x.pcap")
    with pytest.raises(FoveaError, match="cannot write"):
        run.start()
    assert list(tmp_path.iterdir()) == []


def test_max_bytes_keeps_the_file_within_the_limit(lab, tools, tmp_path):
    a, b = lab.pods[0], lab.pods[1]
    path = tmp_path / "b.pcap"
    limit = 20_000
    run = CaptureRun([Interface(a.host_if)], "udp", Limits(duration=60, max_bytes=limit), path)
    run.start()
    udp_burst(lab, a, b, 400, size=300)
    result = run.wait(30)
    assert result is not None and result.stop_reason == "maxBytes"
    check_file(result, tmp_path)
    frame = 14 + 20 + 8 + 300
    block = 32 + frame + (-frame % 4)
    assert limit - block < result.size <= limit  # filled up to the last packet that fits
    assert len(tshark_fields(path, "frame.number")) == result.packets


def test_duration_stops_the_capture_and_bounds_the_packets(lab, tools, tmp_path):
    a, b = lab.pods[0], lab.pods[1]
    path = tmp_path / "d.pcap"
    run = CaptureRun([Interface(a.host_if)], "udp", Limits(duration=1.0), path)
    started = time.time()
    run.start()
    window_end = time.time() + 1.0  # the window starts inside start()
    stop = threading.Event()

    def traffic():
        while not stop.is_set():
            udp_burst(lab, a, b, 10)
            time.sleep(0.02)

    t = threading.Thread(target=traffic)
    t.start()
    try:
        result = run.wait(60)
    finally:
        stop.set()
        t.join()
    assert result is not None and result.stop_reason == "duration"
    assert time.time() - started >= 1.0
    assert result.packets > 0
    stamps = [float(r[0]) for r in tshark_fields(path, "frame.time_epoch")]
    assert len(stamps) == result.packets
    assert started <= min(stamps) and max(stamps) <= window_end  # nothing past the window
    check_file(result, tmp_path)


def test_bad_filter_names_libpcaps_complaint_and_leaves_nothing(lab, tmp_path):
    with pytest.raises(FilterError, match="syntax error"):
        check_filter("tcp port")
    check_filter("tcp port 443 and not (src net 10.0.0.0/8)")
    run = CaptureRun([Interface(lab.pods[0].host_if)], "tcp port 99999", Limits(duration=5), tmp_path / "x.pcap")
    with pytest.raises(FilterError, match="port 99999"):
        run.start()
    assert list(tmp_path.iterdir()) == []


def test_missing_interface_is_an_error_and_leaves_nothing(lab, tmp_path):
    run = CaptureRun([Interface(lab.pods[0].host_if), Interface(lab.prefix + "none")], None,
                     Limits(duration=5), tmp_path / "x.pcap")
    with pytest.raises(FoveaError, match=f"cannot capture on {lab.prefix}none"):
        run.start()
    assert list(tmp_path.iterdir()) == []


def test_a_deleted_pod_ends_only_its_part(lab, tools, tmp_path):
    a = lab.pods[0]
    gone = lab.add_pod("gone", 7)
    try:
        run = CaptureRun([Interface(gone.host_if, "pod lab/gone"), Interface(a.host_if, "pod lab/a")], "udp",
                         Limits(duration=60), tmp_path / "g.pcap")
        run.start()
        udp_burst(lab, gone, a, 10, size=100)  # crosses both interfaces: 20 packets
        time.sleep(0.3)
        lab.remove_pod(gone)
        udp_burst(lab, a, lab.pods[1], 5, size=100)  # the capture goes on on a's interface
        time.sleep(0.3)
        run.stop()
        result = run.wait(30)
    finally:
        if gone in lab.pods:
            lab.remove_pod(gone)
    assert result.stop_reason == "stopped"
    assert f"capture on {gone.host_if} ended" in result.message
    assert result.packets == 25
    rows = tshark_fields(result.path, "frame.interface_name")
    assert [r[0] for r in rows].count(gone.host_if) == 10


def test_all_interfaces_gone_is_an_error_that_keeps_the_packets(lab, tools, tmp_path):
    gone = lab.add_pod("gone2", 8)
    try:
        run = CaptureRun([Interface(gone.host_if)], "udp", Limits(duration=60), tmp_path / "e.pcap")
        run.start()
        udp_burst(lab, gone, lab.pods[0], 10, size=100)
        time.sleep(0.3)
        lab.remove_pod(gone)
        result = run.wait(30)
    finally:
        if gone in lab.pods:
            lab.remove_pod(gone)
    assert result is not None and result.stop_reason == "error"
    assert "disappeared" in result.message or "went down" in result.message
    assert result.packets == 10
    check_file(result, tmp_path)


PAUSED = """
import json, sys
from pathlib import Path
import capture.engine
from capture.engine import CaptureRun, Interface, Limits
capture.engine.RING_BUFFER_BYTES = 256 << 10
run = CaptureRun([Interface(sys.argv[1])], None, Limits(duration=120), Path(sys.argv[2]))
run.start()
print("capturing", flush=True)
sys.stdin.readline()
run.stop()
r = run.wait()
print(json.dumps({"packets": r.packets, "dropped": r.dropped_packets, "message": r.message}), flush=True)
"""


def veth_packets(ifname: str) -> int:
    stats = Path(f"/sys/class/net/{ifname}/statistics")
    return int((stats / "rx_packets").read_text()) + int((stats / "tx_packets").read_text())


def test_kernel_drops_are_counted_exactly(lab, tmp_path):
    """A capture that cannot read (stopped with SIGSTOP) while more than its ring arrives:
    the packets missing from the file are exactly the drops it reports."""
    a, b = lab.pods[0], lab.pods[1]
    proc = subprocess.Popen([sys.executable, "-c", PAUSED, a.host_if, str(tmp_path / "p.pcap")], cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "capturing"
        before = veth_packets(a.host_if)
        os.kill(proc.pid, signal.SIGSTOP)
        udp_burst(lab, a, b, 3000, size=1000)  # ~3 MB into a 256 KiB ring
        time.sleep(0.3)
        os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.3)
        on_wire = veth_packets(a.host_if) - before
        proc.stdin.write("stop\n")
        proc.stdin.flush()
        result = json.loads(proc.stdout.readline())
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait(30)
    assert result["dropped"] > 0
    assert result["packets"] + result["dropped"] == on_wire
    assert f"dropped {result['dropped']} packets" in result["message"]


KILLED = """
import sys, time
from pathlib import Path
from capture.engine import CaptureRun, Interface, Limits
run = CaptureRun([Interface(sys.argv[1])], None, Limits(duration=120), Path(sys.argv[2]))
run.start()
print("capturing", flush=True)
time.sleep(120)
"""


def test_kill_never_leaves_a_file_under_the_final_name(lab, tmp_path):
    a, b = lab.pods[0], lab.pods[1]
    path = tmp_path / "k.pcap"
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(KILLED), a.host_if, str(path)],
                            cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "capturing"
        udp_burst(lab, a, b, 200)
        time.sleep(0.3)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert not path.exists()
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert leftovers and all(n.endswith(".partial") for n in leftovers)
    assert sorted(p.name for p in clean_partials(tmp_path)) == leftovers
    assert list(tmp_path.iterdir()) == []
