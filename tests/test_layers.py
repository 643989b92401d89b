"""The layers of docs/design.md, checked on the source: no import circle (imports under
TYPE_CHECKING included), the codec imports nothing outside itself, shipped code does
not import the test helpers, and no module grows past ~600 lines."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "referral_proxy"
MAX_LINES = 600

# Known, and to leave this list with the work that removes them (nothing may join it).
KNOWN_CIRCLES: set[frozenset[str]] = set()
KNOWN_TESTING_IMPORTS: set[str] = set()
KNOWN_LONG: set[str] = set()


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path) -> set[str]:
    """Every module *name* imports, wherever the import statement stands."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: {m for m in _imports(name, path) if m in mods and m != name} for name, path in mods.items()}


def _circles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(frozenset(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    assert set(_circles(_graph())) <= KNOWN_CIRCLES


def test_a_circle_is_found():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [frozenset("abc")]


def test_the_codec_imports_nothing_outside_itself():
    mods = _modules()
    for name, path in mods.items():
        if not name.startswith("referral_proxy.imap"):
            continue
        for imported in _imports(name, path):
            top = imported.split(".")[0]
            assert imported.startswith("referral_proxy.imap") or (
                top in sys.stdlib_module_names and top != "referral_proxy"), f"{name} imports {imported}"


def test_shipped_code_does_not_import_the_test_helpers():
    for name, deps in _graph().items():
        if not name.startswith("referral_proxy.testing") and name not in KNOWN_TESTING_IMPORTS:
            assert not any(d.startswith("referral_proxy.testing") for d in deps), name


def test_no_module_is_too_long():
    for name, path in _modules().items():
        if name not in KNOWN_LONG:
            lines = len(path.read_text().splitlines())
            assert lines <= MAX_LINES, f"{name}: {lines} lines"
