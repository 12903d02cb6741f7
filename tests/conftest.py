"""Test-wide environment: offline, CPU-only, and no state written outside a per-session temp dir.

The variables are set before any heavy library is imported (TRITON_INTERPRET must precede
`import triton`; PREFECT_HOME must precede `import prefect`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_SESSION_TMP = Path(tempfile.mkdtemp(prefix="ruyi-tests-"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("PREFECT_HOME", str(_SESSION_TMP / "prefect"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("DVC_SITE_CACHE_DIR", str(_SESSION_TMP / "dvc-site"))
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TMPDIR", str(_SESSION_TMP / "ray"))
os.environ.setdefault("MPLBACKEND", "Agg")
# Stage subprocesses started by tests (DVC, Prefect) share 2 cores with the test process and servers:
# one intra-op thread each avoids oversubscription, which slows torch on CPU by an order of magnitude.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Two cores on CI: one intra-op thread per process keeps parallel helpers and servers responsive
# and makes CPU results bitwise repeatable.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def session_tmp() -> Path:
    return _SESSION_TMP


def pytest_sessionfinish(session, exitstatus):
    import shutil

    shutil.rmtree(_SESSION_TMP, ignore_errors=True)
