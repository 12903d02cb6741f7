"""benchmarks/experiments/setup_time.py: its options and the revision check (the builds themselves take
minutes and fetch packages: run by hand, figures in benchmarks/RESULTS.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks/experiments/setup_time.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


def test_help_names_both_recipes():
    proc = _run("--help")
    assert proc.returncode == 0, proc.stderr
    assert "--pip-makefile-rev" in proc.stdout and "UV_CACHE_DIR" in proc.stdout


def test_a_makefile_that_installs_with_uv_is_refused_as_the_pip_recipe():
    proc = _run("--pip-makefile-rev", "HEAD")
    assert proc.returncode == 2 and "installs with uv, not pip" in proc.stderr, proc.stderr
    proc = _run("--rounds", "0")
    assert proc.returncode == 2 and "--rounds must be at least 1" in proc.stderr, proc.stderr
