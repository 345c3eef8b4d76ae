"""The package's layers import only downward (docs: DESIGN.md, "The package: layers that import only downward").

Every module under src/icon2_lens is parsed with `ast` (module-level and function-level imports, relative and
absolute, TYPE_CHECKING blocks included), the import graph between icon2_lens modules is built, and:

(a) an import goes to a lower layer, or within one layer only where that layer allows it, and the whole graph
    is acyclic;
(b) no module imports a private name (``_x``) from another icon2_lens module;
(c) math/ imports only torch, jaxtyping, the standard library and itself; runs.io and runs.names only the
    standard library.

The same layers are an import-linter contract in pyproject.toml (``lint-imports``, run by .ci/run); this test
is the one that also sees the private names and the stdlib-only modules, and it needs nothing installed.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import pytest

import icon2_lens

PKG = Path(icon2_lens.__file__).parent
ROOT = "icon2_lens"

#: Lowest first. A module may import any module of a lower layer; within a layer only where ``WITHIN`` says so.
#: Where this differs from the sketch in DESIGN.md, on purpose:
#: - reports sits at the bottom with the loaders (it builds tables and figures from plain data and imports no
#:   stage), so that the stage modules and runs.costs (cost_table) can delegate to it;
#: - llama_cpp (the control-vector GGUF format: write, read, the command line) is a loader-level leaf that knows
#:   no DirectionSet, so that directions (DirectionSet.export_gguf) can use it;
#: - runs.io and runs.names are stdlib-only leaves, below everything: the stages and models' neighbours write
#:   files through them; the rest of runs/ (the batch runner, shards, costs) sits above gen/, whose `Generation`
#:   and cache reading it uses;
#: - training is a stage module like the others (it uses runs.costs and runs.io);
#: - hardware (what this machine offers: the device check, precision) is a torch-only leaf beside math, so that
#:   models.load_model checks the device before it loads anything;
#: - errors (the one bad-input error type and the readers that name a file) is below everything, stdlib-only
#:   apart from a lazy yaml import, so every reader can raise it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("L00 errors", ("errors",)),
    ("L0 pure", ("math", "runs.io", "runs.names", "hardware")),
    ("L1 loaders and reports", ("models", "prompts", "criteria", "instructions", "reports", "llama_cpp")),
    ("L2 activations", ("activations",)),
    ("L3 gen", ("gen",)),
    ("L4 runs", ("runs",)),
    ("L5 stages", ("directions", "steering", "layers", "scoring", "judges", "synthesis", "pairs", "calibration",
                   "evaluation", "training", "preference", "controls", "serve", "reward_probe", "baselines", "distill")),
    ("L6 pipeline", ("pipeline",)),
    ("L7 cli", ("cli",)),
]
#: Layers whose modules may import each other (acyclically): the stage modules build on each other, and a
#: package's modules (math/, gen/, runs/, pipeline/, cli/) on their siblings.
WITHIN = {"L0 pure", "L3 gen", "L4 runs", "L5 stages", "L6 pipeline", "L7 cli"}
#: Within L0 only a package's own modules (math.* on math.*): math, runs.io and runs.names are independent.
#: Within L1, reports may import math only (a lower layer anyway): the loaders do not import each other.

#: Known exceptions to (b), each with its owner's TODO. Keep this empty.
PRIVATE_IMPORT_EXCEPTIONS: set[tuple[str, str, str]] = set()

PURE = {"math": {"torch", "jaxtyping"}, "runs.io": set(), "runs.names": set(), "hardware": {"torch"}, "errors": {"yaml"}}


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    line: int
    names: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.src} -> {self.dst} (line {self.line})"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` names (relative imports resolved against ``module``)."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: Path, text: str | None = None) -> tuple[list[Edge], list[tuple[str, int]]]:
    """(edges to icon2_lens modules, (top-level external module, line) pairs) of one module."""
    edges, external = [], []
    text = path.read_text(encoding="utf-8") if text is None else text
    for node in ast.walk(ast.parse(text, filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == ROOT or alias.name.startswith(ROOT + "."):
                    edges.append(Edge(module, _known(alias.name), node.lineno, ()))
                else:
                    external.append((alias.name.split(".")[0], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, path, node)
            if not (target == ROOT or target.startswith(ROOT + ".")):
                external.append((target.split(".")[0], node.lineno))
                continue
            for alias in node.names:  # `from . import gen` imports the module icon2_lens.gen
                sub = f"{target}.{alias.name}"
                if sub in MODULES:
                    edges.append(Edge(module, sub, node.lineno, ()))
                else:
                    edges.append(Edge(module, _known(target), node.lineno, (alias.name,)))
    return edges, external


def _known(name: str) -> str:
    assert name in MODULES, f"import of {name}, which is not a module of {ROOT}"
    return name


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def _rel(module: str) -> str:
    return module[len(ROOT) + 1:] if module.startswith(ROOT + ".") else ""


def _group(module: str, groups: tuple[str, ...]) -> str | None:
    """The longest entry of ``groups`` that ``module`` is or lies under."""
    rel = _rel(module)
    hits = [g for g in groups if rel == g or rel.startswith(g + ".")]
    return max(hits, key=len) if hits else None


def layer_of(module: str) -> tuple[int, str, str] | None:
    """(layer index, layer name, group) of a module; None for the top (icon2_lens/__init__)."""
    if module == ROOT:
        return None
    best = None
    for i, (name, groups) in enumerate(LAYERS):
        g = _group(module, groups)
        if g is not None and (best is None or len(g) > len(best[2])):
            best = (i, name, g)
    assert best is not None, f"{module} is in no layer; add it to LAYERS in {__file__}"
    return best


def test_every_module_is_in_a_layer():
    missing = [m for m in MODULES if m != ROOT and layer_of(m) is None]
    assert not missing


def _layering_violations() -> list[str]:
    bad = []
    for module, (edges, _) in GRAPH.items():
        src = layer_of(module)
        if src is None:  # icon2_lens/__init__ may import anything
            continue
        for e in edges:
            if e.dst == module:
                continue
            dst = layer_of(e.dst)
            if dst is None:
                bad.append(f"{e}: nothing imports the package root")
            elif dst[0] > src[0]:
                bad.append(f"{e}: upward, {src[1]} imports {dst[1]}")
            elif dst[0] == src[0]:
                if src[1] not in WITHIN:
                    bad.append(f"{e}: sideways within {src[1]}")
                elif src[1] == "L0 pure" and src[2] != dst[2]:
                    bad.append(f"{e}: sideways within {src[1]} (math, runs.io and runs.names are independent)")
    return bad


def test_imports_only_go_down_the_layers():
    bad = _layering_violations()
    assert not bad, "imports against the layering (see LAYERS in this test):\n  " + "\n  ".join(bad)


def test_import_graph_is_acyclic():
    graph = {m: sorted({e.dst for e in GRAPH[m][0] if e.dst != m}) for m in MODULES}
    # A package's __init__ re-exports its modules: edges into the package root are what the importer sees, so
    # they count (a module importing its own package's __init__ is a cycle through it).
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in graph[m]:
            if state.get(n) == 1:
                cycle = [*stack[stack.index(n):], n]
                lines = [str(next(e for e in GRAPH[a][0] if e.dst == b)) for a, b in pairwise(cycle)]
                cycles.append(" ; ".join(lines))
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n  " + "\n  ".join(cycles)


def test_no_private_names_imported_from_another_module():
    bad = []
    for module, (edges, _) in GRAPH.items():
        for e in edges:
            if e.dst == module:
                continue
            for name in e.names:
                if name.startswith("_") and not name.startswith("__") \
                        and (module, e.dst, name) not in PRIVATE_IMPORT_EXCEPTIONS:
                    bad.append(f"{e}: imports private {name}")
    assert not bad, "private names imported across modules (make them public or move them):\n  " + "\n  ".join(bad)


def test_private_import_exceptions_are_still_needed():
    seen = {(m, e.dst, n) for m, (edges, _) in GRAPH.items() for e in edges for n in e.names}
    stale = PRIVATE_IMPORT_EXCEPTIONS - seen
    assert not stale, f"delete these entries of PRIVATE_IMPORT_EXCEPTIONS: {sorted(stale)}"


@pytest.mark.parametrize("group", sorted(PURE))
def test_pure_modules_import_only_the_standard_library(group):
    allowed = PURE[group] | {"__future__"}
    bad = []
    for module, (_, external) in GRAPH.items():
        if _group(module, (group,)) != group:
            continue
        for top, line in external:
            if top not in allowed and top not in sys.stdlib_module_names:
                bad.append(f"{module} -> {top} (line {line})")
    assert not bad, f"{group} may import only {sorted(allowed) or 'nothing'} and the standard library:\n  " + \
        "\n  ".join(bad)


def test_reports_imports_only_math_of_the_package():
    bad = [str(e) for e in GRAPH[f"{ROOT}.reports"][0] if _group(e.dst, ("math",)) != "math"]
    assert not bad, "reports builds tables and figures from plain data; it may import icon2_lens.math only:\n  " + \
        "\n  ".join(bad)


def test_the_checker_sees_an_upward_import_inside_a_function():
    """The parser catches what the checks rely on: a relative import inside a function, and its names."""
    text = "def f():\n    from ..pipeline import run_pipeline\n    from ..models import _resolve_source\n"
    edges, _ = _imports(f"{ROOT}.math.fake", PKG / "math" / "fake.py", text)
    assert [str(e) for e in edges] == [f"{ROOT}.math.fake -> {ROOT}.pipeline (line 2)",
                                       f"{ROOT}.math.fake -> {ROOT}.models (line 3)"]
    assert edges[1].names == ("_resolve_source",)
    assert layer_of(f"{ROOT}.pipeline")[0] > layer_of(f"{ROOT}.math.fake")[0]
