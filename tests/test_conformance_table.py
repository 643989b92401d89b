"""The README's conformance table (RFC 2193, RFC 2221, RFC 3502) names tests that exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_REF = re.compile(r"`([\w/]+\.py)::(\w+?)(\*?)`|`::(\w+?)(\*?)`")


def _rows() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Conformance: RFC 2193, RFC 2221, RFC 3502", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| 2") or line.startswith("| 3")]


def _tests(path: str) -> set[str]:
    tree = ast.parse((ROOT / "tests" / path).read_text())
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}


def test_every_row_names_tests_that_exist():
    rows = _rows()
    assert len(rows) >= 30
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 4, row
        last_file = None
        for m in _REF.finditer(cells[3]):
            path, name, star = (m.group(1), m.group(2), m.group(3)) if m.group(1) else (last_file, m.group(4), m.group(5))
            assert path is not None, row
            last_file = path
            names = _tests(path)
            found = any(n.startswith(name) for n in names) if star else name in names
            assert found, f"{path}::{name}{star} named by the README does not exist"
        assert cells[3] == "—" or cells[3].startswith("same") or last_file is not None, row


def test_every_rfc_section_of_the_issue_is_covered():
    sections = {row.strip("|").split("|")[0].strip() for row in _rows()}
    for needed in ("2193 §3", "2193 §4.1", "2193 §4.2", "2193 §4.3", "2193 §4.4", "2221 §3", "2221 §4", "2221 §6",
                   "3502 §1", "3502 §6.3.11", "3502 §7", "3502 §8"):
        assert needed in sections, needed
