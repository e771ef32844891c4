"""agent/kernel/tracefs.py: format parsing and a fake tracefs tree."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import FoveaError
from agent.kernel.tracefs import Field, Tracefs, parse_format

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
# Linux 6.18 (this VM): rx_sk present, reason at 36.
KFREE_SKB = (FIXTURES / "kfree_skb.format").read_text()
# Linux 6.1 shape: no rx_sk, reason at 28, older drop-reason numbering.
KFREE_SKB_61 = (FIXTURES / "kfree_skb_6.1.format").read_text()

COMMON = {
    "common_type": Field("common_type", "unsigned short", 0, 2, False),
    "common_flags": Field("common_flags", "unsigned char", 2, 1, False),
    "common_preempt_count": Field("common_preempt_count", "unsigned char", 3, 1, False),
    "common_pid": Field("common_pid", "int", 4, 4, True),
}


def test_kfree_skb_fields():
    fmt = parse_format(KFREE_SKB)
    assert (fmt.name, fmt.id) == ("kfree_skb", 2310)
    assert fmt.fields == {
        **COMMON,
        "skbaddr": Field("skbaddr", "void *", 8, 8, False),
        "location": Field("location", "void *", 16, 8, False),
        "rx_sk": Field("rx_sk", "void *", 24, 8, False),
        "protocol": Field("protocol", "unsigned short", 32, 2, False),
        "reason": Field("reason", "enum skb_drop_reason", 36, 4, False),
    }
    assert fmt.print_fmt.startswith('"skbaddr=%p rx_sk=%p protocol=%u location=%pS reason: %s"')
    assert fmt.print_fmt.endswith('{ 128, "MAX" })')


def test_kfree_skb_older_kernel_fields():
    fmt = parse_format(KFREE_SKB_61)
    assert (fmt.name, fmt.id) == ("kfree_skb", 1436)
    assert fmt.fields == {
        **COMMON,
        "skbaddr": Field("skbaddr", "void *", 8, 8, False),
        "location": Field("location", "void *", 16, 8, False),
        "protocol": Field("protocol", "unsigned short", 24, 2, False),
        "reason": Field("reason", "enum skb_drop_reason", 28, 4, False),
    }


@pytest.mark.parametrize("text, value, name", [
    (KFREE_SKB, 12, "NETFILTER_DROP"),
    (KFREE_SKB, 3, "NO_SOCKET"),
    (KFREE_SKB, 2, "NOT_SPECIFIED"),
    (KFREE_SKB, 128, "MAX"),
    (KFREE_SKB_61, 7, "NETFILTER_DROP"),
    (KFREE_SKB_61, 2, "NO_SOCKET"),
    (KFREE_SKB_61, 12, "UNICAST_IN_L2_MULTICAST"),
    (KFREE_SKB_61, 66, "MAX"),
])
def test_drop_reason_symbols(text, value, name):
    assert parse_format(text).symbols("reason")[value] == name


@pytest.mark.parametrize("text, count, lowest, highest", [
    (KFREE_SKB, 127, 2, 128),
    (KFREE_SKB_61, 66, 1, 66),
])
def test_drop_reason_symbol_count(text, count, lowest, highest):
    symbols = parse_format(text).symbols("reason")
    assert (len(symbols), min(symbols), max(symbols)) == (count, lowest, highest)


def test_symbols_of_field_without_list():
    fmt = parse_format(KFREE_SKB)
    assert fmt.symbols("protocol") == {}
    assert fmt.symbols("nope") == {}


# tcp:tcp_retransmit_skb-like: arrays; hex and several __print_symbolic lists.
TCP_EVENT = """name: tcp_fake
ID: 1700
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;
\tfield:int newstate;\toffset:20;\tsize:4;\tsigned:1;
\tfield:__u16 sport;\toffset:24;\tsize:2;\tsigned:0;
\tfield:__u16 family;\toffset:26;\tsize:2;\tsigned:0;
\tfield:__u8 saddr[4];\toffset:28;\tsize:4;\tsigned:0;
\tfield:unsigned char daddr[4];\toffset:32;\tsize:4;\tsigned:0;
\tfield:__u8 saddr_v6[16];\toffset:36;\tsize:16;\tsigned:0;
\tfield:__data_loc char[] name;\toffset:52;\tsize:4;\tsigned:0;

print fmt: "family=%s oldstate=%s newstate=%s dev=%s", __print_symbolic(REC->family, { 2, "AF_INET" }, { 10, "AF_INET6" }), __print_symbolic(REC->oldstate, { 0x01, "TCP_ESTABLISHED" }, { 0x0a, "TCP_LISTEN" }, { 0xC, "TCP_NEW_SYN_RECV" }, { -1, "UNSET" }), __print_symbolic(REC->newstate, { 0x02, "TCP_SYN_SENT" }, { 7, "TCP_CLOSE" }), __get_str(name)
"""


@pytest.mark.parametrize("name, expected", [
    ("skaddr", Field("skaddr", "const void *", 8, 8, False)),
    ("oldstate", Field("oldstate", "int", 16, 4, True)),
    ("sport", Field("sport", "__u16", 24, 2, False)),
    ("saddr", Field("saddr", "__u8", 28, 4, False)),
    ("daddr", Field("daddr", "unsigned char", 32, 4, False)),
    ("saddr_v6", Field("saddr_v6", "__u8", 36, 16, False)),
    ("name", Field("name", "__data_loc char[]", 52, 4, False)),
])
def test_array_and_data_loc_fields(name, expected):
    assert parse_format(TCP_EVENT).field(name) == expected


def test_field_names():
    assert list(parse_format(TCP_EVENT).fields) == [
        "common_type", "common_flags", "common_preempt_count", "common_pid",
        "skaddr", "oldstate", "newstate", "sport", "family", "saddr", "daddr", "saddr_v6", "name",
    ]


@pytest.mark.parametrize("field, expected", [
    ("family", {2: "AF_INET", 10: "AF_INET6"}),
    ("oldstate", {1: "TCP_ESTABLISHED", 10: "TCP_LISTEN", 12: "TCP_NEW_SYN_RECV", -1: "UNSET"}),
    ("newstate", {2: "TCP_SYN_SENT", 7: "TCP_CLOSE"}),
    ("state", {}),
    ("name", {}),
])
def test_symbol_lists_including_hex(field, expected):
    assert parse_format(TCP_EVENT).symbols(field) == expected


def test_format_without_print_fmt():
    text = "name: bare\nID: 7\nformat:\n\tfield:int x;\toffset:8;\tsize:4;\tsigned:1;\n"
    fmt = parse_format(text)
    assert (fmt.name, fmt.id, fmt.print_fmt) == ("bare", 7, "")
    assert fmt.fields == {"x": Field("x", "int", 8, 4, True)}
    assert fmt.symbols("x") == {}


@pytest.mark.parametrize("text", ["", "garbage\n", "name: x\nformat:\n", "ID: 3\n"])
def test_unreadable_format(text):
    with pytest.raises(FoveaError) as exc:
        parse_format(text)
    assert exc.value.problem == "unreadable tracepoint format"


def test_missing_field_names_it():
    fmt = parse_format(KFREE_SKB_61)
    with pytest.raises(FoveaError) as exc:
        fmt.field("rx_sk")
    assert exc.value.problem == "tracepoint kfree_skb has no field 'rx_sk' on this kernel"


@pytest.fixture
def fake_tracefs(tmp_path) -> Path:
    for category, event, text in [
        ("skb", "kfree_skb", KFREE_SKB),
        ("tcp", "tcp_fake", TCP_EVENT),
    ]:
        d = tmp_path / "events" / category / event
        d.mkdir(parents=True)
        (d / "format").write_text(text)
        (d / "enable").write_text("0\n")
    # A category directory's own files, and an event directory without a format.
    (tmp_path / "events" / "skb" / "enable").write_text("0\n")
    (tmp_path / "events" / "net" / "broken").mkdir(parents=True)
    return tmp_path


@pytest.mark.parametrize("category, event, exists", [
    ("skb", "kfree_skb", True),
    ("tcp", "tcp_fake", True),
    ("skb", "consume_skb", False),
    ("tcp", "tcp_send_reset", False),
    ("net", "broken", False),
    ("nope", "nope", False),
    ("skb", "enable", False),
])
def test_exists(fake_tracefs, category, event, exists):
    assert Tracefs(root=fake_tracefs).exists(category, event) is exists


def test_root_may_be_a_string(fake_tracefs):
    tfs = Tracefs(root=str(fake_tracefs))
    assert tfs.root == fake_tracefs
    assert tfs.format("skb", "kfree_skb").id == 2310


def test_format_from_tree(fake_tracefs):
    fmt = Tracefs(root=fake_tracefs).format("skb", "kfree_skb")
    assert fmt == parse_format(KFREE_SKB)


@pytest.mark.parametrize("text, fields, flags", [
    (KFREE_SKB, ["reason"], ["-DTP_KFREE_SKB_REASON_OFF=36"]),
    (KFREE_SKB, ["skbaddr", "protocol", "reason"],
     ["-DTP_KFREE_SKB_SKBADDR_OFF=8", "-DTP_KFREE_SKB_PROTOCOL_OFF=32", "-DTP_KFREE_SKB_REASON_OFF=36"]),
    (KFREE_SKB_61, ["reason"], ["-DTP_KFREE_SKB_REASON_OFF=28"]),
    (KFREE_SKB_61, ["protocol", "reason"],
     ["-DTP_KFREE_SKB_PROTOCOL_OFF=24", "-DTP_KFREE_SKB_REASON_OFF=28"]),
    (KFREE_SKB, [], []),
])
def test_offset_flags(tmp_path, text, fields, flags):
    d = tmp_path / "events" / "skb" / "kfree_skb"
    d.mkdir(parents=True)
    (d / "format").write_text(text)
    assert Tracefs(root=tmp_path).offset_flags("skb", "kfree_skb", fields) == flags


def test_offset_flags_missing_field(tmp_path):
    d = tmp_path / "events" / "skb" / "kfree_skb"
    d.mkdir(parents=True)
    (d / "format").write_text(KFREE_SKB_61)
    with pytest.raises(FoveaError) as exc:
        Tracefs(root=tmp_path).offset_flags("skb", "kfree_skb", ["reason", "rx_sk"])
    assert "'rx_sk'" in str(exc.value)
    assert exc.value.problem == "tracepoint kfree_skb has no field 'rx_sk' on this kernel"


@pytest.mark.parametrize("category, event", [
    ("tcp", "tcp_send_reset"),
    ("net", "broken"),
    ("nope", "nope"),
])
def test_missing_tracepoint(fake_tracefs, category, event):
    tfs = Tracefs(root=fake_tracefs)
    for call in (lambda: tfs.format(category, event),
                 lambda: tfs.offset_flags(category, event, ["x"])):
        with pytest.raises(FoveaError) as exc:
            call()
        assert exc.value.problem == f"tracepoint {category}:{event} does not exist on this kernel"


def test_drop_reasons_from_tree(fake_tracefs):
    reasons = Tracefs(root=fake_tracefs).drop_reasons()
    assert reasons == parse_format(KFREE_SKB).symbols("reason")
    assert (reasons[12], reasons[3]) == ("NETFILTER_DROP", "NO_SOCKET")


def test_lacks_names_the_missing_tracepoint_field_or_size(tmp_path):
    events = tmp_path / "events" / "skb" / "kfree_skb"
    events.mkdir(parents=True)
    (events / "format").write_text(
        "name: kfree_skb\nID: 1\nformat:\n"
        "\tfield:void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;\n"
        "\tfield:unsigned short protocol;\toffset:16;\tsize:2;\tsigned:0;\n"
        "\nprint fmt: \"\"\n")
    t = Tracefs(tmp_path)
    assert t.lacks("skb", "kfree_skb", {"skbaddr": 8, "protocol": 2}) is None
    assert t.lacks("skb", "kfree_skb", {"reason": 4}) == "skb:kfree_skb has no 'reason' field on this kernel"
    assert t.lacks("skb", "kfree_skb", {"protocol": 4}) == "skb:kfree_skb field 'protocol' is 2 bytes, expected 4"
    assert t.lacks("tcp", "tcp_probe", {}) == "tracepoint tcp:tcp_probe is missing"
