"""The package's import graph reads top-down: library layers import only their own layer and the ones below, the
library imports no tool, and nothing imports in a cycle (module to module, or package to package).

The graph is built from the source with ``ast``: every ``import`` / ``from ... import`` wherever it is (function
bodies included, ``if TYPE_CHECKING:`` blocks excluded: they never run) and every
``importlib.import_module("kvquant...")`` / ``__import__`` call with a literal (or f-string prefix) name. Importing
``a.b.c`` also runs the ``__init__`` of ``a.b``: those edges count too.
"""

from __future__ import annotations

import ast
import textwrap
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "kvquant"

#: Library layers, lowest first. A module may import its own layer and the layers below.
LAYERS: list[set[str]] = [
    {"kvquant.config", "kvquant.datatypes", "kvquant.files", "kvquant.version"},
    {"kvquant.quant", "kvquant.sparse"},
    {"kvquant.kernels"},
    {"kvquant.cache", "kvquant.attention"},
    {"kvquant.calibration", "kvquant.eval"},
]
#: Tools on top of the library: they may import the library and each other (without cycles); the library imports
#: none of them.
TOOLS = {"kvquant.cli", "kvquant.bench", "kvquant.energy", "kvquant.report", "kvquant.models", "kvquant.data",
         "kvquant.sweep", "kvquant.flags", "kvquant.__main__"}


@dataclass(frozen=True)
class Edge:
    src: str  # importing module
    dst: str  # imported module
    where: str  # file:line

    def __str__(self) -> str:
        return f"{self.where}: {self.src} imports {self.dst}"


# ----------------------------------------------------------------------------------------------------
# building the graph


def module_names(root: Path, package: str = PACKAGE) -> dict[str, Path]:
    """``{dotted module name: file}`` of every ``.py`` file of ``package`` under ``root``."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: set[str]) -> str | None:
    """The longest known module that ``name`` is or lies in (``a.b.func`` -> ``a.b``)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _string_target(node: ast.expr) -> str | None:
    """The module a dynamic import names: a literal, or the literal prefix of an f-string up to its last dot."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
        prefix = str(node.values[0].value)
        return prefix.rpartition(".")[0] if "." in prefix else None
    return None


def _raw_imports(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, int]]:
    """``(imported name, line)`` of every import of a parsed module (relative imports made absolute)."""
    found: list[tuple[str, int]] = []
    package = module if is_package else module.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.extend((f"{base}.{alias.name}", node.lineno) for alias in node.names)
            found.append((base, node.lineno))
        elif isinstance(node, ast.Call):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else None
            if name in ("import_module", "__import__") and node.args:
                target = _string_target(node.args[0])
                if target:
                    found.append((target, node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_edges(root: Path = ROOT, package: str = PACKAGE) -> list[Edge]:
    """Every import between modules of ``package`` (see the module docstring)."""
    files = module_names(root, package)
    known = set(files)
    edges: set[Edge] = set()
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for name, line in _raw_imports(tree, module, path.name == "__init__.py"):
            target = _resolve(name, known)
            if target is None:
                continue
            where = f"{path.relative_to(root).as_posix()}:{line}"
            # the target and the packages it lies in (their __init__ runs first), but not the root package, which
            # every module lies in
            chain = [target]
            parent = target.rpartition(".")[0]
            while parent and parent != package:
                chain.append(parent)
                parent = parent.rpartition(".")[0]
            for dst in chain:
                if dst != module and not module.startswith(dst + "."):
                    edges.add(Edge(module, dst, where))
    return sorted(edges, key=lambda e: (e.where, e.dst))


# ----------------------------------------------------------------------------------------------------
# the rules


def unit_of(module: str, package: str = PACKAGE) -> str:
    """The top-level component a module belongs to: ``kvquant.quant.store`` -> ``kvquant.quant``."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def _cycles(nodes: set[str], succ: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node, or a node importing itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(succ.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in succ.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(nodes):
        if v not in index:
            strong(v)
    return out


def check(edges: list[Edge], layers: list[set[str]] = LAYERS, tools: set[str] = TOOLS, package: str = PACKAGE
          ) -> list[str]:
    """Every violation of the rules in ``edges``, one line each naming the offending import(s)."""
    layer = {u: i for i, units in enumerate(layers) for u in units}
    problems = []
    for e in edges:
        su, du = unit_of(e.src), unit_of(e.dst)
        if su == du:
            continue
        if du == package and su not in tools:
            problems.append(f"{e}: the library imports the public namespace (import the module that defines the "
                            "name)")
        elif su == package and du in tools:
            problems.append(f"{e}: the public namespace imports a tool")
        elif su in layer and du in tools:
            problems.append(f"{e}: library ({su}) imports a tool ({du})")
        elif su in layer and du in layer and layer[du] > layer[su]:
            problems.append(f"{e}: upward import, layer {layer[su]} ({su}) imports layer {layer[du]} ({du})")
        elif du not in layer and du not in tools and du != package:
            problems.append(f"{e}: {du} is in no layer and is not a tool: add it to LAYERS or TOOLS")
        elif su not in layer and su not in tools and su != package:
            problems.append(f"{e}: {su} is in no layer and is not a tool: add it to LAYERS or TOOLS")
    by_pair: dict[tuple[str, str], list[Edge]] = {}
    for e in edges:
        by_pair.setdefault((e.src, e.dst), []).append(e)
    for level, key in (("module", lambda m: m), ("package", unit_of)):
        succ: dict[str, set[str]] = {}
        nodes: set[str] = set()
        witness: dict[tuple[str, str], Edge] = {}
        for e in edges:
            a, b = key(e.src), key(e.dst)
            if package in (a, b) or (level == "package" and a == b):
                continue  # the root package re-exports the library: not a node of the cycle check
            nodes |= {a, b}
            succ.setdefault(a, set()).add(b)
            witness.setdefault((a, b), e)
        for comp in _cycles(nodes, succ):
            members = set(comp)
            inside = [str(witness[(a, b)]) for a in comp for b in sorted(succ.get(a, ())) if b in members]
            problems.append(f"{level} cycle {' <-> '.join(comp)}: " + "; ".join(inside))
    return problems


# ----------------------------------------------------------------------------------------------------
# the package itself


def test_package_imports_are_layered_and_acyclic() -> None:
    edges = import_edges()
    assert len(edges) > 100, "the import graph looks empty: is the package where this test expects it?"
    problems = check(edges)
    assert not problems, "import graph violations:\n" + "\n".join(problems)


def test_every_component_has_a_place() -> None:
    placed = {u for units in LAYERS for u in units} | TOOLS
    units = {unit_of(m) for m in module_names(ROOT)} - {PACKAGE}
    assert units <= placed, f"not in LAYERS or TOOLS: {sorted(units - placed)}"


def test_public_namespace_is_the_library() -> None:
    import kvquant

    for name in kvquant.__all__:
        module = getattr(kvquant, name).__module__ if hasattr(getattr(kvquant, name), "__module__") else "kvquant"
        assert unit_of(module) not in TOOLS, f"kvquant.{name} comes from the tool {module}"
    assert "EnergyMonitor" not in kvquant.__all__ and not hasattr(kvquant, "DetailedEnergyProfiler")


# ----------------------------------------------------------------------------------------------------
# the checker on small synthetic graphs


def _edges(*pairs: tuple[str, str]) -> list[Edge]:
    return [Edge(a, b, f"{a.replace('.', '/')}.py:{i + 1}") for i, (a, b) in enumerate(pairs)]


SMALL_LAYERS = [{"pkg.base"}, {"pkg.low"}, {"pkg.high"}]
SMALL_TOOLS = {"pkg.tool", "pkg.other"}


def test_checker_accepts_a_clean_graph() -> None:
    edges = _edges(("pkg.high.a", "pkg.low.b"), ("pkg.low.b", "pkg.base"), ("pkg.tool.x", "pkg.high.a"),
                   ("pkg.tool.x", "pkg.other.y"), ("pkg.high.a", "pkg.high.c"))
    assert check(edges, SMALL_LAYERS, SMALL_TOOLS, "pkg") == []


def test_checker_flags_an_upward_import_with_its_place() -> None:
    problems = check(_edges(("pkg.high.a", "pkg.low.b"), ("pkg.low.b", "pkg.high.c")), SMALL_LAYERS, SMALL_TOOLS,
                     "pkg")
    assert any("pkg/low/b.py:2: pkg.low.b imports pkg.high.c: upward import" in p for p in problems), problems


def test_checker_flags_library_importing_a_tool() -> None:
    problems = check(_edges(("pkg.low.b", "pkg.tool.x")), SMALL_LAYERS, SMALL_TOOLS, "pkg")
    assert len(problems) == 1 and "library (pkg.low) imports a tool (pkg.tool)" in problems[0]


def test_checker_flags_module_and_package_cycles() -> None:
    module_cycle = check(_edges(("pkg.low.a", "pkg.low.b"), ("pkg.low.b", "pkg.low.a")), SMALL_LAYERS,
                         SMALL_TOOLS, "pkg")
    assert len(module_cycle) == 1 and module_cycle[0].startswith("module cycle pkg.low.a <-> pkg.low.b")
    assert "pkg/low/a.py:1: pkg.low.a imports pkg.low.b" in module_cycle[0]
    tool_cycle = check(_edges(("pkg.tool.x", "pkg.other.y"), ("pkg.other.z", "pkg.tool.w")), SMALL_LAYERS,
                       SMALL_TOOLS, "pkg")
    assert [p for p in tool_cycle if p.startswith("package cycle pkg.other <-> pkg.tool")], tool_cycle


def test_checker_flags_an_unplaced_component() -> None:
    problems = check(_edges(("pkg.high.a", "pkg.misc")), SMALL_LAYERS, SMALL_TOOLS, "pkg")
    assert problems and "pkg.misc is in no layer" in problems[0]


def test_graph_sees_function_level_dynamic_and_parent_imports(tmp_path: Path) -> None:
    files = {
        "pkg/__init__.py": "",
        "pkg/low/__init__.py": "from pkg.low import b\n",
        "pkg/low/b.py": textwrap.dedent("""
            from typing import TYPE_CHECKING
            if TYPE_CHECKING:
                from pkg.high import a  # never runs: not an edge
            def f():
                from pkg.high.a import g  # function-level import: an edge
                return g
        """),
        "pkg/high/__init__.py": "",
        "pkg/high/a.py": textwrap.dedent("""
            import importlib
            def g():
                importlib.import_module("pkg.low.b")
                return importlib.import_module(f"pkg.tool.{g.__name__}")
        """),
        "pkg/tool/__init__.py": "",
        "pkg/tool/g.py": "from .. import low\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    edges = {(e.src, e.dst) for e in import_edges(tmp_path, "pkg")}
    assert ("pkg.low.b", "pkg.high.a") in edges and ("pkg.low.b", "pkg.high") in edges
    assert ("pkg.high.a", "pkg.low.b") in edges and ("pkg.high.a", "pkg.low") in edges  # parent __init__ runs
    assert ("pkg.high.a", "pkg.tool") in edges  # f-string prefix
    assert ("pkg.tool.g", "pkg.low") in edges  # relative import
    assert ("pkg.low", "pkg.low.b") in edges
    problems = check(import_edges(tmp_path, "pkg"), SMALL_LAYERS, SMALL_TOOLS, "pkg")
    assert any("upward import" in p and "pkg/low/b.py:6" in p for p in problems), problems
    assert any("imports a tool" in p and "pkg/high/a.py:5" in p for p in problems), problems
    assert any(p.startswith("module cycle") for p in problems), problems


if __name__ == "__main__":  # print the graph's violations (or nothing)
    raise SystemExit("\n".join(check(import_edges())) or None)

