"""agent/config.py: defaults, the YAML file, overrides and validation."""

from __future__ import annotations

import dataclasses
import typing
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent import config as config_mod
from agent.config import Config, DnsConfig, DropsConfig, FlowsConfig, HttpConfig, KernelConfig, TcConfig
from agent.errors import FoveaError
from agent.plugins import REGISTRY

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "fovea.yaml"
    path.write_text(text)
    return str(path)


def test_defaults():
    cfg = Config()
    top = dataclasses.asdict(cfg)
    assert {k: top[k] for k in ("standalone", "nodeName", "kubeconfig", "uplinks", "port", "bindAddress",
                                "interval", "idleReads", "staticPods", "logLevel")} == {
        "standalone": False, "nodeName": "", "kubeconfig": "", "uplinks": (), "port": 9810,
        "bindAddress": "0.0.0.0", "interval": 5.0, "idleReads": 12, "staticPods": "", "logLevel": "info",
    }
    assert top["tc"] == {"priority": 1, "mode": "auto"}
    assert top["drops"] == {"mapSize": 16384, "eventsPerSecond": 200}
    assert top["flows"] == {"enabled": True, "mapSize": 65536, "ringBufferSize": 1 << 20, "idleTimeout": 30.0,
                            "reportInterval": 60.0, "connectTimeout": 10.0}
    assert top["otlp"] == {"enabled": False, "protocol": "", "endpoint": "", "sampleRatio": 1.0,
                           "maxSpansPerSecond": 1000, "queueSize": 4096, "batchSize": 512}
    assert top["observe"] == {"socket": "/run/fovea/observe.sock", "port": 9811, "buffer": 4096, "maxFollowers": 64}
    assert top["pods"] == {"mapSize": 8192, "interfaces": ("*",)}
    assert top["tcp"] == {"mapSize": 16384, "socketMapSize": 65536, "reconcileInterval": 30.0, "includeHost": True}
    assert top["dns"] == {"timeout": 5.0, "sampleRatio": 0.01, "sampleBytes": 512, "mapSize": 4096,
                          "inflightMapSize": 16384}
    assert top["http"] == {"enabled": True, "ports": (80, 8080, 8000, 3000, 5000, 9090), "timeout": 60.0,
                           "mapSize": 4096, "inflightMapSize": 16384, "sampleRatio": 0.01,
                           "urlPath": False, "urlPathMaxLength": 128}
    assert top["podLevel"] == {"allPods": False, "seriesTTL": 300.0, "maxSeries": 10000, "pendingWindow": 30.0}
    assert top["kernel"] == {"headers": "", "btf": "/sys/kernel/btf/vmlinux", "cacheDir": "/var/cache/fovea"}
    assert top["tls"] == {"certFile": "", "keyFile": ""}
    assert top["metricsAuth"] == {"enabled": False, "cacheTTL": 60.0}
    assert top["captures"] == {"enabled": True, "baseDir": "/var/lib/fovea/captures", "uploadAllowlist": (),
                               "gracePeriod": 60.0, "namespace": "", "nodeQuota": 0, "maxConcurrent": 2,
                               "retention": 86400.0, "ringMemory": 64 << 20}
    assert cfg.validate(REGISTRY) is cfg


@pytest.mark.parametrize("text", [None, "", "# only a comment\n", "---\n"])
def test_no_file_or_empty_file_gives_defaults(tmp_path, text):
    path = None if text is None else write(tmp_path, text)
    assert config_mod.load(path) == Config()


def test_yaml_file_with_nested_keys(tmp_path):
    path = write(tmp_path, """
standalone: true
port: 9999
interval: 2
uplinks: [eth0, ens5]
plugins: [drops]
tc:
  priority: 7
drops:
  mapSize: 4096
kernel:
  cacheDir: /tmp/fovea-cache
""")
    cfg = config_mod.load(path)
    assert cfg == Config(
        standalone=True, port=9999, interval=2.0, uplinks=("eth0", "ens5"), plugins=("drops",),
        tc=TcConfig(priority=7), drops=DropsConfig(mapSize=4096),
        kernel=KernelConfig(cacheDir="/tmp/fovea-cache"),
    )
    assert type(cfg.interval) is float
    assert cfg.kernel.btf == "/sys/kernel/btf/vmlinux"  # untouched sibling keeps its default
    assert cfg.validate(REGISTRY) is cfg


@pytest.mark.parametrize("text, key, known", [
    ("drops:\n  mapSiz: 10\n", "drops.mapSiz", "eventsPerSecond, mapSize"),
    ("tc:\n  prio: 1\n", "tc.prio", "mode, priority"),
    ("kernel:\n  btfPath: /x\n", "kernel.btfPath", "btf, cacheDir, headers"),
    ("prot: 1\n", "prot", ", ".join(sorted(f.name for f in dataclasses.fields(Config)))),
])
def test_unknown_key_is_named(tmp_path, text, key, known):
    with pytest.raises(FoveaError) as exc:
        config_mod.load(write(tmp_path, text))
    assert exc.value.problem == f"config key {key!r} is unknown"
    assert exc.value.hint == f"known keys here: {known}"


@pytest.mark.parametrize("text, problem", [
    ("port: abc\n", "config key 'port' must be of type int"),
    ("port: true\n", "config key 'port' must be of type int"),
    ("port: 80.5\n", "config key 'port' must be of type int"),
    ("interval: fast\n", "config key 'interval' must be of type float"),
    ("interval: true\n", "config key 'interval' must be of type float"),
    ("standalone: 1\n", "config key 'standalone' must be of type bool"),
    ("nodeName: 5\n", "config key 'nodeName' must be of type str"),
    ("tc:\n  priority: '3'\n", "config key 'tc.priority' must be of type int"),
    ("drops:\n  mapSize: 1.5\n", "config key 'drops.mapSize' must be of type int"),
    ("uplinks: eth0\n", "config key 'uplinks' must be a list of strings"),
    ("uplinks: [eth0, 5]\n", "config key 'uplinks' must be a list of strings"),
    ("plugins: {drops: 1}\n", "config key 'plugins' must be a list of strings"),
    ("tc: 5\n", "config key 'tc' must be a mapping"),
    ("kernel: [a]\n", "config key 'kernel' must be a mapping"),
])
def test_wrong_type_names_key(tmp_path, text, problem):
    with pytest.raises(FoveaError) as exc:
        config_mod.load(write(tmp_path, text))
    assert exc.value.problem == problem


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_file_that_is_not_a_mapping(tmp_path, text):
    with pytest.raises(FoveaError) as exc:
        config_mod.load(write(tmp_path, text))
    assert "must be a mapping" in exc.value.problem


def test_overrides_beat_file(tmp_path):
    path = write(tmp_path, "port: 1111\ninterval: 9\ntc:\n  priority: 3\ndrops:\n  mapSize: 100\n")
    cfg = config_mod.load(path, {"port": 2222, "tc.priority": 9, "uplinks": ["eth1"],
                                 "kernel.headers": "/h"})
    assert (cfg.port, cfg.tc.priority, cfg.uplinks, cfg.kernel.headers) == (2222, 9, ("eth1",), "/h")
    assert (cfg.interval, cfg.drops.mapSize) == (9.0, 100)  # not overridden: the file's


def test_overrides_without_file():
    cfg = config_mod.load(None, {"standalone": True, "logLevel": "debug", "drops.mapSize": 8})
    assert cfg == Config(standalone=True, logLevel="debug", drops=DropsConfig(mapSize=8))


def test_overrides_are_type_checked():
    with pytest.raises(FoveaError) as exc:
        config_mod.load(None, {"port": "x"})
    assert exc.value.problem == "config key 'port' must be of type int"


@pytest.mark.parametrize("text, overrides", [
    ("- a\n", {"port": 9000}),
    ("tc: 5\n", {"tc.priority": 2}),
])
def test_overrides_on_non_mapping_file_give_fovea_error(tmp_path, text, overrides):
    """Not a TypeError/AttributeError traceback (e.g. 'fovea agent --config list.yaml --port 9000')."""
    with pytest.raises(FoveaError) as exc:
        config_mod.load(write(tmp_path, text), overrides)
    assert "must be a mapping" in exc.value.problem


HTTP_PORTS_HINT = "it must be at most 16 distinct TCP ports, 1-65535 (or [] for every port)"


@pytest.mark.parametrize("changes, key, hint", [
    ({"port": 0}, "port", "it must be a TCP port, 1-65535"),
    ({"port": 65536}, "port", "it must be a TCP port, 1-65535"),
    ({"port": -1}, "port", "it must be a TCP port, 1-65535"),
    ({"interval": 0.0}, "interval", "it must be a positive number of seconds"),
    ({"interval": -1.0}, "interval", "it must be a positive number of seconds"),
    ({"idleReads": 0}, "idleReads", "it must be at least 1"),
    ({"drops": DropsConfig(mapSize=0)}, "drops.mapSize", "it must be 1 to 1048576"),
    ({"drops": DropsConfig(mapSize=(1 << 20) + 1)}, "drops.mapSize", "it must be 1 to 1048576"),
    ({"tc": TcConfig(priority=0)}, "tc.priority", "it must be 1-65535"),
    ({"tc": TcConfig(priority=65536)}, "tc.priority", "it must be 1-65535"),
    ({"logLevel": "verbose"}, "logLevel", "it must be debug, info, warning or error"),
    ({"dns": DnsConfig(timeout=0.0)}, "dns.timeout", "it must be more than 0 and at most 3600 seconds"),
    ({"dns": DnsConfig(sampleRatio=1.5)}, "dns.sampleRatio", "it must be a share from 0 to 1"),
    ({"dns": DnsConfig(sampleRatio=-0.1)}, "dns.sampleRatio", "it must be a share from 0 to 1"),
    ({"dns": DnsConfig(sampleBytes=8)}, "dns.sampleBytes", "it must be 12 to 4096"),
    ({"dns": DnsConfig(inflightMapSize=0)}, "dns.inflightMapSize", "it must be 1 to 4194304"),
    ({"http": HttpConfig(ports=(80, 0))}, "http.ports", HTTP_PORTS_HINT),
    ({"http": HttpConfig(ports=(80, 80))}, "http.ports", HTTP_PORTS_HINT),
    ({"http": HttpConfig(ports=tuple(range(1, 18)))}, "http.ports", HTTP_PORTS_HINT),
    ({"http": HttpConfig(timeout=0.0)}, "http.timeout", "it must be more than 0 and at most 3600 seconds"),
    ({"http": HttpConfig(inflightMapSize=0)}, "http.inflightMapSize", "it must be 1 to 4194304"),
    ({"http": HttpConfig(sampleRatio=1.5)}, "http.sampleRatio", "it must be a share from 0 to 1"),
    ({"http": HttpConfig(urlPathMaxLength=241)}, "http.urlPathMaxLength", "it must be 1 to 240"),
    ({"flows": FlowsConfig(connectTimeout=0.0)}, "flows.connectTimeout",
     "it must be more than 0 and at most 3600 seconds"),
])
def test_validate_rejects(changes, key, hint):
    with pytest.raises(FoveaError) as exc:
        dataclasses.replace(Config(), **changes).validate(REGISTRY)
    assert exc.value.problem == f"config key {key!r} is invalid"
    assert exc.value.hint == hint


@pytest.mark.parametrize("changes", [
    {"port": 1}, {"port": 65535}, {"interval": 0.001}, {"idleReads": 1},
    {"drops": DropsConfig(mapSize=1)}, {"drops": DropsConfig(mapSize=1 << 20)},
    {"tc": TcConfig(priority=65535)}, {"logLevel": "WARNING"}, {"plugins": ()},
    {"plugins": ("drops",)}, {"uplinks": ("eth0", "enp0s31f6", "veth-pod.1", "a" * 15)},
    {"http": HttpConfig(ports=())}, {"http": HttpConfig(ports=tuple(range(65520, 65536)))},
])
def test_validate_accepts_edges(changes):
    cfg = dataclasses.replace(Config(), **changes)
    assert cfg.validate(REGISTRY) is cfg


@pytest.mark.parametrize("plugins, bad", [
    (("nope",), "nope"),
    (("forward", "Drops"), "Drops"),
])
def test_validate_unknown_plugin(plugins, bad):
    with pytest.raises(FoveaError) as exc:
        Config(plugins=plugins).validate(REGISTRY)
    assert exc.value.problem == f"config key 'plugins': unknown plugin {bad!r}"
    assert exc.value.hint == f"known plugins: {', '.join(sorted(REGISTRY))}"


@pytest.mark.parametrize("name", ["eth 0", "a/b", "a" * 16, ""])
def test_validate_bad_uplink(name):
    with pytest.raises(FoveaError) as exc:
        Config(uplinks=(name,)).validate(REGISTRY)
    assert exc.value.problem == f"config key 'uplinks': {name!r} is not an interface name"


def test_registry():
    assert sorted(REGISTRY) == sorted(Config().enabled_plugins)  # every plugin is on by default
    assert all(cls.name == name for name, cls in REGISTRY.items())


def test_plugins_import_without_root_or_bcc():
    """Importing agent.plugins must not load bcc (it is imported only when compiling)."""
    code = ("import os, sys, agent.plugins; "
            "print(os.geteuid() != 0, sorted(agent.plugins.REGISTRY), 'bcc' in sys.modules)")
    cmd = [sys.executable, "-c", code]
    if os.geteuid() == 0:  # drop to nobody, so the import is checked as non-root too
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"True {sorted(REGISTRY)} False\n"


def test_invalid_yaml(tmp_path):
    path = write(tmp_path, "port: [1, 2\n")
    with pytest.raises(FoveaError) as exc:
        config_mod.load(path)
    assert exc.value.problem.startswith(f"config file {path} is not valid YAML: ")
    assert "\n" not in str(exc.value)
    assert exc.value.hint == "fix the file"


@pytest.mark.parametrize("make", [
    lambda tmp: tmp / "missing.yaml",
    lambda tmp: tmp / "no-such-dir" / "fovea.yaml",
    lambda tmp: tmp,  # a directory
])
def test_unreadable_file_named(tmp_path, make):
    path = str(make(tmp_path))
    with pytest.raises(FoveaError) as exc:
        config_mod.load(path)
    assert exc.value.problem.startswith(f"cannot read config file {path}: ")
    assert exc.value.hint == "check --config"


def test_missing_file_message():
    with pytest.raises(FoveaError) as exc:
        config_mod.load("/nonexistent.yaml")
    assert str(exc.value) == "cannot read config file /nonexistent.yaml: No such file or directory: check --config"


@pytest.mark.parametrize("node_name, env, expected", [
    ("cfg-node", "env-node", "cfg-node"),
    ("", "env-node", "env-node"),
    ("", None, "the-hostname"),
])
def test_node_name(monkeypatch, node_name, env, expected):
    if env is None:
        monkeypatch.delenv("NODE_NAME", raising=False)
    else:
        monkeypatch.setenv("NODE_NAME", env)
    monkeypatch.setattr(config_mod.socket, "gethostname", lambda: "the-hostname")
    assert Config(nodeName=node_name).node == expected


@pytest.mark.parametrize("text, key", [
    ("tls: {certFile: /etc/tls.crt}\n", "tls"),
    ("standalone: true\nmetricsAuth: {enabled: true}\n", "metricsAuth.enabled"),
    ("metricsAuth: {cacheTTL: -1}\n", "metricsAuth.cacheTTL"),
])
def test_exposure_settings_are_checked(tmp_path, text, key):
    with pytest.raises(FoveaError) as exc:
        config_mod.load(write(tmp_path, text)).validate(REGISTRY)
    assert exc.value.problem == f"config key {key!r} is invalid"


def dotted_keys(cls, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            keys += dotted_keys(hint, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def test_every_key_is_documented():
    doc = (REPO / "docs" / "configuration.md").read_text()
    missing = [k for k in dotted_keys(Config) if f"| `{k}` |" not in doc]
    assert not missing, f"docs/configuration.md lacks {missing}"


def test_http_ports_are_a_list_of_integers(tmp_path):
    assert config_mod.load(write(tmp_path, "http:\n  ports: [80, 8443]\n")).http.ports == (80, 8443)
    with pytest.raises(FoveaError) as exc:
        config_mod.load(write(tmp_path, "http:\n  ports: [\"80\"]\n"))
    assert exc.value.problem == "config key 'http.ports' must be a list of integers"


@pytest.mark.parametrize("plugins, enabled, started", [
    (("forward", "pods", "dns"), True, ("forward", "pods", "dns", "http")),
    (("forward", "pods", "dns"), False, ("forward", "pods", "dns")),
    (("drops",), True, ("drops",)),  # HTTP is parsed in the pods programs: nothing to carry it
    (("pods", "http"), False, ("pods",)),
])
def test_http_runs_when_enabled_beside_the_pods_plugin(plugins, enabled, started):
    cfg = Config(plugins=plugins, http=HttpConfig(enabled=enabled))
    assert cfg.enabled_plugins == started
