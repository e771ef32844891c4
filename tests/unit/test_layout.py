"""The package layout (DESIGN.md, How it fits together), read from the source with `ast`:
no import cycles, the runtime never imports a CLI or the lab, and the agent's core
reaches `capture` only through capture.service."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("agent", "capture")
CAPTURE_INTERFACE = "capture.service"
ENTRY_POINTS = {"agent.__main__"}  # `python -m agent`, like the console scripts: runs the CLI


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _type_checking_only(node: ast.AST, parents: dict) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports anywhere in its body (function-level imports too)."""
    tree = ast.parse(path.read_text(), str(path))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every broken layout rule, one line each."""
    bad = []
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as e:
        bad.append("import cycle: " + " -> ".join(e.args[1]))
    for mod, targets in sorted(graph.items()):
        for t in sorted(targets):
            if _within(t, "agent.cli") and not _within(mod, "agent.cli") and mod not in ENTRY_POINTS:
                bad.append(f"{mod} imports the CLI module {t}")
            if _within(t, "agent.lab") and not (_within(mod, "agent.lab") or _within(mod, "agent.cli")):
                bad.append(f"{mod} imports the lab module {t}")
            core = _within(mod, "agent") and not (_within(mod, "agent.cli") or _within(mod, "agent.lab"))
            if core and _within(t, "capture") and t != CAPTURE_INTERFACE:
                bad.append(f"{mod} imports {t}: the agent reaches capture only through {CAPTURE_INTERFACE}")
    return bad


def test_the_layout_holds():
    graph = import_graph()
    assert {"agent.runtime", "agent.cli.fovea", "agent.cli.kubectl", "agent.lab.netlab",
            CAPTURE_INTERFACE} <= set(graph)
    assert violations(graph) == []


def test_the_runtime_reaches_capture_through_the_interface():
    assert CAPTURE_INTERFACE in import_graph()["agent.runtime"]


@pytest.mark.parametrize("graph, broken", [
    ({"agent.a": {"agent.b"}, "agent.b": {"agent.c"}, "agent.c": {"agent.a"}}, "import cycle: agent."),
    ({"agent.runtime": {"agent.cli.observe"}, "agent.cli.observe": set()},
     "agent.runtime imports the CLI module agent.cli.observe"),
    ({"capture.node": {"agent.cli.capture"}, "agent.cli.capture": set()},
     "capture.node imports the CLI module agent.cli.capture"),
    ({"agent.runtime": {"agent.lab.netlab"}, "agent.lab.netlab": set()},
     "agent.runtime imports the lab module agent.lab.netlab"),
    ({"agent.doctor": {"capture.libpcap"}, "capture.libpcap": set()},
     "agent.doctor imports capture.libpcap: the agent reaches capture only through capture.service"),
])
def test_each_broken_rule_is_named(graph, broken):
    assert any(v.startswith(broken) for v in violations(graph)), violations(graph)


def test_relative_and_function_level_imports_count(tmp_path):
    src = tmp_path / "agent" / "x.py"
    src.parent.mkdir()
    src.write_text("from . import y\n\ndef f():\n    from capture import engine\n")
    known = {"agent", "agent.x", "agent.y", "capture", "capture.engine"}
    # resolve relative to a fake root by naming the module directly
    assert imports_of("agent.x", src, known) == {"agent.y", "capture.engine"}
