"""The agent image, built with podman from the Dockerfile (scripts/image) and run the way
the chart runs it: the security context, host namespaces and every volume are taken
from the chart's default render (the real Helm engine), not copied by hand. The lab
node's host header directories (/lib/modules, /usr/src) are empty, the normal case on
managed node images, so the agent must use the image's own headers.

Checked: ready, every default plugin up, `fovea doctor` passes inside the image, lab
traffic counted exactly; SIGTERM leaves the programs attached (the chart sets
lifecycle.keepAttached) and the chart's uninstall hook (its cleanup Job, run the same way)
removes every program and pin; then the agent run with each granted capability removed in
turn fails loudly, names that capability and leaves nothing attached.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests

from agent.config import Config, load
from agent.pins import ROOT
from tests.conftest import REPO, RunningAgent, free_port, node_lab, require, tc_filters, tcx_program_names

pytestmark = pytest.mark.kernel

_spec = importlib.util.spec_from_file_location("manifests", REPO / "scripts" / "manifests.py")
manifests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(manifests)

# On this kind of host crun rejects the cgroup layout and limits cannot be raised.
PODMAN_ENV = {**os.environ, "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF",
                                                              str(REPO / "scripts" / "containers.conf"))}
# Host paths the lab node has empty (headers) or that the test keeps to itself (captures, the program cache).
EMPTY_HOST_DIRS = ("/lib/modules", "/usr/src", "/var/lib/fovea/captures", "/var/cache/fovea/programs")
RENDER = manifests.render()  # the chart's defaults, with the real Helm engine
(DAEMONSET,) = [d for d in RENDER if d["kind"] == "DaemonSet"]
(CLEANUP_JOB,) = [d for d in RENDER if d["kind"] == "Job"]  # the pre-delete hook: `fovea cleanup`
CHART_CAPABILITIES = DAEMONSET["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"]


@pytest.fixture(scope="module")
def image(root) -> str:
    for tool in ("podman", "buildah", "runc", "mmdebstrap"):
        require(shutil.which(tool) is not None, f"{tool} (scripts/bootstrap installs it)")
    # Reused when its inputs are unchanged (a content-hash tag): fast with a warm cache.
    built = subprocess.run([sys.executable, str(REPO / "scripts" / "image")], env=PODMAN_ENV,
                           capture_output=True, text=True, timeout=3600)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    return built.stdout.split()[-1]


@pytest.fixture(scope="module", autouse=True)
def node_bpffs(root):
    """bpffs at /sys/fs/bpf on the host, as on a Kubernetes node (systemd mounts it): the
    chart's hostPath must be the host's bpffs for kept programs to outlive the agent's
    container. Mounted for these tests when the host has none, and unmounted after."""
    mounted = os.path.ismount("/sys/fs/bpf")
    if not mounted:
        subprocess.run(["mount", "-t", "bpf", "bpf", "/sys/fs/bpf"], check=True)
    yield
    if not mounted:
        subprocess.run(["umount", "/sys/fs/bpf"], check=False)


@pytest.fixture(scope="module")
def chart():
    (cm,) = [d for d in RENDER if d["kind"] == "ConfigMap"]
    return DAEMONSET["spec"]["template"]["spec"], cm["data"]


@pytest.fixture(scope="module")
def node(tmp_path_factory, chart):
    """Directories standing in for the node's: an empty one for each of EMPTY_HOST_DIRS,
    one per emptyDir volume, and the ConfigMap's files."""
    base = tmp_path_factory.mktemp("node")
    spec, config = chart
    dirs = {path: base / path.strip("/").replace("/", "-") for path in EMPTY_HOST_DIRS}
    for v in spec["volumes"]:
        if "emptyDir" in v:
            dirs[v["name"]] = base / ("emptydir-" + v["name"])
    (base / "config").mkdir()
    for name, text in config.items():
        (base / "config" / name).write_text(text)
    dirs["config"] = base / "config"
    for d in dirs.values():
        d.mkdir(exist_ok=True)
    return dirs


def podman_run(image: str, chart, node: dict[str, Path], name: str, without: tuple[str, ...] = ()) -> list[str]:
    """`podman run` for the chart's agent container; `without`: granted capabilities left out."""
    spec, _ = chart
    (c,) = spec["containers"]
    sc = c["securityContext"]
    assert sc["privileged"] is False and sc["capabilities"]["drop"] == ["ALL"]
    # podman's default seccomp profile is its runtime default.
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    args = ["podman", "run", "--rm", "--name", name, "--cap-drop=ALL"]
    caps = [cap for cap in sc["capabilities"]["add"] if cap not in without]
    if caps:
        args.append("--cap-add=" + ",".join(caps))
    if sc.get("readOnlyRootFilesystem"):
        args += ["--read-only", "--read-only-tmpfs=false"]  # nothing writable the pod would not have
    if spec.get("hostNetwork"):
        args.append("--network=host")
    if spec.get("hostPID"):
        args.append("--pid=host")
    volumes = {v["name"]: v for v in spec["volumes"]}
    for m in c["volumeMounts"]:
        v = volumes[m["name"]]
        if "hostPath" in v:
            source = node.get(v["hostPath"]["path"], v["hostPath"]["path"])
        elif "emptyDir" in v:
            source = node[v["name"]]
        elif "configMap" in v:
            source = node["config"]
        else:
            raise AssertionError(f"volume {v} of a kind this test does not know")
        options = ["ro" if m.get("readOnly") else "rw"]
        if m.get("mountPropagation") == "HostToContainer":
            options.append("rslave")
        args += ["-v", f"{source}:{m['mountPath']}:{','.join(options)}"]
    fields = {"spec.nodeName": name, "metadata.namespace": "fovea-system"}
    for e in c.get("env", []):
        args += ["-e", f"{e['name']}={fields[e['valueFrom']['fieldRef']['fieldPath']]}"]
    return [*args, image, *c["args"]]


FOVEA_PROGRAMS = ("forward_ingress", "forward_egress", "pod_from_pod", "pod_to_pod")


def uninstall_hook(image: str, node: dict[str, Path]) -> str:
    """The chart's cleanup Job (`fovea cleanup` with its own security context and volumes),
    run the way the agent is run: what `helm uninstall` does on each node."""
    run = podman_run(image, (CLEANUP_JOB["spec"]["template"]["spec"], {}), node, f"fovea-cleanup-{free_port()}")
    done = subprocess.run(run, env=PODMAN_ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not Path(ROOT).exists() or not any(Path(ROOT).iterdir()), list(Path(ROOT).iterdir())
    return done.stdout


def attached(ifname: str) -> str:
    """Fovea's tc programs on ifname, either way: clsact filters as tc shows them, and tcx programs by name."""
    filters = [line for hook in ("ingress", "egress")
               for line in tc_filters(ifname, hook).splitlines(True) if "fovea" in line]
    links = [f"{name}\n" for hook in ("ingress", "egress")
             for name in tcx_program_names(ifname, hook) if name in FOVEA_PROGRAMS]
    return "".join(filters + links)


def test_the_image_on_a_node_without_headers(image, chart, node):
    spec, _ = chart
    with node_lab(pods=1, ipv6=False) as lab:
        name = f"fovea-image-{free_port()}"
        agent = RunningAgent("--uplink", lab.uplink, "--node-name", name, env=PODMAN_ENV,
                             command=tuple(podman_run(image, chart, node, name)))
        try:
            m = agent.scrape()
            for plugin in Config().enabled_plugins:  # the defaults
                assert m.get("fovea_agent_plugin_up", plugin=plugin) == 1, (plugin, agent.output())
            assert "the image's own headers" in agent.output()

            run = podman_run(image, chart, node, name + "-doctor")
            doctor = subprocess.run(run[:run.index(image) + 1] + ["doctor"], env=PODMAN_ENV,
                                    capture_output=True, text=True, timeout=300)
            assert doctor.returncode == 0, doctor.stdout + doctor.stderr
            assert "the image's own headers" in doctor.stdout

            before = agent.settled("fovea_forward_packets_total", direction="egress")
            sent = 23
            out = lab.run(lab.pods[0].netns, "ping", "-4", "-c", str(sent), "-i", "0.002", "-q",
                          lab.world.ipv4).stdout
            assert f"{sent} received" in out
            assert agent.settled("fovea_forward_packets_total", direction="egress") - before == sent
            assert attached(lab.uplink)
        finally:
            code = agent.stop()
            subprocess.run(["podman", "rm", "-f", "--ignore", name], env=PODMAN_ENV, capture_output=True)
        assert code == 0, agent.output()
        interfaces = [lab.uplink] + [p.host_if for p in lab.pods]
        assert load(str(node["config"] / "config.yaml")).lifecycle.keepAttached  # the chart's default
        for ifname in interfaces:  # kept for the next agent
            assert attached(ifname), ifname
        removed = uninstall_hook(image, node)
        for ifname in interfaces:
            assert attached(ifname) == "", (ifname, removed)


# The kernel lets CAP_SYS_ADMIN stand in for these (bpf_capable(), perfmon_capable()): each is
# removed together with it, or nothing would be missing.
STAND_IN = {"BPF": "SYS_ADMIN", "PERFMON": "SYS_ADMIN"}
# Needed only by a feature the lab's default agent does not use (captures; namespaces found
# only under /proc); `fovea doctor` fails and names them. SYS_RESOURCE: kernels before 5.11.
FEATURE_ONLY = {"NET_RAW", "SYS_PTRACE"}
NOT_NEEDED_HERE = {"SYS_RESOURCE"}


def run_without(image, chart, node, lab, caps: tuple[str, ...]) -> tuple[int | None, str, str]:
    """The agent without caps: (its exit code or None if still running, /readyz's status and
    body once it answers 503 or 200, everything it printed)."""
    name = f"fovea-nocap-{free_port()}"
    port = free_port()
    args = podman_run(image, chart, node, name, without=caps) + [
        "--standalone", "--node-name", name, "--port", str(port), "--uplink", lab.uplink,
        "--interval", "1", "--observe-port", str(free_port()), "--observe-socket", f"/tmp/observe-{port}.sock"]
    readyz = ""
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=PODMAN_ENV)
        try:
            deadline = time.monotonic() + 120
            while proc.poll() is None and time.monotonic() < deadline and not readyz:
                try:
                    r = requests.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
                    if r.status_code in (200, 503):
                        time.sleep(2)  # plugins that are still starting settle
                        r = requests.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
                        readyz = f"{r.status_code} {r.text}"
                except requests.RequestException:
                    time.sleep(0.5)
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=60)
            subprocess.run(["podman", "rm", "-f", "--ignore", name], env=PODMAN_ENV, capture_output=True)
        log.seek(0)
        return proc.returncode, readyz, log.read()


def doctor_without(image, chart, node, caps: tuple[str, ...]) -> subprocess.CompletedProcess:
    run = podman_run(image, chart, node, f"fovea-doctor-{free_port()}", without=caps)
    return subprocess.run(run[:run.index(image) + 1] + ["doctor"], env=PODMAN_ENV,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("cap", CHART_CAPABILITIES)
def test_each_capability_removed_is_a_loud_named_failure(image, chart, node, cap):
    caps = (cap, STAND_IN[cap]) if cap in STAND_IN else (cap,)
    named = f"CAP_{cap}"
    doctor = doctor_without(image, chart, node, caps)
    with node_lab(pods=1, ipv6=False) as lab:
        code, readyz, output = run_without(image, chart, node, lab, caps)
        interfaces = [lab.uplink] + [p.host_if for p in lab.pods]
        left = {ifname: attached(ifname) for ifname in interfaces}
        uninstall_hook(image, node)  # an agent that could run kept its programs (keepAttached)
        for ifname in interfaces:
            assert attached(ifname) == "", ifname
    said = f"readyz: {readyz}\nexit: {code}\n{output[-3000:]}\ndoctor:\n{doctor.stdout}{doctor.stderr}"
    if cap not in NOT_NEEDED_HERE | FEATURE_ONLY:  # the agent could not run: it left nothing
        assert not any(left.values()), (left, said)
    if cap in NOT_NEEDED_HERE:
        assert readyz.startswith("200") and doctor.returncode == 0, said
    elif cap in FEATURE_ONLY:
        assert doctor.returncode != 0, said  # loud where it is checked for
    else:
        # The agent is not ready (or exits) and says which capability it lacks.
        assert readyz.startswith("503") or code not in (0, None), said
        assert named in readyz + output, said
    assert named in doctor.stdout, said  # doctor names each capability it finds missing
