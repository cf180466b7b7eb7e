"""The package's shape: an import graph without circles, the benchmark harness outside the
product, one error hierarchy, a command table that lists every command."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest
from helpers import REPO, SRC, env

PACKAGE = os.path.join(SRC, "chatlm")


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, SRC)[:-3].replace(os.sep, ".")
    return rel.removesuffix(".__init__")


def import_graph() -> dict[str, set[str]]:
    """``module -> chatlm modules it imports`` (every import statement, lazy ones included)."""
    modules = {}
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                modules[_module_name(path)] = path
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for n in names:
                if n.startswith("chatlm"):
                    # the deepest module of ours the name refers to
                    while n and n not in modules:
                        n = n.rpartition(".")[0]
                    if n and n != mod:
                        graph[mod].add(n)
    # importing a.b.c runs a/__init__ and a/b/__init__ too
    for mod in list(graph):
        for dep in list(graph[mod]):
            parts = dep.split(".")
            for i in range(1, len(parts)):
                parent = ".".join(parts[:i])
                if parent in graph and parent != mod and not mod.startswith(parent + "."):
                    graph[mod].add(parent)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_the_import_graph_has_no_circle():
    graph = import_graph()
    assert len(graph) > 20
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_product_never_imports_the_benchmark_harness():
    graph = import_graph()
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                text = open(os.path.join(root, name), encoding="utf-8").read()
                assert "import bench" not in text and "from bench" not in text, name
    # and a fit process has not loaded it (nor the legacy engines) once the CLI is imported
    code = ("import sys; import chatlm.train.cli, chatlm.infer.predict, chatlm.train.plan; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('bench', 'llamafactory', 'trl', 'fire')); "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert graph  # (the static check above covered every module)


def test_every_user_error_is_a_chatlm_error():
    from chatlm import errors

    for name in ("ConfigError", "DataError", "ModelLoadError", "CheckpointError", "DiskSpaceError"):
        assert issubclass(getattr(errors, name), errors.ChatLMError), name
    import chatlm.data as data

    assert data.DataError is errors.DataError


@pytest.mark.parametrize("args", [[], ["--help"]])
def test_chatlm_help_lists_every_command(args):
    from chatlm.commands import COMMANDS

    proc = subprocess.run([sys.executable, "-m", "src", *args], cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name, command in COMMANDS.items():
        assert f"  {name} " in proc.stdout and command.help in proc.stdout
    assert "lightning" not in proc.stdout.lower()


def test_an_unknown_command_is_one_line():
    proc = subprocess.run([sys.executable, "-m", "src", "trian"], cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "unknown command 'trian'" in proc.stderr
