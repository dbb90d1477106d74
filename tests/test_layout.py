"""The tree's own rules: the toy world is a plug-in of the core, and no module outgrows a reader."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEMO_BUILDER = REPO / "tinv" / "demo.py"


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of its code (``from tinv import toyworld`` included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    return names


def test_no_core_module_imports_the_toy_world():
    core = [p for p in (REPO / "tinv").rglob("*.py") if "toyworld" not in p.relative_to(REPO).parts]
    assert len(core) > 10 and DEMO_BUILDER in core
    offenders = {str(p.relative_to(REPO)) for p in core if p != DEMO_BUILDER
                 and any(n == "tinv.toyworld" or n.startswith("tinv.toyworld.") for n in imported(p))}
    assert not offenders, offenders
    actor = imported(REPO / "jobs" / "actor.py")
    assert not {n for n in actor if "toyworld" in n or n.startswith("tinv.demo")}, actor


def test_imports_are_checked_for_real():  # the rule above would catch an offender
    assert "tinv.toyworld.fidelity" in imported(DEMO_BUILDER)


def test_no_module_of_tinv_jobs_or_the_benchmark_is_over_400_lines():
    files = [*(REPO / "tinv").rglob("*.py"), *(REPO / "jobs").rglob("*.py")]
    assert any("bench" in p.parts for p in files)
    long = {str(p.relative_to(REPO)): n for p in files if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long
