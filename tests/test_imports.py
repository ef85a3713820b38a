"""No import cycles in alignkit: every module imports alone in a fresh interpreter, and the import graph
(module-level AND function-level imports, read with ``ast``) has no cycle.

Graph rules (what Python executes):

* ``import a.b.c`` / ``from a.b.c import x``: an edge to ``a.b.c``; ``from a.b import c`` where ``a.b.c`` is a
  module: an edge to ``a.b.c`` (the package ``a.b`` is its parent, see next);
* importing ``a.b.c`` first runs the ``__init__`` of the packages ``a`` and ``a.b``: edges to those too,
  unless the importing module is inside that package (its parent package is already initialising);
* relative imports are resolved against the importing module's package;
* code that never runs as this module is left out: ``if TYPE_CHECKING:`` blocks and
  ``if __name__ == "__main__":`` blocks (run as the module ``__main__``, a different module object).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "alignkit"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_skipped_block(node: ast.If) -> bool:
    test = node.test
    if isinstance(test, ast.Name) and test.id == "TYPE_CHECKING":
        return True
    if isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING":
        return True
    return (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "__name__"
            and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in test.comparators))


def _imports(tree: ast.AST):
    """Every Import / ImportFrom node that can run when the module is imported or its functions are called."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_skipped_block(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _resolve(name: str) -> str | None:
    """The longest prefix of ``name`` that is an alignkit module."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, dict[str, int]]:
    """``{module: {imported module: line}}`` over alignkit (see the module docstring for the rules)."""
    graph: dict[str, dict[str, int]] = {m: {} for m in MODULES}
    for module, path in MODULES.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package
                    for _ in range(node.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    base = f"{anchor}.{base}" if base else anchor
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
            for target in targets:
                if not target.startswith("alignkit"):
                    continue
                resolved = _resolve(target)
                if resolved is None:
                    continue
                parts = resolved.split(".")
                for k in range(1, len(parts) + 1):  # the packages above it run first, then the module
                    dependency = ".".join(parts[:k])
                    inside = module == dependency or module.startswith(dependency + ".")
                    if dependency != module and not inside and dependency in MODULES:
                        graph[module].setdefault(dependency, node.lineno)
    return graph


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a cycle path."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in graph:
        if v not in index:
            visit(v)
    cycles = []
    for component in components:  # one concrete cycle through the component, for the message
        members = set(component)
        start = min(component)
        path, seen = [start], {start}
        while True:
            nxt = next(w for w in sorted(graph[path[-1]]) if w in members)
            if nxt in seen:
                cycles.append(path[path.index(nxt):] + [nxt])
                break
            path.append(nxt)
            seen.add(nxt)
    return cycles


def _describe(cycle: list[str], graph) -> str:
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 50 and sum(map(len, graph.values())) > 100  # the walk sees the package
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(_describe(c, graph) for c in cycles)


def test_the_walk_finds_a_cycle_and_its_hidden_edges():
    """The checker itself: a function-level import, a package __init__ and a relative import close a cycle."""
    graph = {"a": {"b": 3}, "b": {"c": 7}, "c": {"a": 9}, "d": {"a": 1}}
    (cycle,) = find_cycles(graph)
    assert cycle == ["a", "b", "c", "a"] and "c (line 9) -> a" in _describe(cycle, graph)
    assert find_cycles({"a": {"b": 1}, "b": {}}) == []


# Modules whose import needs an optional dependency this environment may lack (skipped when it is absent).
OPTIONAL = {"alignkit.rollout.vllm": "vllm", "alignkit.rollout.serve": "vllm"}

_CHILD = r"""
import importlib, os, sys, traceback
# the third-party libraries are loaded once in the parent; each child imports one alignkit module fresh
names = sys.stdin.read().split()
failed, running = [], {}
def reap():
    pid, status = os.wait()
    if status != 0:
        failed.append(running[pid])
    del running[pid]
for name in names:
    if len(running) >= max(1, min(4, os.cpu_count() or 1)):
        reap()
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    running[pid] = name
while running:
    reap()
print("FAILED", " ".join(sorted(failed)))
"""


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks a child per module")
def test_every_module_imports_alone_in_a_fresh_process():
    import importlib.util

    names = [m for m in MODULES if not m.endswith("__main__")  # the entry point runs the CLI on import
             and (m not in OPTIONAL or importlib.util.find_spec(OPTIONAL[m]) is not None)]
    preload = "import torch, transformers, datasets, accelerate, peft, trl, pyarrow, numpy, yaml, tqdm"
    proc = subprocess.run([sys.executable, "-c", preload + "\n" + _CHILD], input="\n".join(names), cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    failed = proc.stdout.strip().rpartition("FAILED")[2].split()
    assert not failed, f"these modules do not import alone: {failed}\n{proc.stderr[-6000:]}"
