"""Features compiled into the tc programs (declared to the datapath owner): flags, callbacks, the fallback."""

from __future__ import annotations

import pytest

from agent.errors import FoveaError
from agent import datapath
from agent.config import Config
from agent.datapath import Datapath, TcExtension
from agent.supervise import Supervisor


class FakeBpf:
    SCHED_CLS = 3

    def __init__(self, cflags):
        self.cflags = cflags
        self.cleaned = False

    def load_func(self, name, kind):
        if "-DBREAKS_VERIFIER" in self.cflags:
            raise FoveaError("the kernel refused pod_from_pod of bpf/pods.c: Permission denied", "run 'fovea doctor'")
        return name

    def cleanup(self):
        self.cleaned = True


class Recorder(TcExtension):
    def __init__(self, flags):
        self.flags = flags
        self.calls = []

    def cflags(self, program):
        return self.flags if program == "pods" else []

    def loaded(self, program, bpf):
        self.calls.append(("loaded", program, bpf.cflags))

    def failed(self, program, why):
        self.calls.append(("failed", program))


@pytest.fixture
def ctx(monkeypatch):
    built = []

    def compile_program(name, cflags, headers, cache, pin_dir):
        assert cache == "/var/cache/fovea" and pin_dir is None
        built.append(FakeBpf(cflags))
        return built[-1]

    monkeypatch.setattr(datapath, "compile_program", compile_program)
    c = Datapath(Config(), None, [], lambda: None, Supervisor(), endpoints=object(), tc=object())
    c.built = built
    return c


def test_extension_flags_go_into_the_host_program(ctx):
    ext = Recorder(["-DFOVEA_DNS"])
    ctx.declare(ext)
    bpf, fns = ctx.load_tc_programs("pods", ["-DPOD_MAP_SIZE=2"], {"ingress": b"pod_from_pod"})
    assert bpf.cflags == ["-DPOD_MAP_SIZE=2", "-DFOVEA_DNS"]
    assert fns == {"ingress": b"pod_from_pod"}
    assert ext.calls == [("loaded", "pods", ["-DPOD_MAP_SIZE=2", "-DFOVEA_DNS"])]
    ctx.load_tc_programs("forward", [], {"egress": b"forward_egress"})  # not extended
    assert ctx.built[-1].cflags == [] and len(ext.calls) == 1


def test_a_failing_extension_never_takes_its_host_down(ctx):
    ext = Recorder(["-DBREAKS_VERIFIER"])
    ctx.declare(ext)
    bpf, _ = ctx.load_tc_programs("pods", ["-DPOD_MAP_SIZE=2"], {"ingress": b"pod_from_pod"})
    assert bpf.cflags == ["-DPOD_MAP_SIZE=2"]  # loaded again without the extension
    assert ctx.built[0].cleaned  # the refused build was freed
    assert ext.calls == [("failed", "pods")]


def test_a_host_that_fails_on_its_own_still_fails(ctx):
    with pytest.raises(FoveaError):
        ctx.load_tc_programs("pods", ["-DBREAKS_VERIFIER"], {"ingress": b"pod_from_pod"})


def test_features_are_declared_before_anything_compiles(ctx):
    ctx.load_tc_programs("forward", [], {"egress": b"forward_egress"})
    with pytest.raises(FoveaError, match="declared after the tc programs compiled"):
        ctx.declare(Recorder(["-DFOVEA_DNS"]))
