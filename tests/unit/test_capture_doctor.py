"""`fovea doctor` says what captures need and what is missing."""

from agent.cli import doctor


def test_missing_metadata_tools_are_named_with_their_package(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on it
    pcap, tools = doctor._capture_checks()
    assert pcap.ok and pcap.needed_by == "captures"
    assert not tools.ok
    assert "nft (nftables)" in tools.detail and "conntrack (conntrack)" in tools.detail
    assert "nsenter (util-linux)" in tools.detail
