"""The import graph of llmprune: no cycles (function-level imports included), and leaf modules stay leaves.

Read from the source with ``ast``, not by importing, so an import inside a function counts exactly like
one at the top of a file: a cycle hidden in a function body is still a cycle, it only fails later.
Imports under ``if TYPE_CHECKING:`` are left out (they never run). A package's ``__init__`` is a node
of its own, reached only by importing the package by name (``import llmprune``,
``from llmprune.recovery import recover``), as import-linter and pydeps count it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "llmprune"

#: file formats and atomic writes: they import nothing of llmprune but errors and each other
LEAVES = {
    "llmprune.errors",
    "llmprune.version",
    "llmprune.libc",
    "llmprune.io.atomic",
    "llmprune.io.safetensors",
    "llmprune.io.masks",
}


def module_files(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _type_checking_only(tree: ast.AST) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
            if name == "TYPE_CHECKING":
                skipped.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skipped


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The llmprune modules ``name`` imports anywhere in its file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = _type_checking_only(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "llmprune")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            if base.split(".")[0] != "llmprune":
                continue
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                full = f"{base}.{alias.name}"
                found.add(full if full in modules else base)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = module_files(root)
    return {name: imports_of(name, path, modules) & set(modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan; the graph has ~70 nodes, recursion depth is no concern
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def design_layers(path: Path = ROOT.parent / "docs" / "design.md") -> list[list[str]]:
    """Each layer's modules in docs/design.md's map, in order: the backticked names right after a
    numbered item's bold title (``io/atomic`` -> ``llmprune.io.atomic``)."""
    text = path.read_text(encoding="utf-8").split("## Layers", 1)[1].split("\n## ", 1)[0]
    layers: list[list[str]] = []
    for item in re.split(r"\n(?=\d+\. )", text):
        listing = re.match(r"\s*\d+\. \*\*[^*]+\*\*: ((?:`[\w/]+`,?\s*)+)", item)
        if listing:
            layers.append([_module_name(n) for n in re.findall(r"`([\w/]+)`", listing.group(1))])
    return layers


def _module_name(path: str) -> str:
    parts = ["llmprune", *path.split("/")]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_design_map_lists_every_module_once_and_nothing_imports_upwards():
    graph = import_graph()
    layers = design_layers()
    listed = [m for layer in layers for m in layer]
    assert sorted(set(listed)) == sorted(listed), "a module is listed twice in docs/design.md's map"
    assert set(listed) == set(graph), (
        f"docs/design.md's map is out of date: missing {sorted(set(graph) - set(listed))}, "
        f"gone {sorted(set(listed) - set(graph))}"
    )
    level = {m: i for i, layer in enumerate(layers) for m in layer}
    upward = sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps if level[d] > level[m])
    assert upward == [], f"imports from a higher layer of docs/design.md's map: {upward}"


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_leaf_modules_import_no_higher_layer():
    graph = import_graph()
    assert set(graph) >= LEAVES, f"leaf modules missing from the tree: {LEAVES - set(graph)}"
    upward = {leaf: sorted(graph[leaf] - LEAVES) for leaf in LEAVES if graph[leaf] - LEAVES}
    assert upward == {}, f"leaf modules importing above errors: {upward}"
    assert graph["llmprune.errors"] == set() and graph["llmprune.version"] == set()


# ---------------------------------------------------------------- the checker itself


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / "llmprune" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root / "llmprune"


@pytest.mark.parametrize(
    "files, expected",
    [
        # a cycle closed only by an import inside a function body
        (
            {
                "__init__.py": "",
                "a.py": "from llmprune.b import f\n",
                "b.py": "def f():\n    from llmprune.a import g\n",
            },
            [["llmprune.a", "llmprune.b"]],
        ),
        # relative imports and `from package import submodule`
        (
            {
                "__init__.py": "",
                "pkg/__init__.py": "",
                "pkg/x.py": "from . import y\n",
                "pkg/y.py": "from llmprune.pkg import x\n",
            },
            [["llmprune.pkg.x", "llmprune.pkg.y"]],
        ),
        # the package __init__ is a node: `import llmprune` from a module __init__ imports closes a cycle
        (
            {"__init__.py": "from llmprune.api import prune\n", "api.py": "import llmprune\n"},
            [["llmprune", "llmprune.api"]],
        ),
        # TYPE_CHECKING imports never run: no cycle
        (
            {
                "__init__.py": "",
                "a.py": "import llmprune.b\n",
                "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import llmprune.a\n",
            },
            [],
        ),
    ],
)
def test_cycle_finder_on_small_trees(tmp_path, files, expected):
    assert cycles(import_graph(_write(tmp_path, files))) == expected
