"""The import direction of docs/architecture.md, checked on the source (AST only: nothing is imported).

    cli -> commands -> engine -> models / metrics / data / losses / viz -> errors, fsutil, jsonio

(a) no module imports a layer above its own (top-level and function-level imports alike), (b) no import cycle
between modules (runtime top-level imports), (c) no function-level ``proseg`` import outside ``proseg/cli/`` (the
CLI imports its commands lazily so that ``proseg --help`` starts without torch) except the allow-list below.
A failure lists every offending ``module:line``.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# The bottom: importing nothing from proseg but each other (and the root package, which only holds __version__).
BOTTOM = ("proseg", "proseg.errors", "proseg.fsutil", "proseg.jsonio")

# package -> the packages it must never import (directly, at any level of the module).
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "proseg.data": ("proseg.models", "proseg.metrics", "proseg.losses", "proseg.viz", "proseg.engine",
                    "proseg.commands", "proseg.cli"),
    "proseg.losses": ("proseg.models", "proseg.metrics", "proseg.data", "proseg.viz", "proseg.engine",
                      "proseg.commands", "proseg.cli"),
    "proseg.metrics": ("proseg.models", "proseg.viz", "proseg.engine", "proseg.commands", "proseg.cli"),
    "proseg.models": ("proseg.viz", "proseg.engine", "proseg.commands", "proseg.cli"),  # may import losses
    "proseg.viz": ("proseg.engine", "proseg.commands", "proseg.cli"),
    "proseg.engine": ("proseg.commands", "proseg.cli"),
    "proseg.commands": ("proseg.cli",),
}

# Function-level proseg imports allowed outside proseg/cli/: {(module, imported module): why}. Keep it empty
# unless an import must stay lazy (an optional or heavy dependency behind it).
FUNCTION_LEVEL_ALLOWED: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    line: int
    target: str  # the imported proseg module
    in_function: bool
    runtime: bool  # False under ``if TYPE_CHECKING:``

    def where(self) -> str:
        return f"{self.module}:{self.line}"


def module_names(src: Path) -> dict[str, Path]:
    """``{dotted module name: file}`` of every module under ``src`` (a package is named by its ``__init__``)."""
    out = {}
    for f in sorted(src.rglob("*.py")):
        parts = f.relative_to(src).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, modules: set[str]) -> list[Import]:
    """Every import of a ``proseg`` module in ``path``; ``from pkg import name`` targets ``pkg.name`` when that is
    a module (a submodule import), else ``pkg``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool, runtime: bool) -> None:
        for child in ast.iter_child_nodes(node):
            fn = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            rt = runtime and not (isinstance(child, ast.If) and _is_type_checking(child.test))
            if isinstance(child, ast.Import):
                found.extend(Import(module, child.lineno, a.name, in_function, runtime) for a in child.names
                             if a.name == "proseg" or a.name.startswith("proseg."))
            elif isinstance(child, ast.ImportFrom):
                base = _resolve(module, is_package, child)
                if base == "proseg" or base.startswith("proseg."):
                    targets = {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in child.names}
                    found.extend(Import(module, child.lineno, t, in_function, runtime) for t in sorted(targets))
            visit(child, fn, rt)

    visit(tree, False, True)
    return found


def all_imports(src: Path) -> list[Import]:
    names = module_names(src)
    return [imp for mod, path in names.items() if mod.split(".")[0] == "proseg"
            for imp in imports_of(mod, path, set(names))]


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def layer_violations(imports: list[Import]) -> list[str]:
    bad = []
    for imp in imports:
        if imp.module in BOTTOM and imp.target not in BOTTOM:
            bad.append(f"{imp.where()} imports {imp.target}: {imp.module} is at the bottom (only errors, fsutil, "
                       f"jsonio)")
        for package, banned in FORBIDDEN.items():
            if _within(imp.module, package):
                bad += [f"{imp.where()} imports {imp.target}: {package} must not import {b}"
                        for b in banned if _within(imp.target, b)]
    return bad


def find_cycles(imports: list[Import]) -> list[list[str]]:
    """The import cycles (one shortest loop per strongly connected component) of the runtime top-level imports."""
    graph: dict[str, set[str]] = {}
    for imp in imports:
        if imp.runtime and not imp.in_function and imp.target != imp.module:
            graph.setdefault(imp.module, set()).add(imp.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def strongconnect(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return [_loop(comp[0], set(comp), graph) for comp in components]


def _loop(start: str, members: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest path ``start -> ... -> start`` inside one strongly connected component (breadth first)."""
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph.get(v, set()) & members):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return [start]  # pragma: no cover - a component always has a loop


def function_level(imports: list[Import]) -> list[str]:
    return [f"{imp.where()} imports {imp.target} inside a function" for imp in imports
            if imp.in_function and not _within(imp.module, "proseg.cli")
            and (imp.module, imp.target) not in FUNCTION_LEVEL_ALLOWED]


# --- the checks on proseg ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def imports() -> list[Import]:
    found = all_imports(SRC)
    assert found, f"no proseg imports found under {SRC}"
    return found


def test_layers_import_only_downwards(imports: list[Import]) -> None:
    bad = layer_violations(imports)
    assert not bad, "imports against the layer order (docs/architecture.md):\n  " + "\n  ".join(bad)


def test_no_import_cycles(imports: list[Import]) -> None:
    cycles = find_cycles(imports)
    assert not cycles, "import cycles:\n  " + "\n  ".join(" -> ".join(c) for c in cycles)


def test_no_function_level_proseg_imports_outside_the_cli(imports: list[Import]) -> None:
    bad = function_level(imports)
    assert not bad, ("function-level proseg imports (make them top-level, or add them to FUNCTION_LEVEL_ALLOWED "
                     "with the reason):\n  " + "\n  ".join(bad))


def test_the_allow_list_names_real_imports(imports: list[Import]) -> None:
    seen = {(imp.module, imp.target) for imp in imports if imp.in_function}
    stale = sorted(set(FUNCTION_LEVEL_ALLOWED) - seen)
    assert not stale, f"FUNCTION_LEVEL_ALLOWED entries that no longer exist: {stale}"


# --- the checker itself, on a made-up package ---------------------------------------------------------------
def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def test_the_checker_finds_what_it_should(tmp_path: Path) -> None:
    _write(tmp_path, {
        "proseg/__init__.py": "",
        "proseg/errors.py": "from proseg.engine import trainer\n",  # bottom importing up
        "proseg/engine/__init__.py": "from proseg.engine.trainer import Trainer\n",
        "proseg/engine/trainer.py": "from proseg.engine import data\nfrom proseg import __version__\n",
        "proseg/engine/data.py": ("from typing import TYPE_CHECKING\nimport proseg.engine.trainer\n"
                                  "if TYPE_CHECKING:\n    from proseg.commands import evaluate\n"),
        "proseg/commands/__init__.py": "",
        "proseg/commands/evaluate.py": "def run():\n    from proseg.cli import main\n",
        "proseg/cli/__init__.py": "",
        "proseg/cli/main.py": "def main():\n    from proseg.commands import evaluate\n",
        "proseg/metrics/__init__.py": "from .case import f\n",
        "proseg/metrics/case.py": "from ..models import base\n",
        "proseg/models/__init__.py": "",
        "proseg/models/base.py": "from proseg.losses import kl\n",
        "proseg/losses/__init__.py": "",
        "proseg/losses/kl.py": "",
    })
    found = all_imports(tmp_path)
    layers = "\n".join(layer_violations(found))
    assert "proseg.errors:1 imports proseg.engine.trainer" in layers
    assert "proseg.engine.data:4 imports proseg.commands.evaluate" in layers  # TYPE_CHECKING counts for layers
    assert "proseg.commands.evaluate:2 imports proseg.cli" in layers
    assert "proseg.metrics.case:1 imports proseg.models.base" in layers  # relative imports resolved
    assert not [x for x in layer_violations(found) if x.startswith("proseg.models.base")]  # models may use losses
    assert not [x for x in layer_violations(found) if x.startswith("proseg.engine.trainer")]  # the root: bottom
    assert find_cycles(found) == [["proseg.engine.data", "proseg.engine.trainer", "proseg.engine.data"]]
    assert function_level(found) == ["proseg.commands.evaluate:2 imports proseg.cli.main inside a function"]
