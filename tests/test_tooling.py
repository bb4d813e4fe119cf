"""The package type-checks (mypy) and the tree passes ruff's lint and format checks, as configured in
pyproject.toml (versions pinned in the dev extra)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args", [("ruff", "check", "."), ("ruff", "format", "--check", ".")], ids=["lint", "format"])
def test_ruff(args: tuple[str, ...]) -> None:
    pytest.importorskip("ruff")
    res = _run(*args)
    assert res.returncode == 0, res.stdout + res.stderr


def test_mypy(tmp_path: Path) -> None:
    pytest.importorskip("mypy")
    res = _run("mypy", "--cache-dir", str(tmp_path / "mypy_cache"))
    assert res.returncode == 0, res.stdout + res.stderr
