"""The kubectl-fovea executable: `kubectl fovea capture ...` and `kubectl fovea observe --node N`.

Observe: the agent serves its flow stream on 127.0.0.1:9811 of the node only; it runs
with hostNetwork, so `kubectl port-forward` to its pod reaches that port
(with the user's own credentials: RBAC's pods/portforward). The client is the
one of `fovea observe --server`.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import socket
import subprocess
import tempfile
import time

from agent.cli.capture import Api, add_capture_commands, agent_pod, run_capture
from agent.cli import run_command
from agent.cli.observe import add_observe_filters, run_observe
from agent.errors import FoveaError

OBSERVE_PORT = 9811
READY_TIMEOUT = 30.0  # seconds for kubectl to open the local port


def port_forward_command(kubectl: str, namespace: str, pod: str, local_port: int,
                         kubeconfig: str | None = None, context: str | None = None) -> list[str]:
    cmd = [kubectl]
    if kubeconfig:
        cmd += ["--kubeconfig", kubeconfig]
    if context:
        cmd += ["--context", context]
    return cmd + ["port-forward", "-n", namespace, f"pod/{pod}", f"{local_port}:{OBSERVE_PORT}",
                  "--address", "127.0.0.1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kubectl_says(log) -> str:
    log.seek(0)
    lines = [x.strip() for x in log.read().decode(errors="replace").splitlines() if x.strip()]
    return lines[-1] if lines else "no message"


@contextlib.contextmanager
def port_forward(cmd: list[str], local_port: int, popen=subprocess.Popen):
    """Run `kubectl port-forward` until the block ends (Ctrl-C included); yield its log file
    once the local port accepts connections."""
    with tempfile.TemporaryFile() as log:
        try:
            proc = popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
        except OSError as e:
            raise FoveaError(f"cannot run {cmd[0]}: {e.strerror or e}", "install kubectl, or put it on PATH") from None
        try:
            deadline = time.monotonic() + READY_TIMEOUT
            while True:
                if proc.poll() is not None:
                    raise FoveaError(f"kubectl port-forward failed: {_kubectl_says(log)}",
                                     "check the pod and your rights (pods/portforward)")
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", local_port), timeout=1):
                    break
                if time.monotonic() > deadline:
                    raise FoveaError(f"kubectl port-forward did not open 127.0.0.1:{local_port} in "
                                     f"{READY_TIMEOUT:.0f}s", "check the cluster connection")
                time.sleep(0.1)
            yield log
        finally:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def cmd_observe(args) -> int:
    kubectl = shutil.which("kubectl")
    if not kubectl:
        raise FoveaError("kubectl is not on PATH", "install kubectl: kubectl fovea observe runs kubectl port-forward")
    api = Api(args.kubeconfig, args.context, None)
    pod = agent_pod(api, args.agent_namespace, args.node).metadata.name
    local = free_port()
    cmd = port_forward_command(kubectl, args.agent_namespace, pod, local, args.kubeconfig, args.context)
    with port_forward(cmd, local) as log:
        try:
            code, error = run_observe(args, f"127.0.0.1:{local}"), None
        except (FoveaError, OSError) as e:
            code, error = 1, e
        # The local end answered; when the pod's did not, kubectl's message says why.
        failed = _forwarding_error(log)
    if failed:
        raise FoveaError(f"kubectl port-forward to {args.agent_namespace}/{pod} failed: {failed}",
                         f"is the agent serving its flow stream on port {OBSERVE_PORT} (observe.port)?")
    if isinstance(error, OSError):
        raise FoveaError(f"the flow stream through kubectl port-forward broke: {error.strerror or error}",
                         "run the command again")
    if error:
        raise error
    return code


def _forwarding_error(log) -> str:
    """kubectl's line for a connection it could not carry to the pod ('' if none)."""
    log.seek(0)
    lines = log.read().decode(errors="replace").splitlines()
    return next((x.strip() for x in reversed(lines) if "error forwarding port" in x), "")


def add_observe_command(sub) -> None:
    o = sub.add_parser(
        "observe", help="live flows, drops and DNS transactions of a node",
        description="Show what the Fovea agent on a node saw, through kubectl port-forward to its flow stream "
        "(127.0.0.1:9811 on the node). Example: kubectl fovea observe --node worker-3 -n shop -f. "
        "See docs/observe.md.",
    )
    o.add_argument("--node", required=True, help="the node whose agent to ask")
    o.add_argument("--agent-namespace", default="fovea-system", help="where the Fovea agents run (default fovea-system)")
    o.add_argument("--kubeconfig", metavar="FILE", help="kubeconfig (default: $KUBECONFIG, ~/.kube/config)")
    o.add_argument("--context", help="kubeconfig context to use")
    add_observe_filters(o)
    o.set_defaults(func=cmd_observe)


def kubectl_main(argv: list[str] | None = None) -> int:
    """The kubectl-fovea executable: `kubectl fovea capture ...` and `kubectl fovea observe`."""
    p = argparse.ArgumentParser(prog="kubectl fovea", description="Fovea from kubectl: packet captures and the "
                                "live flow stream of a node.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_capture_commands(sub)
    sub.choices["capture"].set_defaults(func=run_capture)
    add_observe_command(sub)
    return run_command(p.parse_args(argv), "error: ")  # kubectl's own prefix
