"""Imports run one way: who may import whom among foldtune's modules, and no circles.

Every import counts, at module level or inside a function: a function-level import
only moves a circle from import time to call time. The modules are read with `ast`,
not imported, so the test is fast and sees imports that a run may never reach.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "foldtune"

# The layers below training: they serve training and inference alike, so they import
# nothing from training/ (shared pieces live in runtime/, files.py, run_layout.py...).
BELOW_TRAINING = ("foldtune.models", "foldtune.data", "foldtune.optim", "foldtune.runtime", "foldtune.inference",
                  "foldtune.checkpoint", "foldtune.run_layout", "foldtune.logs", "foldtune.files")
# The command line sits above training: training never reaches up into it.
ABOVE_TRAINING = ("foldtune.cli",)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted((SRC / PACKAGE).rglob("*.py"))}


def _imported(node: ast.AST, module: str, is_package: bool, known: set[str]) -> list[str]:
    """The foldtune modules that an import statement loads (the most specific one known)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        if node.level:      # relative: from the module's package, one level up per extra dot
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[:len(base) - (node.level - 1)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        # `from foldtune.x import y` loads foldtune.x.y when that is a module, else foldtune.x
        names = [f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in known else prefix for alias in node.names]
    else:
        return []
    found = []
    for name in names:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name:
            found.append(name)
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the foldtune modules it imports anywhere in its body.

    The top package `foldtune` is left out: Python imports it before any of its modules
    whatever they import, and its only imports are the lazy `foldtune.train` and
    `foldtune.predict` of its public face (an edge to it, for `__version__`, is no layer).
    """
    modules = _modules()
    known = set(modules)
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        if module == PACKAGE:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        targets = set()
        for node in ast.walk(tree):
            targets.update(_imported(node, module, path.name == "__init__.py", known))
        graph[module] = {target for target in targets if target not in (module, PACKAGE)}
    return graph


def _within(module: str, layers: tuple[str, ...]) -> bool:
    return any(module == layer or module.startswith(layer + ".") for layer in layers)


def forbidden_edges(graph: dict[str, set[str]]) -> list[str]:
    edges = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if _within(module, BELOW_TRAINING) and _within(target, ("foldtune.training",)):
                edges.append(f"{module} -> {target} (a layer below training imports training/)")
            if _within(module, ("foldtune.training",)) and _within(target, ABOVE_TRAINING):
                edges.append(f"{module} -> {target} (training/ imports the command line)")
    return edges


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None (depth-first search, colours)."""
    state: dict[str, str] = {}      # "open" while on the current path, "done" after
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module)
            if cycle:
                return cycle
    return None


def test_the_graph_sees_module_and_function_level_imports():
    graph = import_graph()
    # module level (trainer) and inside a function (cli's train command) both count
    assert "foldtune.config" in graph["foldtune.training.trainer"]
    assert "foldtune.distill" in graph["foldtune.cli"]


def test_the_rules_find_a_backward_import_and_a_circle():
    graph = {"foldtune.inference": {"foldtune.training.trainer"}, "foldtune.training.trainer": {"foldtune.cli"},
             "foldtune.cli": {"foldtune.inference"}}
    assert forbidden_edges(graph) == [
        "foldtune.inference -> foldtune.training.trainer (a layer below training imports training/)",
        "foldtune.training.trainer -> foldtune.cli (training/ imports the command line)",
    ]
    assert find_cycle(graph) == ["foldtune.cli", "foldtune.inference", "foldtune.training.trainer", "foldtune.cli"]


def test_no_layer_imports_against_the_direction():
    edges = forbidden_edges(import_graph())
    assert not edges, "imports against the layers:\n  " + "\n  ".join(edges)


def test_no_import_circles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "an import circle: " + " -> ".join(cycle)
