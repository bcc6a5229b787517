"""The package layout: imports point one way between the wings, with no circles.

Floors, lowest first: ``kernels`` <- ``engine`` <- ``signals`` <- ``control`` <- the top level (``model``,
``registry``, ``grammar``, then ``model``) <- ``retrieval`` / ``evals`` / ``cli`` / ``demo``. A module may import its own wing and
any lower floor, never a higher one; the graph of module imports (top-level and function-level alike) has no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "kvagents"

FLOOR = {"kernels": 0, "engine": 1, "signals": 2, "control": 3, "registry": 4, "grammar": 4, "model": 5,
         "retrieval": 6, "evals": 7, "demo": 7, "serving": 7, "cli": 8, "__init__": 9}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every kvagents module ``path`` imports (absolute or relative, at any depth of the file)."""
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("kvagents"):
                continue
            found.add(mod)
            for alias in node.names:  # `from . import x` imports the module x
                if (PKG.parent / (mod + "." + alias.name).replace(".", "/")).with_suffix(".py").exists():
                    found.add(mod + "." + alias.name)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("kvagents")}
    found.discard(me)
    return found


MODULES = {_module_name(p): p for p in PKG.rglob("*.py")}


def _wing(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    mine = FLOOR[_wing(module)]
    for target in _imports(MODULES[module]):
        other = FLOOR[_wing(target)]
        assert other < mine or _wing(target) == _wing(module), f"{module} imports {target} (a higher wing)"


def test_kernels_import_only_kernels():
    for module, path in MODULES.items():
        if _wing(module) == "kernels":
            assert all(_wing(t) == "kernels" for t in _imports(path)), module


def test_engine_knows_no_concrete_component():
    """The engine's code (docstrings aside) names none of the components built on its protocol."""
    concrete = {"KVEmbedding", "TokenCoE", "LayerCoE", "ProbabilityScores", "ReasoningController", "KVProbeScore",
                "HardBudget", "EarlyStopWeak"}
    for path in (PKG / "engine").rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Name):
                names.add(node.id)
            elif isinstance(node, ast.Attribute):
                names.add(node.attr)
            elif isinstance(node, ast.ImportFrom):
                names |= {a.name for a in node.names}
        assert not names & concrete, (path.name, names & concrete)


def test_no_import_cycles():
    graph = {m: {t for t in _imports(p) if t in MODULES} for m, p in MODULES.items()}
    # a package imports its own modules to re-export them: those edges are not dependencies between modules
    graph = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in graph[m]:
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [m, t]))
            if t not in state:
                visit(t, stack + [m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


def test_no_top_level_integrations_package():
    import importlib.util

    assert importlib.util.find_spec("integrations") is None or not (PKG.parent / "integrations" / "__init__.py").exists()
