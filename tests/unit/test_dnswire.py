"""DNS decoding of sampled messages: known messages, hostile ones, and a bounded fuzz run.

The fuzz tests (hypothesis) feed arbitrary and mutated messages to the decoder
and to the plugin's event handler: nothing may raise out of them, and every
failure must be a counted reject with a reason from the closed set.
"""

from __future__ import annotations

import ctypes as ct
import struct
from types import SimpleNamespace

import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import dnswire
from agent.attribution import Attribution, client_server_addresses
from agent.config import Config
from agent.events import DnsTransaction, EventHub
from agent.k8s.static import StaticPods
from agent.plugins.dns import DnsEvent, DnsPlugin

# Bounded for CI: a few seconds per property.
FUZZ = settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def response_wire(name="www.shop.example", rdtype="A", rcode=dns.rcode.NOERROR, answers=("192.0.2.7",)) -> bytes:
    query = dns.message.make_query(name, rdtype)
    response = dns.message.make_response(query)
    response.set_rcode(rcode)
    if answers:
        response.answer.append(dns.rrset.from_text(name + ".", 60, dns.rdataclass.IN, rdtype, *answers))
    return response.to_wire()


def test_label_values_are_closed_sets():
    assert [dnswire.qtype_name(v) for v in (1, 28, 16, 15, 255, 0, 65000, 1234)] == [
        "A", "AAAA", "TXT", "MX", "ANY", "OTHER", "OTHER", "OTHER"]
    assert [dnswire.rcode_name(v) for v in (0, 2, 3, 5, 12, 15)] == [
        "NOERROR", "SERVFAIL", "NXDOMAIN", "REFUSED", "OTHER", "OTHER"]
    assert len(set(dnswire.QTYPES.values())) == len(dnswire.QTYPES)


def test_decode_a_response():
    d = dnswire.decode(response_wire(answers=("192.0.2.7", "192.0.2.8")))
    assert (d.name, sorted(d.answers)) == ("www.shop.example", ["192.0.2.7", "192.0.2.8"])


def test_a_message_cut_by_the_sample_size_still_names_its_question():
    wire = response_wire(rdtype="TXT", answers=('"' + "x" * 200 + '"',))
    with pytest.raises(dnswire.Rejected):
        dnswire.decode(wire[:60], complete=True)
    assert dnswire.decode(wire[:60], complete=False) == dnswire.Decoded("www.shop.example", ())


def _header(qd=1, an=0, flags=0x8180) -> bytes:
    return struct.pack("!HHHHHH", 0x1234, flags, qd, an, 0, 0)


@pytest.mark.parametrize("wire, reason", [
    (b"", "short"),
    (b"\x12\x34\x81", "short"),
    (_header() + b"\xc0\x0c\x00\x01\x00\x01", "bad_pointer"),  # a name pointing at itself
    (_header() + b"\x01a\xc0\x0e\x00\x01\x00\x01", "bad_pointer"),  # a pointer forward into itself
    (_header() + (b"\x3f" + b"a" * 63) * 5 + b"\x00\x00\x01\x00\x01", "bad_name"),  # 320 bytes
    (_header() + b"\x41" + b"a" * 65 + b"\x00\x00\x01\x00\x01", "bad_name"),  # reserved label type
    (_header(qd=3) + b"\x01a\x00\x00\x01\x00\x01", "malformed"),  # fewer questions than counted
    (_header(an=1) + b"\x01a\x00\x00\x01\x00\x01" + b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04\x01",
     "malformed"),  # an A record with 1 byte of its 4
])
def test_hostile_messages_are_rejected_with_a_reason(wire, reason):
    with pytest.raises(dnswire.Rejected) as e:
        dnswire.decode(wire)
    assert e.value.reason == reason


def _check_decode(wire: bytes, complete: bool) -> None:
    try:
        d = dnswire.decode(wire, complete)
    except dnswire.Rejected as e:
        assert e.reason in dnswire.REASONS
        return
    assert d.name is None or len(d.name) <= 255
    assert len(d.answers) <= dnswire.MAX_ANSWERS
    assert all(len(a) <= dnswire.MAX_ANSWER_TEXT for a in d.answers)


@FUZZ
@given(st.binary(max_size=600), st.booleans())
def test_fuzz_arbitrary_bytes(wire, complete):
    _check_decode(wire, complete)


VALID = [
    response_wire(),
    response_wire("mail.example", "MX", answers=("10 mx1.example.", "20 mx2.example.")),
    response_wire("nx.example", "AAAA", rcode=dns.rcode.NXDOMAIN, answers=()),
    response_wire("t.example", "TXT", answers=('"a" "b"',)),
    dns.message.make_query("q.example", "A").to_wire(),
]


@st.composite
def mutated(draw):
    """A valid message with a few bytes overwritten, counts changed, or cut short."""
    wire = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(0, 6))):
        i = draw(st.integers(0, len(wire) - 1))
        wire[i] = draw(st.integers(0, 255))
    if draw(st.booleans()):  # wrong counts
        i = draw(st.sampled_from([4, 6, 8, 10]))
        wire[i:i + 2] = struct.pack("!H", draw(st.integers(0, 0xFFFF)))
    if draw(st.booleans()):  # compression pointers anywhere
        i = draw(st.integers(12, len(wire) - 2))
        wire[i:i + 2] = struct.pack("!H", 0xC000 | draw(st.integers(0, len(wire) + 4)))
    return bytes(wire[:draw(st.integers(0, len(wire)))])


@FUZZ
@given(mutated(), st.booleans())
def test_fuzz_mutated_messages(wire, complete):
    _check_decode(wire, complete)


# -- the plugin's handler of sampled messages, without a kernel ------------------------


def plugin() -> DnsPlugin:
    p = DnsPlugin()
    p._ctx = SimpleNamespace(config=Config(), events=EventHub())
    names = Attribution(StaticPods.empty(), "n1")
    p._records = names.holding("dns_transaction", p._ctx.events.publish, client_server_addresses)
    return p


def event(kind: int, body: bytes, offset=14 + 20 + 8, length=None, **fields) -> bytes:
    ev = DnsEvent(ts=10**9, latency=2_000_000 if kind else 0, ifindex=7, offset=offset,
                  length=len(body) - offset if length is None else length, qtype=1, kind=kind, **fields)
    ev.flow.family, ev.flow.transport, ev.flow.id = 4, 17, 0x1234
    ev.flow.client[:4] = [10, 1, 1, 2]
    ev.flow.server[:4] = [10, 1, 2, 2]
    ev.flow.client_port, ev.flow.server_port = 40000, 53
    return bytes(ev) + body


def deliver(p: DnsPlugin, raw: bytes) -> None:
    buf = ct.create_string_buffer(raw, len(raw))
    p._on_event(0, ct.addressof(buf), len(raw))


def test_a_sampled_query_and_response_make_one_transaction():
    p = plugin()
    sub = p._ctx.events.subscribe("t")
    headers = bytes(14 + 20 + 8)
    deliver(p, event(0, headers + dns.message.make_query("www.shop.example", "A").to_wire()))
    assert sub.get(timeout=0) is None  # waits for its response
    deliver(p, event(1, headers + response_wire()))
    t = sub.get(timeout=0)
    assert isinstance(t, DnsTransaction)
    assert (t.name, t.answers, t.qtype, t.rcode, t.duration) == (
        "www.shop.example", ("192.0.2.7",), "A", "NOERROR", 0.002)
    assert (t.client, t.client_port, t.server, t.server_port, t.transport, t.id) == (
        "10.1.1.2", 40000, "10.1.2.2", 53, "udp", 0x1234)
    assert not p._sampled


@FUZZ
@given(st.integers(0, 1), st.binary(max_size=300), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
       st.integers(0, 255), st.integers(0, 255))
def test_fuzz_event_handler_never_raises(kind, body, offset, length, rcode, observer):
    p = plugin()
    sub = p._ctx.events.subscribe("t")
    deliver(p, event(kind, body, offset=offset, length=length, rcode=rcode, observer=observer))
    deliver(p, event(kind, body)[: ct.sizeof(DnsEvent) - 1])  # shorter than its header: ignored
    record = sub.get(timeout=0)
    if kind == 1:
        assert isinstance(record, DnsTransaction)
        assert record.rcode in set(dnswire.RCODES.values()) | {"OTHER"}
        assert record.observer in ("source", "destination")
    else:
        assert record is None
    assert sum(p.decode_rejects.values()) <= 1
