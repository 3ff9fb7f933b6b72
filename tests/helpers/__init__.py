"""Test-only code: the multi-process spawner, model factories for the CLI tests, references and fixtures'
builders. Nothing in ``svdq``, ``lora`` or ``calib`` imports it (``tests/test_dependency_direction.py``)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository root
FIXTURES = ROOT / "tests" / "fixtures"
