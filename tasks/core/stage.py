"""The stage contract: command line, errors and exit codes, logging, seeding (`stage_main`).

Every stage runs as `python -m tasks.<stage> [--params FILE] [--set key=value ...]`. `StageError`,
`ParamsError` and `ContractViolation` exit with the user-error code (never retried); `TransientError`
exits with 75 (retried by the flow). Why: docs/choices.md#orchestration.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import time
from collections.abc import Callable
from typing import Any

from tasks.core.params import Params, ParamsError, load_params

log = logging.getLogger("ruyi")





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
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Parses `key=value` pairs; values are read as YAML scalars (so 1e-3, true, [2, 4] work)."""
    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise ParamsError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def stage_main(name: str, doc: str, run: Callable[[Params], dict[str, Any] | None], argv: list[str] | None = None) -> int:
    """The command line of every stage: parse, validate params, run, report errors clearly."""
    parser = argparse.ArgumentParser(prog=f"python -m tasks.{name}", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a parameter, e.g. --set cpt.max_steps=10 (repeatable)")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        params = load_params(args.params, parse_overrides(args.overrides))
        t0 = time.perf_counter()
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
