"""A small DNS server (UDP and TCP, port 53) for lab namespaces, built on dnspython.

Answers come from the name: `nx...` gets NXDOMAIN, `silent...` gets no
response at all, `fail...` SERVFAIL, anything else NOERROR with one record of
the asked type (A, AAAA, TXT, MX; other types an empty answer). Malformed
messages are ignored. Tests compare what the agent counts with what this
server and its clients did.
"""

from __future__ import annotations

import socket
import struct
import threading

import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

RECORDS = {
    dns.rdatatype.A: "192.0.2.7",
    dns.rdatatype.AAAA: "2001:db8::7",
    dns.rdatatype.TXT: '"fovea"',
    dns.rdatatype.MX: "10 mail.example.",
}


def answer(query: dns.message.Message) -> dns.message.Message | None:
    """The response to one query, or None for no response."""
    q = query.question[0]
    label = q.name.labels[0].decode(errors="replace") if q.name.labels else ""
    if label.startswith("silent"):
        return None
    response = dns.message.make_response(query)
    if label.startswith("nx"):
        response.set_rcode(dns.rcode.NXDOMAIN)
    elif label.startswith("fail"):
        response.set_rcode(dns.rcode.SERVFAIL)
    elif q.rdtype in RECORDS:
        response.answer.append(dns.rrset.from_text(q.name, 60, dns.rdataclass.IN, q.rdtype, RECORDS[q.rdtype]))
    return response


class DnsServer:
    def __init__(self, lab, ns: str, address: str):
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        self.address = address
        self.udp = lab.socket(ns, family, socket.SOCK_DGRAM)
        self.udp.bind((address, 53))
        self.tcp = lab.socket(ns, family, socket.SOCK_STREAM)
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.tcp.bind((address, 53))
        self.tcp.listen(64)
        self.queries = 0
        self.malformed = 0
        self._threads = [threading.Thread(target=f, daemon=True) for f in (self._serve_udp, self._serve_tcp)]
        for t in self._threads:
            t.start()

    def _respond(self, wire: bytes) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except Exception:  # noqa: BLE001 - tests send garbage on purpose
            self.malformed += 1
            return None
        self.queries += 1
        response = answer(query)
        return response.to_wire() if response is not None else None

    def _serve_udp(self) -> None:
        while True:
            try:
                wire, peer = self.udp.recvfrom(65535)
            except OSError:
                return
            out = self._respond(wire)
            if out is not None:
                self.udp.sendto(out, peer)

    def _serve_tcp(self) -> None:
        while True:
            try:
                conn, _ = self.tcp.accept()
            except OSError:
                return
            with conn:
                try:
                    n = struct.unpack("!H", _read(conn, 2))[0]
                    out = self._respond(_read(conn, n))
                    if out is not None:
                        conn.sendall(struct.pack("!H", len(out)) + out)
                except (OSError, ValueError, struct.error):
                    pass

    def close(self) -> None:
        for s in (self.udp, self.tcp):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        for t in self._threads:
            t.join(timeout=5)


def _read(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ValueError("connection closed")
        data += chunk
    return data
