"""The command-line clients, every client command in one place: `fovea` (fovea.py) and
`kubectl-fovea` (kubectl.py). The runtime never imports this package."""

from __future__ import annotations

import sys

from agent.errors import FoveaError


def run_command(args, prefix: str) -> int:
    """Run a parsed command: a FoveaError is one line on stderr after `prefix` (exit 1),
    Ctrl-C exits 130 without a traceback."""
    try:
        return args.func(args)
    except FoveaError as e:
        print(f"{prefix}{e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
