"""Imports point calib → lora → svdq only: svdq imports neither lora nor calib, lora never imports calib."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"svdq": {"lora", "calib"}, "lora": {"calib"}, "calib": set()}


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
    bad.write_text("import os\nfrom calib.x import y\nimport lora.harness as h\n")
    assert imported_top_levels(bad) >= {"calib", "lora"}
