"""The `fovea` command."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from agent import __version__
from agent.cli import run_command
from agent.cli.observe import add_observe_filters
from agent.config import KernelConfig
from agent.errors import FoveaError

log = logging.getLogger("fovea")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _agent_overrides(args) -> dict:
    """CLI flags that were given, as config keys."""
    pairs = {
        "standalone": args.standalone or None,
        "nodeName": args.node_name,
        "kubeconfig": args.kubeconfig,
        "uplinks": args.uplink,
        "port": args.port,
        "interval": args.interval,
        "staticPods": args.static_pods,
        "logLevel": args.log_level,
        "observe.socket": args.observe_socket,
        "observe.port": args.observe_port,
        "lifecycle.keepAttached": args.keep_attached,
    }
    return {k: v for k, v in pairs.items() if v is not None}


def cmd_agent(args) -> int:
    from agent import config as config_mod
    from agent.plugins import REGISTRY
    from agent.runtime import Agent

    cfg = config_mod.load(args.config, _agent_overrides(args)).validate(REGISTRY)
    _setup_logging(cfg.logLevel)
    agent = Agent(cfg)
    signal.signal(signal.SIGTERM, lambda *_: agent.stop())
    signal.signal(signal.SIGINT, lambda *_: agent.stop())
    try:
        agent.start()
        agent.run()
    finally:
        kept = agent.close()
        log.info("stopped; %s", "the tc programs stay attached for the next agent" if kept
                 else "everything Fovea attached has been removed")
    return 0


def cmd_doctor(args) -> int:
    from agent.cli.doctor import report, run_checks

    checks = run_checks()
    print(report(checks))
    failed = [c for c in checks if not c.ok]
    print(f"\n{len(checks) - len(failed)} checks passed, {len(failed)} failed")
    return 1 if failed else 0


def cmd_cleanup(args) -> int:
    import shutil
    from pathlib import Path

    from pyroute2.netlink.exceptions import NetlinkError

    from agent import pins, tc

    try:
        removed = tc.remove_all()
        if pins.bpffs_mounted():
            removed += [f"pin {p}" for p in pins.remove_tree(Path(pins.ROOT))]
    except (OSError, NetlinkError) as e:
        raise FoveaError(f"cannot remove Fovea's tc programs and pins: {getattr(e, 'strerror', None) or e}",
                         "run it as root (CAP_BPF, CAP_NET_ADMIN), in the host's network namespace") from None
    for cached in ("programs", "kernel-headers"):  # compiled programs and prepared headers (kernel.cacheDir)
        directory = Path(args.cache_dir, cached)  # may be a mount point (the chart's): emptied, not removed
        try:
            for entry in sorted(directory.iterdir()) if directory.is_dir() else ():
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
                removed.append(f"cache {entry}")
        except OSError as e:
            raise FoveaError(f"cannot empty the cache {directory}: {e.strerror}",
                             "run it as root, with --cache-dir naming the agents' kernel.cacheDir") from None
    for what in removed:
        print(f"removed {what}")
    if not removed:
        print("nothing of Fovea's is attached or pinned here")
    return 0


def cmd_demo(args) -> int:
    from agent.lab.demo import run_demo

    _setup_logging(args.log_level or "warning")
    return run_demo(port=args.port, duration=args.duration)


def cmd_observe(args) -> int:
    from agent.cli.observe import run_observe

    return run_observe(args, args.server, args.socket)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fovea",
        description="Fovea: eBPF network observability for Kubernetes nodes.",
    )
    p.add_argument("--version", action="version", version=f"fovea {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    a = sub.add_parser(
        "agent", help="run the node agent (root)",
        description="Load the eBPF programs, count traffic and drops, serve Prometheus metrics. "
        "Flags override the config file.",
    )
    a.add_argument("--config", metavar="FILE", help="YAML config file (see docs/configuration.md)")
    a.add_argument("--standalone", action="store_true", default=None, help="plain Linux host, no Kubernetes API")
    a.add_argument("--kubeconfig", metavar="FILE", help="kubeconfig (default: in-cluster, or $KUBECONFIG)")
    a.add_argument("--node-name", metavar="NAME", help="this node's name (default: $NODE_NAME, else the host name)")
    a.add_argument("--uplink", metavar="IFACE", action="append",
                   help="an uplink to count forward traffic on; repeatable (default: the default routes' interfaces)")
    a.add_argument("--port", type=int, help="port for /metrics, /healthz, /readyz (default 9810)")
    a.add_argument("--static-pods", metavar="FILE",
                   help="standalone: YAML file naming pods by IP (see docs/configuration.md)")
    a.add_argument("--interval", type=float, metavar="SECONDS", help="seconds between kernel map reads (default 5)")
    a.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    a.add_argument("--observe-socket", metavar="PATH",
                   help="Unix socket of the flow stream (default /run/fovea/observe.sock; empty: none)")
    a.add_argument("--observe-port", type=int, metavar="PORT",
                   help="flow stream port on 127.0.0.1 (default 9811; 0: none)")
    a.add_argument("--keep-attached", action="store_true", default=None,
                   help="on stop, leave the tc programs attached and their maps pinned under /sys/fs/bpf/fovea, "
                   "so that the next agent continues every counter (config lifecycle.keepAttached)")
    a.set_defaults(func=cmd_agent)

    o = sub.add_parser(
        "observe", help="live flows, drops and DNS transactions from a running agent",
        description="Show the flows, drops and DNS transactions a running agent saw, from its flow stream "
        "(the Unix socket, or --server host:port, e.g. through kubectl port-forward). See docs/observe.md.",
    )
    o.add_argument("--socket", default="/run/fovea/observe.sock", metavar="PATH",
                   help="the agent's Unix socket (default /run/fovea/observe.sock)")
    o.add_argument("--server", metavar="HOST:PORT", help="connect over TCP instead (e.g. 127.0.0.1:9811)")
    add_observe_filters(o)
    o.set_defaults(func=cmd_observe)

    d = sub.add_parser("doctor", help="report what this kernel offers and what Fovea can do here",
                       description="Check root, BTF, tracefs and tracepoints, kernel headers, bcc, "
                       "and bpffs with any state pinned there.")
    d.set_defaults(func=cmd_doctor)

    c = sub.add_parser(
        "cleanup", help="remove every tc program and pin Fovea left on this node (root)",
        description="Remove what Fovea attached or pinned on this node: its clsact filters (named fovea-*) and "
        "tcx links (programs pod_from_pod, pod_to_pod, forward_ingress, forward_egress) on every interface "
        "of this network namespace, and everything under /sys/fs/bpf/fovea (counting maps, links and state "
        "kept by agents run with --keep-attached), and the compiled programs and prepared kernel headers "
        "cached under --cache-dir. Prints what it removed; exits 0, also when nothing was there. An agent still running stops counting, and removes the rest of its own when it stops. "
        "The Helm chart runs it when Fovea is uninstalled.",
    )
    c.add_argument("--cache-dir", default=KernelConfig().cacheDir,
                   help="the agents' kernel.cacheDir (default: %(default)s)")
    c.set_defaults(func=cmd_cleanup)

    m = sub.add_parser(
        "demo", help="run the agent on a demo node made of network namespaces (root)",
        description="Build demo pods and an outside world in network namespaces, send live traffic "
        "(some of it dropped), run the agent on it and show a live summary until Ctrl-C. "
        "Everything the demo creates is removed when it ends.",
    )
    m.add_argument("--port", type=int, default=9810, help="metrics port (default 9810)")
    m.add_argument("--duration", type=float, default=0, metavar="SECONDS", help="stop after this long (default: until Ctrl-C)")
    m.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    m.set_defaults(func=cmd_demo)

    from agent.cli.capture import add_capture_commands, run_capture

    add_capture_commands(sub)
    sub.choices["capture"].set_defaults(func=run_capture)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser().parse_args(argv), "fovea: error: ")


if __name__ == "__main__":
    sys.exit(main())
