"""Product text (messages, docstrings, plan reasons, README, docs/) never points at files users do not have:
the project's internal notes stay out of what archtune prints and publishes."""
from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
INTERNAL = re.compile(r"\b(FINDINGS|DESIGN|PEERS|STYLE)\.md\b|\bseed/model_architectures")


def _string_literals(tree: ast.AST) -> list[tuple[int, str]]:
    """Every string constant, docstrings included (users read docstrings through help() and their
    editor); only comments are for developers."""
    return [(n.lineno, n.value) for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def test_no_message_cites_internal_notes():
    found = []
    for path in sorted((REPO / "src" / "archtune").rglob("*.py")):
        for line, text in _string_literals(ast.parse(path.read_text(), str(path))):
            if INTERNAL.search(text):
                found.append(f"{path.relative_to(REPO)}:{line}: {text[:120]!r}")
    assert not found, "product strings cite files users do not have:\n" + "\n".join(found)


def test_published_docs_cite_no_internal_notes():
    found = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md")), *sorted((REPO / "examples").glob("*.yaml"))]:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if INTERNAL.search(line):
                found.append(f"{path.relative_to(REPO)}:{i}: {line.strip()[:120]}")
    assert not found, "published text cites files users do not have:\n" + "\n".join(found)


def test_control_catches_a_citation():
    """The scan sees a message string and a docstring, not a comment."""
    tree = ast.parse('"""see FINDINGS.md"""\ndef f():\n    # FINDINGS.md\n    raise ValueError("wrong (FINDINGS.md)")\n')
    hits = [t for _, t in _string_literals(tree) if INTERNAL.search(t)]
    assert hits == ["see FINDINGS.md", "wrong (FINDINGS.md)"]
