"""Imports point calib → lora → svdq only: svdq imports neither lora nor calib, lora never imports calib,
and no product module imports test-only code (``tests``) — statically, and at run time in a fresh process."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"svdq": {"lora", "calib", "tests"}, "lora": {"calib", "tests"}, "calib": {"tests"}}


def imported_top_levels(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def violations() -> list[str]:
    found = []
    for package, forbidden in FORBIDDEN.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            bad = imported_top_levels(path) & forbidden
            if bad:
                found.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    return found


def test_packages_exist():
    for package in FORBIDDEN:
        assert (ROOT / package / "__init__.py").is_file()


def test_dependency_direction():
    assert violations() == []


def test_checker_catches_a_violation(tmp_path):
    bad = tmp_path / "m.py"
    bad.write_text(
        "import os\nfrom calib.x import y\nimport lora.framework as h\nfrom tests.helpers import z\n"
    )
    assert imported_top_levels(bad) >= {"calib", "lora", "tests"}


IMPORT_ALL = """
import importlib, pkgutil, sys
for pkg in ("svdq", "lora", "calib"):
    root = importlib.import_module(pkg)
    for info in pkgutil.walk_packages(root.__path__, pkg + "."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
print("\\n".join(sorted(n for n in sys.modules if n == "tests" or n.startswith("tests."))))
"""


def test_product_imports_load_no_test_module():
    """Every module of svdq, lora and calib imported in a fresh interpreter: none of ``tests.*`` loads."""
    proc = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "", f"test-only modules loaded: {proc.stdout.split()}"
