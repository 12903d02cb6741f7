"""Model quality gates as a Great Expectations suite over one row per exit.

`gates_frame` builds the frame (index `exit_<d>`: exit, loss, accuracy, relative_loss_change,
loss_vs_shallower, loss_margin below ln V, accuracy_over_floor, rl_accuracy_change) from
`metrics/eval_quality.json` (or eval.json), `metrics/compress.json` and `metrics/rl.json`; a value
that is missing or not a number becomes null and fails its row; a file without `exit_<d>` entries is a
ValueError. `gates_suite` holds the gates. Run by `python -m tasks.gates`. The gates: docs/choices.md#gates.
"""

from __future__ import annotations

import math
import re
from typing import Any

import great_expectations as gx
import great_expectations.expectations as gxe

SUITE = "model_gates"
_EXIT_KEY = re.compile(r"exit_(\d+)")


def _exit_entries(metrics: Any, where: str) -> dict[int, dict[str, Any]]:
    if not isinstance(metrics, dict):
        raise ValueError(f"{where}: expected a JSON object mapping exit_<d> to metrics")
    entries = {}
    for key, value in metrics.items():
        match = _EXIT_KEY.fullmatch(str(key))
        if match is None:
            continue
        if not isinstance(value, dict):
            raise ValueError(f"{where}: {key} must be an object of metrics, got {type(value).__name__}")
        entries[int(match.group(1))] = value
    if not entries:
        raise ValueError(f"{where}: no exit_<d> entries")
    return entries


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return None if math.isnan(value) else float(value)


def gates_frame(
    eval_metrics: dict[str, Any],
    compress_metrics: dict[str, Any],
    where: tuple[str, ...] = ("metrics/eval_quality.json", "metrics/compress.json", "metrics/rl.json"),
    rl_metrics: dict[str, Any] | None = None,
    accuracy_floor: Any = None,
):
    """One row per exit (index "exit_<d>", sorted by depth) with the gated quantities.

    Args:
        eval_metrics: the evaluate stage's metrics (`exit_<d>` -> {"loss", "accuracy", ...}).
        compress_metrics: the compress stage's metrics (`exit_<d>` -> {"relative_loss_change", ...}).
        where: the files they came from, for error messages.
        rl_metrics: the rl stage's metrics (`exit_<d>` -> {"accuracy_start", "accuracy_end"} for the
            members it trained); None: no rl_accuracy_change.
        accuracy_floor: `exit -> floor` (callable); None: floor 0.

    Returns:
        DataFrame of shape (exits, 8): exit (int), loss, accuracy, relative_loss_change,
        loss_vs_shallower (float; NaN where missing or for the shallowest exit), loss_margin,
        accuracy_over_floor, rl_accuracy_change (NaN for the members rl did not train).

    Raises:
        ValueError: a file is not an object or has no exit entries (message names the file).
    """
    import pandas as pd

    evals = _exit_entries(eval_metrics, where[0])
    compress = _exit_entries(compress_metrics, where[1])
    rl = _exit_entries(rl_metrics, where[2]) if rl_metrics is not None else {}
    ln_vocab = _number(eval_metrics.get("ln_vocab")) if isinstance(eval_metrics, dict) else None
    exits = sorted(set(evals) | set(compress))
    rows = []
    best: float | None = None
    for d in exits:
        loss = _number(evals.get(d, {}).get("loss"))
        accuracy = _number(evals.get(d, {}).get("accuracy"))
        ratio = None if best is None or loss is None or best <= 0 else loss / best
        floor = float(accuracy_floor(d)) if accuracy_floor is not None else 0.0
        rl_change = None
        if d in rl:
            start, end = _number(rl[d].get("accuracy_start")), _number(rl[d].get("accuracy_end"))
            rl_change = None if start is None or end is None else end - start
        rows.append(
            {
                "exit": d,
                "loss": loss,
                "accuracy": accuracy,
                "relative_loss_change": _number(compress.get(d, {}).get("relative_loss_change")),
                "loss_vs_shallower": ratio,
                "loss_margin": None if ln_vocab is None or loss is None else ln_vocab - loss,
                "accuracy_over_floor": None if accuracy is None else accuracy - floor,
                "rl_accuracy_change": rl_change,
            }
        )
        if loss is not None:
            best = loss if best is None else min(best, loss)
    frame = pd.DataFrame(rows, index=pd.Index([f"exit_{d}" for d in exits], dtype=object))
    for column in (
        "loss",
        "accuracy",
        "relative_loss_change",
        "loss_vs_shallower",
        "loss_margin",
        "accuracy_over_floor",
        "rl_accuracy_change",
    ):
        frame[column] = frame[column].astype("float64")
    return frame


def gates_suite(
    exit_layers: list[int],
    max_loss: float,
    depth_tolerance: float,
    max_relative_loss_increase: float,
    min_accuracy: Any,
    min_loss_margin: float = 0.0,
    max_rl_accuracy_drop: float = 0.0,
    rl_members: list[int] | None = None,
) -> gx.ExpectationSuite:
    """The gates as an expectation suite (docs/choices.md#gates lists each gate)."""
    expectations = [
        gxe.ExpectColumnDistinctValuesToEqualSet(
            column="exit",
            value_set=list(exit_layers),
            description=f"every member of model.exit_layers {list(exit_layers)} was evaluated and compressed",
        ),
        gxe.ExpectColumnValuesToNotBeNull(column="loss", description="loss reported and not NaN"),
        gxe.ExpectColumnValuesToBeBetween(
            column="loss",
            min_value=0.0,
            max_value=max_loss,
            strict_max=True,
            description=f"held-out loss below gates.max_loss={max_loss}",
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="loss_vs_shallower",
            max_value=1.0 + depth_tolerance,
            description="not worse than any shallower exit by more than "
            f"gates.depth_tolerance={depth_tolerance} "
            "(loss / best shallower loss)",
        ),
        gxe.ExpectColumnValuesToNotBeNull(
            column="relative_loss_change", description="compression's relative loss change reported"
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="relative_loss_change",
            max_value=max_relative_loss_increase,
            description=f"compression within budget: relative loss increase <= "
            f"compress.max_relative_loss_increase={max_relative_loss_increase}",
        ),
        gxe.ExpectColumnValuesToNotBeNull(
            column="loss_margin", description="loss margin below ln(vocab) reported (eval metrics' ln_vocab)"
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="loss_margin",
            min_value=min_loss_margin,
            description=f"held-out loss at least gates.min_loss_margin={min_loss_margin} nats "
            "below ln(vocab_size) "
            "(a uniform model's loss)",
        ),
        gxe.ExpectColumnValuesToNotBeNull(column="accuracy", description="accuracy reported"),
        gxe.ExpectColumnValuesToBeBetween(
            column="accuracy_over_floor",
            min_value=0.0,
            description=f"accuracy at least its floor gates.min_accuracy={min_accuracy}",
        ),
    ]
    if rl_members:
        expectations.append(
            gxe.ExpectColumnValuesToBeBetween(
                column="rl_accuracy_change",
                min_value=-max_rl_accuracy_drop,
                description=f"RL-trained members {list(rl_members)} not worse after rl than before "
                f"(drop at most gates.max_rl_accuracy_drop={max_rl_accuracy_drop})",
            )
        )
    return gx.ExpectationSuite(name=SUITE, expectations=expectations)
