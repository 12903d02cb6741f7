"""The stage contract: command line, errors and exit codes, logging, seeding (`stage_main`).

Every stage runs as `python -m tasks.<stage> [--params FILE] [--set key=value ...]`. `StageError`,
`ParamsError` and `ContractViolation` exit with the user-error code (never retried); `TransientError`
exits with 75 (retried by the flow). With `model.modality: vl` (params.vl.yaml) the stage runs its
vision-language body from `tasks.training.vl_pipeline`. Why: docs/choices.md#orchestration.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import logging
import os
import random
import sys
import time
from collections.abc import Callable
from typing import Any

from tasks.core.cpus import KERNEL_PINS, CpuQuota, cpu_limit
from tasks.core.params import Params, ParamsError, load_params

log = logging.getLogger("ruyi")
#: The module with the vision-language body of each stage (`run_stage(name, params)`).
VL_PIPELINE = "tasks.training.vl_pipeline"


class StageError(RuntimeError):
    """A stage cannot proceed: bad input, a missing artifact. The message names the file/row/key."""


class TransientError(StageError):
    """A failure outside the stage's inputs that the same command may not hit again: an unreachable or
    timed-out server, a throttled endpoint. The stage exits with TRANSIENT_EXIT_CODE, which the flow
    retries; every other StageError exits with USER_ERROR_EXIT_CODE and is never retried."""


# Exit codes of `python -m tasks.<stage>` (the flow's retry policy reads them; see flows/pipeline.py).
USER_ERROR_EXIT_CODE = 2  # bad input or parameters: retrying cannot help
TRANSIENT_EXIT_CODE = 75  # EX_TEMPFAIL from sysexits.h: try again later


def setup_logging(level: int = logging.INFO) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
        )


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Parses `key=value` pairs; values are YAML 1.2 scalars as in params.yaml (1e-3, true, [2, 4];
    `'"150"'` is the string "150", which an int parameter refuses)."""
    import yaml

    from tasks.core.params import load_yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise ParamsError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = load_yaml(value)
        except yaml.YAMLError as e:
            raise ParamsError(f"--set {item}: the value is not a YAML scalar ({e})") from None
    return out


def resolve_threads(setting: int | str, limit: tuple[int, CpuQuota | None] | None = None) -> tuple[int, str]:
    """The intra-op thread count for `threads` (params.yaml) and why: `auto` is the CPUs this process
    may use (its affinity mask, capped by its cgroup's CPU quota: tasks.core.cpus); an int is used as
    given. Either is capped by those CPUs and by OMP_NUM_THREADS when that is set (the environment's
    ceiling per process: the test suite and Ray Train workers set it), so a stage never starts more
    threads than it has cores: OpenMP threads spinning against each other make every op far slower
    (benchmarks/RESULTS.md, "Training throughput and threads", "CPU quotas"). A cap changes no result
    where outputs do not depend on the thread count, as in the tiny profile
    (docs/choices.md#orchestration). `limit`: `tasks.core.cpus.cpu_limit()` where the caller has read it
    already (the default reads it)."""
    cpus, quota = limit if limit is not None else cpu_limit()
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    omp_cap = int(omp) if omp.isdigit() and int(omp) > 0 else None
    wanted = cpus if setting == "auto" else int(setting)
    threads = min(wanted, cpus, omp_cap or wanted)
    notes = [f"threads={setting}", f"{cpus} CPU{'s' if cpus != 1 else ''} available to this process"]
    if quota is not None:
        notes.append(f"a CPU quota of {quota.cpus:g} at {quota.path}")
    if omp_cap is not None:
        notes.append(f"OMP_NUM_THREADS={omp}")
    return threads, "; ".join(notes)


def set_threads(setting: int | str) -> int:
    """Applies `threads` to torch's intra-op pool of this process and logs the choice once.

    Every stage loads torch anyway (outputs are written through ruyi_model.fileio). The environment is
    left alone: Ray Train workers get OMP_NUM_THREADS from `distributed.cpus_per_worker`, which an
    exported value would override.
    """
    import torch

    threads, why = resolve_threads(setting)
    torch.set_num_threads(threads)
    log.info("intra-op threads: %d (%s)", threads, why)
    pins = ", ".join(f"{k}={os.environ[k]}" for k in KERNEL_PINS if k in os.environ)
    log.info("CPU kernels: torch %s (%s)", torch.backends.cpu.get_cpu_capability(), pins or "none pinned")
    return threads


def stage_main(
    name: str, doc: str, run: Callable[[Params], dict[str, Any] | None], argv: list[str] | None = None
) -> int:
    """The command line of every stage: parse, validate params, run, report errors clearly."""
    parser = argparse.ArgumentParser(
        prog=f"python -m tasks.{name}", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a parameter, e.g. --set cpt.max_steps=10 (repeatable)",
    )
    args = parser.parse_args(argv)
    setup_logging()
    try:
        params = load_params(args.params, parse_overrides(args.overrides))
        set_threads(params.threads)
        t0 = time.perf_counter()
        if params.model.modality == "vl":
            # The vision-language profile: same stage, VL body (imported by name so that the text
            # stages' code deps, tasks.core.codedeps, stay free of the VL modules).
            run = functools.partial(importlib.import_module(VL_PIPELINE).run_stage, name)
        run(params)
        log.info("stage %s finished in %.1f s", name, time.perf_counter() - t0)
        return 0
    except TransientError as e:
        print(f"error (transient, may be retried): {e}", file=sys.stderr)
        return TRANSIENT_EXIT_CODE
    except (ParamsError, StageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE


class ContractViolation(StageError):
    """Data (or a model's metrics) violate a contract; deterministic, so never worth a retry.

    Attributes:
        failures: JSON-able records of the failed expectations (suite, expectation, column,
            description, rows, values).
    """

    def __init__(self, message: str, failures: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.failures = failures or []
