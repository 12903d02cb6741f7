"""dvc.yaml declares what each stage really reads, so that `dvc repro` reruns exactly what changed.

Checked statically from each stage module's source (`tasks/<stage>.py`): every project module it
imports (at the top or lazily inside a function) is a dependency, and every params section it reads
(`params.<section>`) is declared. The shared helpers tasks/common.py and tasks/params.py are left out
on purpose (dvc.yaml's header says why), and so are package `__init__` files.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
SHARED = {"tasks/common.py", "tasks/params.py"}
PACKAGES = ("tasks", "ruyi_model", "data_contracts", "triton_kernels")
# Params properties that are derived from declared keys (tasks/params.py).
DERIVED = {"dae_exit": ("expand.exit_layer", "model.exit_layers")}


def _module_file(module: str) -> str | None:
    parts = module.split(".")
    for candidate in (REPO.joinpath(*parts).with_suffix(".py"), REPO.joinpath(*parts, "__init__.py")):
        if candidate.is_file():
            return candidate.relative_to(REPO).as_posix()
    return None


def imported_project_files(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        else:
            continue
        for module in modules:
            file = _module_file(module)
            if file and file.split("/")[0] in PACKAGES and not file.endswith("__init__.py"):
                found.add(file)
    return found - SHARED


def _covered(file: str, deps: list[str]) -> bool:
    return any(file == d or file.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_deps_include_every_module_it_imports(stage):
    module = f"tasks/{stage}.py"
    deps = STAGES[stage].get("deps", [])
    assert module in deps
    missing = sorted(f for f in imported_project_files(REPO / module) if f != module and not _covered(f, deps))
    assert not missing, f"dvc.yaml stage {stage}: add {missing} to deps (imported by {module})"


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_params_include_every_section_it_reads(stage):
    source = (REPO / f"tasks/{stage}.py").read_text()
    declared = [str(p) for p in STAGES[stage].get("params", [])]
    missing = []
    for name in sorted(set(re.findall(r"\bparams\.([a-z_]+)", source)) - {"paths", "yaml"}):
        needed = DERIVED.get(name, (name,))
        for key in needed:
            if not any(d == key or d.startswith(key + ".") or key.startswith(d + ".") for d in declared):
                missing.append(key)
    assert not missing, f"dvc.yaml stage {stage}: add params {missing} (read by tasks/{stage}.py)"
