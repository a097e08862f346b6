"""README.md stays true: every `file.py:name` of its reading tour exists, and each file's line count it gives is
within 10% of the file's."""
import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tour():
    text = open(os.path.join(ROOT, "README.md")).read()
    start = text.index("## Read the code")
    return text[start:text.index("\n## ", start + 1)]


def names(path):
    """Top-level functions and classes of a file, and Class.method for their methods."""
    tree = ast.parse(open(path).read())
    found = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            found.add(node.name)
        if isinstance(node, ast.ClassDef):
            found |= {f"{node.name}.{n.name}" for n in node.body if isinstance(n, ast.FunctionDef)}
    return found


def test_every_name_in_the_reading_tour_exists():
    refs = re.findall(r"`(\w+\.py):([\w.]+)`", tour())
    assert len(refs) >= 15, refs
    missing = [f"{f}:{n}" for f, n in refs if not os.path.isfile(os.path.join(ROOT, f))
               or n not in names(os.path.join(ROOT, f))]
    assert not missing, f"the README's tour names what the code no longer has: {missing}"


def test_the_tour_line_counts_are_current():
    counts = re.findall(r"`(\w+\.py)` \((\d+) lines\)", tour())
    assert len(counts) >= 8, counts
    for f, n in counts:
        actual = sum(1 for _ in open(os.path.join(ROOT, f)))
        assert abs(actual - int(n)) <= 0.1 * actual, f"README says {f} has {n} lines; it has {actual}"


def test_every_fidelity_claim_names_tests_that_exist():
    """README's Fidelity table: each claim's "proved by" cell names tests/test_x.py::test_name, and each one exists."""
    text = open(os.path.join(ROOT, "README.md")).read()
    start = text.index("## Fidelity")
    rows = [line for line in text[start:text.index("\n## ", start + 1)].splitlines()
            if line.startswith("| ") and not line.startswith(("| claim", "|---"))]
    assert len(rows) >= 20, rows
    missing = []
    for row in rows:
        proved_by = re.findall(r"`tests/(test_\w+\.py)::(\w+)`", row.rsplit(" | ", 1)[-1])
        assert proved_by, f"a Fidelity claim names no test: {row[:80]}"
        missing += [f"{f}::{n}" for f, n in proved_by
                    if not os.path.isfile(os.path.join(ROOT, "tests", f)) or n not in names(os.path.join(ROOT, "tests", f))]
    assert not missing, f"the README's Fidelity table names tests that do not exist: {missing}"
