"""The `fovea` command."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from agent import __version__
from agent.cli.observe import add_observe_filters
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
        agent.close()
        log.info("stopped; everything Fovea attached has been removed")
    return 0


def cmd_doctor(args) -> int:
    from agent.cli.doctor import report, run_checks

    checks = run_checks()
    print(report(checks))
    failed = [c for c in checks if not c.ok]
    print(f"\n{len(checks) - len(failed)} checks passed, {len(failed)} failed")
    return 1 if failed else 0


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
                       description="Check root, BTF, tracefs and tracepoints, kernel headers and bcc.")
    d.set_defaults(func=cmd_doctor)

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
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FoveaError as e:
        print(f"fovea: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
