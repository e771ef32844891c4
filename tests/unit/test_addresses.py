"""agent/addresses.py: addresses between kernel map bytes and text."""

from __future__ import annotations

import pytest

from agent.addresses import canonical_ip, ip_packed, ip_text


@pytest.mark.parametrize("family, raw, text", [
    (4, bytes([10, 0, 0, 1]) + bytes(12), "10.0.0.1"),  # maps keep IPv4 in the first 4 of 16 bytes
    (6, bytes.fromhex("20010db8000000000000000000000001"), "2001:db8::1"),
    (0, bytes(16), ""),
])
def test_text_from_map_bytes(family, raw, text):
    assert ip_text(family, raw) == text


def test_ctypes_arrays_are_read_as_bytes():
    import ctypes as ct

    raw = (ct.c_uint8 * 16)(192, 168, 1, 2)
    assert ip_text(4, raw) == "192.168.1.2"


@pytest.mark.parametrize("text", ["10.0.0.1", "2001:db8::1", "fd00::a:b"])
def test_there_and_back(text):
    family, packed = ip_packed(text)
    assert (family, len(packed)) == ((4, 4) if "." in text else (6, 16))
    assert ip_text(family, packed.ljust(16, b"\0")) == text


def test_not_an_address():
    with pytest.raises(ValueError):
        ip_packed("pod-a")


@pytest.mark.parametrize("ip, canonical", [
    ("10.0.0.1", "10.0.0.1"), ("::ffff:10.0.0.1", "10.0.0.1"), ("FD00:0::1", "fd00::1"), ("junk", "junk")])
def test_canonical_ip(ip, canonical):
    assert canonical_ip(ip) == canonical
