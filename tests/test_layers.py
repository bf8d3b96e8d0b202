"""The package's layers: imports run only down cli > stages > report > compute > core (issue 20).

`make lint` runs `lint-imports` with the contracts in pyproject.toml; these tests show that the contracts
catch an upward import, and measure the import graph itself with grimp (import-linter's graph library).
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
PACKAGE = "refusal_cliff"


def _lint_imports(src: Path, cwd: Path) -> subprocess.CompletedProcess:
    """`lint-imports` with this project's contracts, on the package found in `src`."""
    lint_imports = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which(
        "lint-imports"
    )
    assert lint_imports, "lint-imports is not installed (the dev extra)"
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run(
        [lint_imports, "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_lint_imports_fails_when_a_stage_imports_the_cli(tmp_path):
    pytest.importorskip("importlinter", reason="import-linter is in the dev extra")
    copy = tmp_path / "src"
    shutil.copytree(SRC, copy, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))

    clean = _lint_imports(copy, tmp_path)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "2 kept, 0 broken" in clean.stdout, clean.stdout

    stage = copy / PACKAGE / "stages" / "trace.py"
    stage.write_text(
        stage.read_text(encoding="utf-8")
        + "\n\ndef _climb_into_the_cli():\n    from refusal_cliff.cli import main\n\n    return main\n",
        encoding="utf-8",
    )
    broken = _lint_imports(copy, tmp_path)
    print(broken.stdout[-2000:])
    assert broken.returncode != 0
    assert "0 kept, 2 broken" in broken.stdout, broken.stdout
    assert "refusal_cliff.stages.trace -> refusal_cliff.cli" in broken.stdout


def _cycles(graph) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each a cycle of imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return groups


def test_the_import_graph_has_no_cycle():
    grimp = pytest.importorskip("grimp", reason="grimp comes with import-linter (the dev extra)")
    graph = grimp.build_graph(PACKAGE, cache_dir=None)
    cycles = _cycles(graph)
    n_imports = sum(len(graph.find_modules_directly_imported_by(m)) for m in graph.modules)
    print(f"\nimport graph: {len(graph.modules)} modules, {n_imports} imports, {len(cycles)} cycles")
    for group in cycles:
        print("  cycle:", " -> ".join(group))
    assert cycles == []
    library = [m for m in graph.modules if not (m == f"{PACKAGE}.cli" or m.startswith(f"{PACKAGE}.cli."))]
    climbing = sorted(
        (m, i)
        for m in library
        for i in graph.find_modules_directly_imported_by(m)
        if i == f"{PACKAGE}.cli" or i.startswith(f"{PACKAGE}.cli.")
    )
    assert climbing == []


def test_no_function_level_import_of_the_package():
    """A dependency moved into a function body is still a dependency: every import of refusal_cliff sits
    at the top of its module, where a reader sees it (third-party imports may stay lazy)."""
    hidden = []
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        top = set(map(id, tree.body))
        for node in ast.walk(tree):
            if id(node) in top or not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            relative = isinstance(node, ast.ImportFrom) and node.level > 0
            if relative or any(name == PACKAGE or name.startswith(PACKAGE + ".") for name in names):
                hidden.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert hidden == []
