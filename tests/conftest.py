"""Test-wide environment: offline, and no state written outside a per-session temp dir.

The variables are set before any heavy library is imported (PREFECT_HOME must precede `import prefect`).

Triton: ``TRITON_INTERPRET=1`` (the CPU interpreter) is set only when no CUDA device is available, so
that on a GPU machine the kernels are compiled, not interpreted; a value the user set explicitly is
kept either way. The flag must be set before ``import triton``: Triton reads it whenever a
``@triton.jit`` function is decorated, and ``triton.language`` decorates its own helpers (``tl.zeros``,
...) at import, so setting it after ``import triton`` leaves those compiled-mode and every interpreted
kernel fails ("Cannot call @triton.jit'd outside of the scope of a kernel"). ``import torch`` and
``torch.cuda.is_available()`` import no triton (checked in ``tests/test_kernels_exit_head_loss.py``),
so deciding right after them is early enough; ``transformers``' model classes *do* import triton, and
test modules import them only after this file. If something (a plugin) imported triton earlier, the
session stops with an error instead of running a half-interpreted Triton.

Two markers make the Triton tests follow that decision (see ``pytest_collection_modifyitems``):

- ``triton_interpreter``: runs Triton on CPU tensors; skipped unless ``TRITON_INTERPRET=1``.
- ``triton_cuda``: runs the compiled kernels on CUDA tensors; skipped without CUDA or when
  ``TRITON_INTERPRET=1`` (the interpreter on CUDA tensors is not the GPU code path and its bf16 is wrong).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

_SESSION_TMP = Path(tempfile.mkdtemp(prefix="ruyi-tests-"))

#: Names of the variables this file set itself (not the user), passed down in the environment. A
#: pytest-xdist worker inherits the controller's environment: it drops those values and sets its own,
#: so that two workers never share a Prefect database, a DVC site cache or a Ray session directory (a
#: test that checks no Ray process is left under RAY_TMPDIR would see the other worker's Ray).
_SET_HERE_VAR = "RUYI_TESTS_SET_BY_CONFTEST"
for _name in filter(None, os.environ.pop(_SET_HERE_VAR, "").split(",")):
    os.environ.pop(_name, None)
_set_here: list[str] = []


def _default(name: str, value: str) -> None:
    if name not in os.environ:
        os.environ[name] = value
        _set_here.append(name)


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
_default("PREFECT_HOME", str(_SESSION_TMP / "prefect"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
_default("DVC_SITE_CACHE_DIR", str(_SESSION_TMP / "dvc-site"))
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
_default("RAY_TMPDIR", str(_SESSION_TMP / "ray"))
os.environ.setdefault("MPLBACKEND", "Agg")
# Stage subprocesses started by tests (DVC, Prefect) share 2 cores with the test process and servers:
# one intra-op thread each avoids oversubscription, which slows torch on CPU by an order of magnitude.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Shared test helpers (training_helpers, tiny_export, s3server) live beside this file, above the tiers.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
import torch  # noqa: E402

#: Test tiers, one folder each; every test gets the marker of its folder (`pytest -m unit`).
TIERS = ("unit", "integration", "e2e")


def decide_triton_interpret(environ, cuda_available: bool, triton_imported: bool = False) -> None:
    """Sets ``TRITON_INTERPRET=1`` in ``environ`` only if it is unset and no CUDA device is available.

    Raises:
        RuntimeError: the flag would be set but triton is already imported (too late to take effect).
    """
    if "TRITON_INTERPRET" not in environ and not cuda_available:
        if triton_imported:
            raise RuntimeError(
                "tests/conftest.py: triton was imported before TRITON_INTERPRET could be set "
                "(a pytest plugin?); set TRITON_INTERPRET=1 in the environment instead"
            )
        environ["TRITON_INTERPRET"] = "1"


#: Whether the user set TRITON_INTERPRET themselves (then it is never overridden).
TRITON_INTERPRET_FROM_USER = "TRITON_INTERPRET" in os.environ
#: Whether a CUDA device is usable (decides interpreter vs compiled Triton).
CUDA_AVAILABLE = torch.cuda.is_available()
decide_triton_interpret(os.environ, CUDA_AVAILABLE, triton_imported="triton" in sys.modules)
if not TRITON_INTERPRET_FROM_USER and "TRITON_INTERPRET" in os.environ:
    _set_here.append("TRITON_INTERPRET")
os.environ[_SET_HERE_VAR] = ",".join(_set_here)
#: Whether Triton kernels run in the interpreter in this session.
TRITON_INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"

# Two cores on CI: one intra-op thread per process keeps parallel helpers and servers responsive
# and makes CPU results bitwise repeatable.
torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "triton_interpreter: Triton on CPU tensors; needs TRITON_INTERPRET=1")
    config.addinivalue_line(
        "markers", "triton_cuda: compiled Triton kernels on CUDA; needs CUDA and no interpreter"
    )


def pytest_collection_modifyitems(config, items):
    why = (
        "CUDA is available, so conftest left it unset and the kernels compile"
        if not TRITON_INTERPRET_FROM_USER
        else f"it was set to {os.environ.get('TRITON_INTERPRET')!r} before the tests started"
    )
    skip_interp = pytest.mark.skip(reason=f"needs the Triton interpreter (TRITON_INTERPRET=1): {why}")
    if not CUDA_AVAILABLE:
        cuda_reason = "needs CUDA (compiled Triton kernels)"
    else:
        cuda_reason = (
            "TRITON_INTERPRET=1 is set: the CUDA tests need the compiled kernels, not the interpreter"
        )
    skip_cuda = pytest.mark.skip(reason=cuda_reason)
    for item in items:
        tier = next((t for t in TIERS if t in Path(str(item.fspath)).parent.parts[-1:]), None)
        if tier:
            item.add_marker(getattr(pytest.mark, tier))
        if "triton_interpreter" in item.keywords and not TRITON_INTERPRETING:
            item.add_marker(skip_interp)
        if "triton_cuda" in item.keywords and not (CUDA_AVAILABLE and not TRITON_INTERPRETING):
            item.add_marker(skip_cuda)


@pytest.fixture(scope="session")
def triton_mode() -> SimpleNamespace:
    """How this session runs Triton: ``decide`` (the rule above), ``cuda_available``, ``from_user``
    (TRITON_INTERPRET was set before the tests started), ``interpreting``."""
    return SimpleNamespace(
        decide=decide_triton_interpret,
        cuda_available=CUDA_AVAILABLE,
        from_user=TRITON_INTERPRET_FROM_USER,
        interpreting=TRITON_INTERPRETING,
    )


@pytest.fixture(scope="session")
def session_tmp() -> Path:
    return _SESSION_TMP


def pytest_sessionfinish(session, exitstatus):
    import shutil

    shutil.rmtree(_SESSION_TMP, ignore_errors=True)
