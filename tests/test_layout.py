"""The package's shape: imports flow one way (model, graphs and kernels, artifact, offload, runtime,
convert, app), and no module of the package imports a test-only package."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ORDER = {"model": 0, "graphs": 1, "kernels": 1, "artifact": 2, "offload": 3, "runtime": 4, "convert": 5, "app": 6}
TEST_ONLY = {"transformers", "torch", "pytest", "hypothesis", "matplotlib", "ray", "llama_cpp"}


def imported_roots(path: Path) -> set[str]:
    """Top-level names of every module `path` imports, wherever in the file (lazy imports count)."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


MODULES = sorted(p for package in ORDER for p in (ROOT / package).rglob("*.py"))


def test_every_package_is_checked():
    assert {p.relative_to(ROOT).parts[0] for p in MODULES} == set(ORDER)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_flow_one_way(path):
    package = path.relative_to(ROOT).parts[0]
    roots = imported_roots(path)
    later = sorted(r for r in roots if r in ORDER and ORDER[r] > ORDER[package])
    assert not later, f"{path.relative_to(ROOT)} ({package}) imports {later}, which come after it"
    assert not roots & TEST_ONLY, f"{path.relative_to(ROOT)} imports test-only {sorted(roots & TEST_ONLY)}"


def test_graphs_hold_cells_only():
    """graphs/ is MindSpore Cells: no file I/O, no package beyond MindSpore, numpy and the kernels."""
    for path in (ROOT / "graphs").rglob("*.py"):
        roots = imported_roots(path) - {"__future__", "mindspore", "numpy", "graphs", "kernels", "dataclasses",
                                        "math", "typing"}
        assert not roots, f"{path.relative_to(ROOT)} imports {sorted(roots)}"
        assert "open(" not in path.read_text(), f"{path.relative_to(ROOT)} opens a file"


def test_run_py_is_a_thin_entry():
    assert imported_roots(ROOT / "run.py") <= {"__future__", "os", "sys", "hydra", "omegaconf", "app"}
