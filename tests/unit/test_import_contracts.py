"""The dependency rules of pyproject.toml's [tool.importlinter] hold, and a violation fails `lint-imports`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("ruyi_model", "triton_kernels", "tasks", "flows", "data_contracts")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )


def _copy(dst: Path) -> Path:
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, dst / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", dst / "pyproject.toml")
    return dst


def test_the_tree_keeps_every_contract():
    result = _lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("ruyi_model/config.py", "import tasks.core.files", "The model never imports the pipeline"),
        ("triton_kernels/ops/utils.py", "import ruyi_model.fileio", "Kernels never import the model"),
        ("tasks/core/files.py", "import flows.report", "Tasks never import flows"),
        ("tasks/cpt.py", "import tasks.evaluate", "A stage never imports another stage"),
        ("tasks/training/members.py", "import tasks.rl", "Libraries never import a stage"),
        ("data_contracts/gates.py", "import ruyi_model.config", "Contracts import only the data definitions"),
    ],
)
def test_a_violation_fails_naming_the_contract(tmp_path, module, line, contract):
    root = _copy(tmp_path)
    with open(root / module, "a") as f:
        f.write(f"\n{line}  # noqa: E402,F401\n")
    result = _lint(root)
    assert result.returncode != 0
    broken = result.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken, result.stdout
