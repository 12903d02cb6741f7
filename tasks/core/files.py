"""File helpers of the stages: atomic files and directories, JSON/JSONL, metrics files, figures.

Library module. Outputs are written under a temporary sibling and renamed into place (`atomic_file`,
`atomic_dir`); `read_jsonl` names `file:line` of a malformed row; `write_metrics` writes
`metrics/<stage>.json`; `save_figure` writes a PNG atomically.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from tasks.core.params import Params
from tasks.core.paths import Workspace
from tasks.core.stage import StageError

#: What loading a saved model raises for a missing, unreadable or corrupt file: transformers' loader lets a
#: truncated or foreign model.safetensors raise SafetensorError, which is neither an OSError nor a ValueError.
LOAD_ERRORS: tuple[type[Exception], ...] = (OSError, ValueError, SafetensorError)

log = logging.getLogger("ruyi")


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


def decode_utf8(data: bytes, where: str | Path) -> str:
    """`data` as UTF-8 text, without the byte order mark that Excel and PowerShell put first (it would
    make line 1 invalid JSON); invalid bytes are an error naming `where:line` (and the column, in bytes)."""
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise StageError(
            f"{where}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at column {column}: {e.reason})"
        ) from None


def iter_jsonl(lines, where: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yields `(line number, object)` for each non-blank JSONL line; a bad line is an error naming
    where:line."""
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
    # Lines end at "\n" only (as editors count them): str.splitlines() would also split at U+2028 etc.,
    # which JSON strings may hold unescaped.
    for lineno, row in iter_jsonl(decode_utf8(path.read_bytes(), path).split("\n"), path):
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


#: Words that mark a metric as measured (a timing, a throughput, a run id, whether a run resumed): its
#: value depends on the machine or the run's history, not only on data, params, code and seeds.
MEASURED_WORDS = frozenset({"s", "ms", "seconds", "time", "latency", "wall", "elapsed", "run_id"})
#: Whole keys that are measured although no word of theirs says so.
MEASURED_KEYS = frozenset(
    {
        "resumed_from_step",
        "stale_checkpoint",
        "skipped_checkpoints",
        "run_id",
        "created",
        "device",
        "threads",
        "torch_threads",
    }
)


def is_measured(key: str) -> bool:
    """Whether a metric key names a measured value (`wall_s`, `tokens_per_s`, `latency_ms_p50`, ...)."""
    return key in MEASURED_KEYS or bool(MEASURED_WORDS & set(key.split("_")))


def reproducible_part(metrics: dict[str, Any]) -> dict[str, Any]:
    """`metrics` without its measured entries (`is_measured`), recursively through nested dicts."""
    out = {}
    for key, value in metrics.items():
        if is_measured(str(key)):
            continue
        out[key] = reproducible_part(value) if isinstance(value, dict) else value
    return out


def write_metrics(params: Params, stage: str, metrics: dict[str, Any], *, split: bool = True) -> Path:
    """Writes `metrics/<stage>.json` (everything, timings included) and, with `split`, its reproducible
    part `metrics/reproducible/<stage>.json`: the file dvc.yaml declares as the stage's output and audits
    compare bitwise (`ruyi audit`); the complete file is a measured, top-level DVC metric. `split=False`
    for a file that is already one or the other (deploy writes its reproducible smoke results apart)."""
    ws = Workspace.from_params(params)
    path = ws.metrics(stage)
    if split:
        write_json(ws.reproducible_metrics(stage), reproducible_part(metrics))
    write_json(path, metrics)
    return path


def require_dir(path: str | Path, what: str, marker: str | None = None) -> Path:
    """Checks that an input directory (e.g. a checkpoint) exists, naming the stage that makes it."""
    path = Path(path)
    if not path.is_dir() or (marker and not (path / marker).exists()):
        raise StageError(f"{what} not found at {path}" + (f" (expected {marker} inside)" if marker else ""))
    return path


def pyplot():
    """`matplotlib.pyplot` on the Agg backend: every figure of the project is a file, so no display is
    opened or needed (a stage on a headless node, a test worker). Import it inside the plotting function:
    `plt = pyplot()`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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
