"""The benchmark scripts their tests import: files under benchmarks/, not a package."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def load_script(relpath: str) -> ModuleType:
    """The script at `relpath` (from the repository root, e.g. "benchmarks/experiments/rl_slices.py")
    executed as a module named after its file, not registered in sys.modules."""
    path = REPO / relpath
    spec = importlib.util.spec_from_file_location(path.stem, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path}: not a Python file that can be loaded")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
