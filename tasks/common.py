"""Helpers every stage shares: its command line, atomic outputs, metrics files, seeding, logging.

Stage contract (see README): `python -m tasks.<stage> [--params FILE] [--set key=value ...]` reads its
section of the params file, reads inputs from files and writes outputs, `metrics/<stage>.json` and
plots. Outputs are published atomically: written under a temporary sibling, then renamed into place,
so an interrupted stage never leaves a half-written output that looks complete.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tasks.params import Params, ParamsError, load_params

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


def atomic_dir(final: str | Path):
    """`ruyi_model.fileio.atomic_dir` (its one home; imported lazily: importing ruyi_model loads torch)."""
    from ruyi_model.fileio import atomic_dir as _atomic_dir

    return _atomic_dir(final)


def sha256_file(path: str | Path) -> str:
    """`ruyi_model.fileio.sha256_file` (imported lazily, see atomic_dir)."""
    from ruyi_model.fileio import sha256_file as _sha256_file

    return _sha256_file(path)


@contextlib.contextmanager
def atomic_file(final: str | Path, mode: str = "w") -> Iterator[Any]:
    """Opens a temporary sibling of `final` for writing and renames it into place on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_file(path) as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)
        f.write("\n")


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def iter_jsonl(lines, where: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yields `(line number, object)` for each non-blank JSONL line; a bad line is an error naming where:line."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise StageError(f"{where}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise StageError(f"{where}:{lineno}: expected a JSON object, got {type(row).__name__}")
        yield lineno, row


def read_jsonl(path: str | Path, required: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Reads a JSONL file; a malformed line or a missing field is an error naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"input file not found: {path}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, row in iter_jsonl(f, path):
            missing = [k for k in required if k not in row]
            if missing:
                raise StageError(f"{path}:{lineno}: missing field(s) {missing}")
            rows.append(row)
    if not rows:
        raise StageError(f"{path}: no rows (empty file)")
    return rows


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> None:
    with atomic_file(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")


def write_metrics(params: Params, stage: str, metrics: dict[str, Any]) -> Path:
    path = Path(params.paths.metrics_dir) / f"{stage}.json"
    write_json(path, metrics)
    return path


def require_dir(path: str | Path, what: str, marker: str | None = None) -> Path:
    """Checks that an input directory (e.g. a checkpoint) exists, naming the stage that makes it."""
    path = Path(path)
    if not path.is_dir() or (marker and not (path / marker).exists()):
        raise StageError(f"{what} not found at {path}" + (f" (expected {marker} inside)" if marker else ""))
    return path


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


# --- model artifacts -------------------------------------------------------------------------
# Every model-producing stage writes `artifacts/<stage>/`: a FamilialForCausalLM `save_pretrained`
# directory plus the tokenizer files, so each directory is self-contained and loads offline with
# `load_family` (or transformers' Auto classes after `import ruyi_model`).


def stage_dir(params: Params, stage: str) -> Path:
    return Path(params.paths.artifacts_dir) / stage


def checkpoint_dir(params: Params, stage: str) -> Path:
    """Resumable checkpoints of a stage (DVC: persist: true, cache: false)."""
    return Path(params.paths.artifacts_dir) / "checkpoints" / stage


def plots_dir(params: Params, stage: str) -> Path:
    path = Path(params.paths.plots_dir) / stage
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_family(path: str | Path, dtype: str = "float32"):
    """Loads `(model, tokenizer)` from a stage directory; errors name the directory and the problem.

    Checks: the pipeline's special tokens (`ruyi_model.tokenizer.check_special_tokens`), the model's
    vocabulary covers the tokenizer, and the tokenizer's fingerprint is the one recorded in the model
    config by `save_family` (`check_tokenizer_matches`; a model without one loads with a warning).
    """
    import torch
    from transformers import AutoTokenizer

    from ruyi_model import FamilialForCausalLM

    path = require_dir(path, "model checkpoint", marker="config.json")
    if not any((path / f).exists() for f in ("model.safetensors", "model.safetensors.index.json")):
        raise StageError(f"model checkpoint at {path} has no model.safetensors")
    try:
        model = FamilialForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    except (ValueError, OSError) as e:
        raise StageError(f"cannot load the model at {path}: {e}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (ValueError, OSError) as e:
        raise StageError(f"cannot load the tokenizer at {path}: {e}") from None
    from ruyi_model.tokenizer import check_special_tokens

    try:  # the pipeline's special tokens first: a more specific error than a fingerprint mismatch
        check_special_tokens(tokenizer, path)
    except ValueError as e:
        raise StageError(str(e)) from None
    check_tokenizer_matches(model, tokenizer, path)
    return model, tokenizer


#: The model config attribute that records the fingerprint of the tokenizer a model was trained with
#: (`ruyi_model.tokenizer.tokenizer_fingerprint`). It is written to config.json by `save_family` and
#: survives `load_family` (and the familial checkpoint of the export, which is a `save_pretrained`).
TOKENIZER_FINGERPRINT_KEY = "tokenizer_fingerprint"


def tokenizer_fingerprint(tokenizer) -> str:
    """`ruyi_model.tokenizer.tokenizer_fingerprint` (imported lazily, see atomic_dir)."""
    from ruyi_model.tokenizer import tokenizer_fingerprint as _fingerprint

    return _fingerprint(tokenizer)


def check_tokenizer_size(model, tokenizer, where: str | Path) -> None:
    """The model's vocabulary must cover every token id of the tokenizer."""
    if len(tokenizer) > model.config.vocab_size:
        raise StageError(f"{where}: tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                         f"{model.config.vocab_size} (tokenizer/model mismatch)")


def check_tokenizer_matches(model, tokenizer, where: str | Path) -> None:
    """The tokenizer is the one the model was trained with: its size fits and its fingerprint equals the
    one recorded in the model config. A model without a recorded fingerprint (made before they were
    recorded) is accepted with a warning, checked by size only."""
    check_tokenizer_size(model, tokenizer, where)
    recorded = getattr(model.config, TOKENIZER_FINGERPRINT_KEY, None)
    if not recorded:
        log.warning("%s: the model records no tokenizer fingerprint (an artifact from before fingerprints were "
                    "recorded): only the vocabulary size is checked; rerun the stage that made it to record one",
                    where)
        return
    actual = tokenizer_fingerprint(tokenizer)
    if actual != recorded:
        raise StageError(f"{where}: the tokenizer is not the one the model was trained with (tokenizer/model "
                         f"mismatch): the model's config records tokenizer fingerprint {recorded}, the tokenizer "
                         f"files there have fingerprint {actual}")


def save_family(model, tokenizer, path: str | Path) -> Path:
    """Writes model + tokenizer atomically to `path` (replacing any previous version), recording the
    tokenizer's fingerprint in the model config (`TOKENIZER_FINGERPRINT_KEY`), which `load_family`
    checks. A model that recorded another tokenizer's fingerprint gets the new one, with a warning
    (deliberate vocabulary changes happen; the stages save the tokenizer they loaded the model with).
    """
    fingerprint = tokenizer_fingerprint(tokenizer)
    recorded = getattr(model.config, TOKENIZER_FINGERPRINT_KEY, None)
    if recorded and recorded != fingerprint:
        log.warning("%s: the model was trained with tokenizer fingerprint %s and is saved with a tokenizer of "
                    "fingerprint %s (recorded from now on)", path, recorded, fingerprint)
    setattr(model.config, TOKENIZER_FINGERPRINT_KEY, fingerprint)
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(path)


def save_figure(fig, path: str | Path, dpi: int = 100) -> Path:
    """Saves a matplotlib figure as PNG atomically (temporary sibling, then rename) and closes it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        with atomic_file(path, "wb") as f:
            fig.savefig(f, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return path
