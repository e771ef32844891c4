"""The compiled-program cache (agent/compiler.py) and the C types of map keys and values (agent/bpfmaps.py)."""

from __future__ import annotations

import ctypes as ct
import json
import shutil

import pytest

from agent import compiler
from agent.bpfmaps import ctype
from agent.kernel.headers import Headers

HEADERS = Headers("explicit", None, {}, "test headers")


@pytest.fixture
def child(monkeypatch):
    """The compiler process, faked: records each compile and returns an object naming its flags."""
    calls = []

    def compile_in_child(name, cflags, headers):
        calls.append((name, list(cflags)))
        return {"format": compiler.FORMAT, "program": name, "cflags": cflags, "maps": {}, "kept": [],
                "functions": {}, "license": "GPL"}

    monkeypatch.setattr(compiler, "_compile_in_child", compile_in_child)
    return calls


def test_an_unchanged_program_is_compiled_once(child, tmp_path):
    first = compiler.compiled("forward", ["-DA=1"], HEADERS, str(tmp_path))
    again = compiler.compiled("forward", ["-DA=1"], HEADERS, str(tmp_path))
    assert child == [("forward", ["-DA=1"])]
    assert again == first
    assert len(list((tmp_path / "programs").glob("forward-*.json"))) == 1


@pytest.mark.parametrize("change", ["flags", "headers", "program"])
def test_other_flags_headers_or_program_compile_again(child, tmp_path, change):
    compiler.compiled("forward", ["-DA=1"], HEADERS, str(tmp_path))
    name, flags, headers = "forward", ["-DA=1"], HEADERS
    if change == "flags":
        flags = ["-DA=2"]
    elif change == "headers":
        headers = Headers("explicit", None, {"BCC_KERNEL_SOURCE": "/elsewhere"}, "other headers")
    else:
        name = "pods"
    compiler.compiled(name, flags, headers, str(tmp_path))
    assert len(child) == 2
    assert len(list((tmp_path / "programs").glob("*.json"))) == 2


def test_a_changed_source_or_header_compiles_again(child, tmp_path, monkeypatch):
    sources = tmp_path / "bpf"
    shutil.copytree(compiler.source_dir(), sources)
    monkeypatch.setenv("FOVEA_BPF_DIR", str(sources))
    cache = str(tmp_path / "cache")
    compiler.compiled("forward", [], HEADERS, cache)
    for edited in ("forward.c", "fovea.h"):  # the program, then a header it includes
        with open(sources / edited, "a") as f:
            f.write("\n/* edited */\n")
        compiler.compiled("forward", [], HEADERS, cache)
    compiler.compiled("forward", [], HEADERS, cache)
    assert len(child) == 3


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": compiler.FORMAT + 1})])
def test_a_damaged_or_foreign_cache_entry_is_compiled_again_and_replaced(child, tmp_path, content, caplog):
    compiler.compiled("forward", [], HEADERS, str(tmp_path))
    (entry,) = (tmp_path / "programs").glob("*.json")
    entry.write_text(content)
    obj = compiler.compiled("forward", [], HEADERS, str(tmp_path))
    assert len(child) == 2 and obj["program"] == "forward"
    assert json.loads(entry.read_text())["format"] == compiler.FORMAT
    assert "ignoring" in caplog.text


def test_no_cache_directory_compiles_every_time(child):
    compiler.compiled("forward", [], HEADERS, None)
    compiler.compiled("forward", [], HEADERS, None)
    assert len(child) == 2


def test_the_cache_keeps_the_most_recently_used(child, tmp_path, monkeypatch):
    monkeypatch.setattr(compiler, "CACHE_KEEP", 3)
    for i in range(5):
        compiler.compiled("forward", [f"-DN={i}"], HEADERS, str(tmp_path))
    assert len(list((tmp_path / "programs").glob("*.json"))) == 3
    assert not list((tmp_path / "programs").glob(".*"))  # no temporary file left


def test_an_unwritable_cache_costs_only_the_next_compile(child, tmp_path, caplog):
    blocked = tmp_path / "cache"
    blocked.write_text("a file where the directory should be")
    assert compiler.compiled("forward", [], HEADERS, str(blocked))["program"] == "forward"
    assert "could not cache" in caplog.text


def test_the_kept_maps_are_those_the_sources_declare_as_kept():
    src = compiler.source_dir()
    dns = ["dns_counts", "dns_inflight", "dns_latency", "dns_stats"]
    assert compiler.kept_maps(compiler.inline_includes(src / "forward.c")) == [
        *dns, "flow_events", "flow_lost", "flows", "forward_counts"]
    assert compiler.kept_maps(compiler.inline_includes(src / "pods.c")) == [
        *dns, "flow_events", "flow_lost", "flows", "http_counts", "http_durations", "http_events", "http_inflight",
        "http_stats"]
    # A tracepoint program that did not change stays attached: it keeps every map it uses.
    assert compiler.kept_maps(compiler.inline_includes(src / "tcp.c")) == [
        "connect_start", "rtt_last", "tcp_events", "tcp_events_overflow", "tcp_hist", "tcp_lost", "tcp_states"]
    assert compiler.kept_maps(compiler.inline_includes(src / "drops.c")) == [
        "drop_counts", "drop_event_budget", "drop_events", "drop_flow_budget", "drop_overflow"]


def test_c_types_as_bcc_describes_them():
    desc = ["flow_id", [
        ["family", "unsigned char"],
        ["", [["v4", "unsigned int"], ["v6", "unsigned char", [16]]], "union"],
        ["ports", "unsigned short", [2]],
        ["inner", [["a", "unsigned long long"]], "struct"],
        ["flag", "unsigned int", 1],
        ["rest", "unsigned int", 31],
    ], "struct"]
    t = ctype(desc)
    v = t()
    v.v4 = 7  # the anonymous union's members are the struct's own
    v.ports[1], v.inner.a, v.flag = 80, 1 << 40, 1
    assert (v.v4, v.v6[0], v.ports[1], v.inner.a, v.flag) == (7, 7, 80, 1 << 40, 1)
    assert ct.sizeof(t) == 4 + 16 + 4 + 8 + 4 + 4  # C's alignment: 1 + 3 pad, 16, 4, 8, 4 (bitfields) + 4 pad
    packed = ctype(["p", [["a", "unsigned char"], ["b", "unsigned int"]], "struct_packed"])
    assert ct.sizeof(packed) == 5
    with pytest.raises(ValueError, match="unknown C type"):
        ctype("struct nope")


def test_doctor_says_how_many_programs_are_cached_and_whether_a_start_can_add_to_them(child, tmp_path, monkeypatch):
    from agent.cli import doctor

    assert doctor._program_cache_check(str(tmp_path)).detail == f"{tmp_path}/programs: 0 cached, writable"
    compiler.compiled("forward", [], HEADERS, str(tmp_path))
    check = doctor._program_cache_check(str(tmp_path))
    assert check.ok and check.detail == f"{tmp_path}/programs: 1 cached, writable"
    monkeypatch.setattr(doctor.os, "access", lambda path, mode: False)  # a read-only mount (root writes anywhere)
    check = doctor._program_cache_check(str(tmp_path))
    assert check.ok and "is not writable: every start compiles" in check.detail
