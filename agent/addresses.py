"""IP addresses as kernel maps hold them (a family, 4 or 6, and the address bytes) and as text."""

from __future__ import annotations

import ipaddress


def ip_text(family: int, raw) -> str:
    """'10.0.0.1' or '2001:db8::1' from a map's family and address bytes; '' for another family."""
    raw = bytes(raw)
    if family == 4:
        return str(ipaddress.IPv4Address(raw[:4]))
    if family == 6:
        return str(ipaddress.IPv6Address(raw[:16]))
    return ""


def ip_packed(address: str) -> tuple[int, bytes]:
    """The family (4 or 6) and bytes of an address written as text; ValueError if it is not one."""
    ip = ipaddress.ip_address(address)
    return ip.version, ip.packed


def canonical_ip(ip: str) -> str:
    """One spelling per address, so that '::ffff:...' or '2001:DB8::1' find the same entry."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if addr.version == 6 and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return str(addr)
