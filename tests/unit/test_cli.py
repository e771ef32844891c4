"""The `fovea` command: help, and errors that stop it before anything touches the kernel."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent import __version__
from agent.cli import fovea as cli
from agent.plugins import REGISTRY

REPO = Path(__file__).resolve().parents[2]
FOVEA = Path(sys.executable).with_name("fovea")
if not FOVEA.exists():
    FOVEA = REPO / ".venv" / "bin" / "fovea"
AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
CAN_DROP_ROOT = os.geteuid() == 0 and shutil.which("setpriv") is not None

MISSING_CONFIG = (
    "fovea: error: cannot read config file /nonexistent.yaml: No such file or directory: check --config\n"
)
BAD_PORT = "fovea: error: config key 'port' is invalid: it must be a TCP port, 1-65535\n"


def fovea(*args: str, prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*(prefix or []), str(FOVEA), *args], capture_output=True, text=True,
                          cwd="/", timeout=60)


def users() -> list:
    """Run as whoever runs the tests, and as nobody as well when that is root."""
    out = [pytest.param(None, id="current-user")]
    if CAN_DROP_ROOT:
        out.append(pytest.param(AS_NOBODY, id="nobody"))
    return out


@pytest.fixture
def no_kernel(monkeypatch):
    """Fail the test if the agent gets as far as being built or touching the kernel."""
    import agent.runtime

    def forbidden(*_a, **_k):
        raise AssertionError("the agent went past the config check")

    monkeypatch.setattr(agent.runtime, "Agent", forbidden)
    monkeypatch.setattr(agent.runtime, "require_root", forbidden)
    monkeypatch.setattr(agent.runtime, "find_headers", forbidden)
    monkeypatch.setattr(agent.runtime, "Tracefs", forbidden)
    monkeypatch.setattr(agent.runtime, "Datapath", forbidden)


def test_fovea_help():
    r = fovea("--help")
    assert (r.returncode, r.stderr) == (0, "")
    assert r.stdout.startswith("usage: fovea [-h] [--version] COMMAND ...\n")
    for word in ("agent", "doctor", "demo", "--version"):
        assert word in r.stdout


def test_agent_help():
    r = fovea("agent", "--help")
    assert (r.returncode, r.stderr) == (0, "")
    assert r.stdout.startswith("usage: fovea agent ")
    for flag in ("--standalone", "--uplink IFACE", "--port PORT", "--config FILE", "--interval SECONDS",
                 "--node-name NAME", "--kubeconfig FILE", "--log-level"):
        assert flag in r.stdout, flag


def test_version():
    r = fovea("--version")
    assert (r.returncode, r.stdout, r.stderr) == (0, f"fovea {__version__}\n", "")


@pytest.mark.parametrize("prefix", users())
def test_missing_config_subprocess(prefix):
    r = fovea("agent", "--config", "/nonexistent.yaml", prefix=prefix)
    assert r.returncode == 1
    assert r.stdout == ""
    assert r.stderr == MISSING_CONFIG
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("fovea: error:")


@pytest.mark.parametrize("prefix", users())
def test_bad_port_subprocess(prefix):
    r = fovea("agent", "--port", "0", prefix=prefix)
    assert (r.returncode, r.stdout, r.stderr) == (1, "", BAD_PORT)


def test_missing_config_in_process(no_kernel, capsys):
    assert cli.main(["agent", "--config", "/nonexistent.yaml"]) == 1
    out, err = capsys.readouterr()
    assert (out, err) == ("", MISSING_CONFIG)


@pytest.mark.parametrize("args, file_text, stderr", [
    (["--port", "0"], None, BAD_PORT),
    (["--port", "70000"], None, BAD_PORT),
    (["--interval", "0"], None,
     "fovea: error: config key 'interval' is invalid: it must be a positive number of seconds\n"),
    (["--uplink", "eth0", "--uplink", "bad name"], None,
     "fovea: error: config key 'uplinks': 'bad name' is not an interface name: use names like eth0\n"),
    (["--config", "{file}"], "drops:\n  mapSiz: 10\n",
     "fovea: error: config key 'drops.mapSiz' is unknown: known keys here: eventsPerSecond, mapSize\n"),
    (["--config", "{file}"], "plugins: [forward, bogus]\n",
     f"fovea: error: config key 'plugins': unknown plugin 'bogus': known plugins: {', '.join(sorted(REGISTRY))}\n"),
    (["--config", "{file}", "--port", "0"], "port: 9000\n", BAD_PORT),  # the flag beats the file
    (["--config", "{file}"], "port: 0\n", BAD_PORT),
])
def test_config_errors_in_process(no_kernel, capsys, tmp_path, args, file_text, stderr):
    path = tmp_path / "fovea.yaml"
    if file_text is not None:
        path.write_text(file_text)
    argv = ["agent", *(a.format(file=path) for a in args)]
    assert cli.main(argv) == 1
    assert capsys.readouterr() == ("", stderr)


def test_invalid_yaml_is_one_line(no_kernel, capsys, tmp_path):
    path = tmp_path / "fovea.yaml"
    path.write_text("port: [1, 2\n")
    assert cli.main(["agent", "--config", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"fovea: error: config file {path} is not valid YAML: ")
    assert err.endswith(": fix the file\n") and err.count("\n") == 1


@pytest.mark.parametrize("args", [
    [],
    ["agent", "--port", "abc"],
    ["agent", "--interval", "soon"],
    ["agent", "--log-level", "verbose"],
    ["nope"],
])
def test_usage_errors_exit_2(args):
    r = fovea(*args)
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr.startswith("usage: fovea")
    assert "fovea" in r.stderr.splitlines()[-1] and "error:" in r.stderr.splitlines()[-1]


@pytest.mark.parametrize("argv, overrides", [
    (["agent"], {}),
    (["agent", "--standalone"], {"standalone": True}),
    (["agent", "--uplink", "eth0", "--uplink", "eth1", "--port", "9000", "--interval", "2.5",
      "--node-name", "n1", "--kubeconfig", "/k", "--log-level", "debug"],
     {"uplinks": ["eth0", "eth1"], "port": 9000, "interval": 2.5, "nodeName": "n1",
      "kubeconfig": "/k", "logLevel": "debug"}),
])
def test_flags_become_config_keys(argv, overrides):
    args = cli.build_parser().parse_args(argv)
    assert cli._agent_overrides(args) == overrides


@pytest.mark.skipif(os.geteuid() == 0 and not CAN_DROP_ROOT,
                    reason="needs to run as non-root (setpriv is not available to drop root)")
def test_valid_config_as_non_root_says_root_is_needed():
    r = fovea("agent", "--standalone", "--log-level", "error", "--port", "19810",
              prefix=AS_NOBODY if os.geteuid() == 0 else None)
    assert r.returncode == 1
    assert r.stdout == ""
    assert r.stderr == (
        "fovea: error: fovea agent must run as root (loading eBPF programs and tc filters needs "
        "CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN): run it with sudo, or through the DaemonSet\n"
    )
