"""Conntrack entries in a bundle are only those of the target pods' addresses."""

from capture import metadata

TABLE = """\
tcp      6 431999 ESTABLISHED src=10.0.0.1 dst=10.0.0.9 sport=1 dport=80 src=10.0.0.9 dst=10.0.0.1 sport=80 dport=1 [ASSURED] mark=0 use=1
tcp      6 431999 ESTABLISHED src=10.0.0.10 dst=10.0.0.9 sport=2 dport=80 src=10.0.0.9 dst=10.0.0.10 sport=80 dport=2 [ASSURED] mark=0 use=1
udp      17 29 src=10.0.0.7 dst=10.96.0.10 sport=3 dport=53 src=10.0.0.1 dst=10.0.0.7 sport=53 dport=3 mark=0 use=1
"""


def test_only_entries_with_the_pods_addresses(monkeypatch):
    monkeypatch.setattr(metadata, "_command", lambda netns, *argv: TABLE if "ipv4" in argv else "")
    lines = metadata._conntrack("/proc/1/ns/net", ("10.0.0.1",)).splitlines()
    assert [ln.split("sport=")[1].split()[0] for ln in lines] == ["1", "3"]  # not 10.0.0.10's; DNAT reply kept
    assert metadata._conntrack(None, ()) == ""
    assert len(metadata._conntrack(None, None).splitlines()) == 3
