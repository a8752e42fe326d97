"""Static checks that keep the code honest: no unused names or imports (pyflakes) and consistent types
in the package (mypy)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True, cwd=REPO, timeout=300)


def test_pyflakes_finds_nothing() -> None:
    result = run("pyflakes", "proxy", "tests", "bench")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_finds_nothing_in_the_package() -> None:
    result = run("mypy", "--ignore-missing-imports", "--no-error-summary", "proxy")
    assert result.returncode == 0, result.stdout + result.stderr
