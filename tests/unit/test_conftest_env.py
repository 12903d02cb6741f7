"""tests/conftest.py under pytest-xdist: each worker gets its own temporary directories.

A worker process inherits the controller's environment, in which the controller's conftest already set
PREFECT_HOME, DVC_SITE_CACHE_DIR and RAY_TMPDIR to paths of its own. Shared, two workers would run one
Prefect database, one DVC site cache and two Ray sessions under one directory (the Ray teardown check of
tests/integration/test_distributed.py then saw the other worker's Ray). Each import below is a real
interpreter importing the real conftest, the first as the controller, the second as a worker with the
controller's environment; a value the user set is kept by both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
NAMES = ("PREFECT_HOME", "DVC_SITE_CACHE_DIR", "RAY_TMPDIR", "RUYI_TESTS_SET_BY_CONFTEST")
PRINT = (
    "import json, os, sys; sys.path.insert(0, {tests!r}); import conftest; "
    "print(json.dumps({{n: os.environ.get(n) for n in {names!r}}})); conftest.pytest_sessionfinish(None, 0)"
)


def _import_conftest(env: dict[str, str]) -> dict[str, str | None]:
    code = PRINT.format(tests=str(TESTS), names=NAMES)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_worker_replaces_the_controllers_directories_and_keeps_the_users(tmp_path):
    base = {k: v for k, v in os.environ.items() if k not in NAMES}
    base["DVC_SITE_CACHE_DIR"] = str(tmp_path / "users-dvc")  # set by the user: never replaced
    controller = _import_conftest(base)
    assert controller["DVC_SITE_CACHE_DIR"] == str(tmp_path / "users-dvc")
    assert controller["RUYI_TESTS_SET_BY_CONFTEST"].split(",")[:2] == ["PREFECT_HOME", "RAY_TMPDIR"]

    worker = _import_conftest({**base, **{k: v for k, v in controller.items() if v is not None}})
    assert worker["RAY_TMPDIR"] != controller["RAY_TMPDIR"]
    assert worker["PREFECT_HOME"] != controller["PREFECT_HOME"]
    assert Path(worker["RAY_TMPDIR"]).parent != Path(controller["RAY_TMPDIR"]).parent
    assert worker["DVC_SITE_CACHE_DIR"] == str(tmp_path / "users-dvc")
    assert worker["RUYI_TESTS_SET_BY_CONFTEST"] == controller["RUYI_TESTS_SET_BY_CONFTEST"]
