"""The code's shape, checked: what issue 17 asked of the tree and what keeps it readable.

- no module imports another module's underscore names (a module's private names are its own business);
- imports between onnxpress modules run one way at import time (no cycles among top-level imports);
- no function or method in ``onnxpress/`` or ``passes/`` is longer than ``MAX_FUNCTION_LINES``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 120
# (package root folder, the dotted name it is installed as)
PACKAGES = ((ROOT / "onnxpress", "onnxpress"), (ROOT / "passes", "onnxpress.passes"))


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for folder, dotted in PACKAGES:
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([dotted, *parts])] = path
    return out


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    is_package = MODULES.get(module, Path()).name == "__init__.py"
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _top_level_imports(module: str, tree: ast.Module) -> set[str]:
    """onnxpress modules imported when ``module`` is imported (module-level statements, not in functions or
    ``if TYPE_CHECKING`` blocks)."""
    found: set[str] = set()

    def visit(stmts: list[ast.stmt]) -> None:
        for st in stmts:
            if isinstance(st, ast.If):
                if "TYPE_CHECKING" in ast.unparse(st.test):
                    continue
                visit(st.body)
                visit(st.orelse)
            elif isinstance(st, ast.Try):
                visit(st.body)
                for h in st.handlers:
                    visit(h.body)
            elif isinstance(st, ast.Import):
                found.update(a.name for a in st.names if a.name.startswith("onnxpress"))
            elif isinstance(st, ast.ImportFrom):
                src = _resolve(module, st)
                if src.startswith("onnxpress"):
                    for a in st.names:
                        sub = f"{src}.{a.name}"
                        found.add(sub if sub in MODULES else src)

    visit(tree.body)
    return {m for m in found if m in MODULES and m != module}


def test_no_module_imports_another_modules_private_names():
    offenders = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and _resolve(module, node).startswith("onnxpress"):
                offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
    assert not offenders, offenders


def test_imports_between_modules_have_no_cycles():
    """Package ``__init__`` modules re-exporting their submodules are not cycles: an edge from a submodule
    to its own package (``onnxpress.budget.search`` -> ``onnxpress.budget``) is ignored, as Python has
    already started that package when it imports the submodule."""
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        deps = _top_level_imports(module, ast.parse(path.read_text()))
        graph[module] = {d for d in deps if not module.startswith(d + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def dfs(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                dfs(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            dfs(m)
    assert not cycles, cycles


@pytest.mark.parametrize("module", sorted(MODULES))
def test_functions_are_short(module):
    path = MODULES[module]
    long = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                long.append(f"{node.name} ({length} lines, line {node.lineno})")
    assert not long, f"{path.relative_to(ROOT)}: {long}"
