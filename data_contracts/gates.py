"""Model quality gates as a Great Expectations suite over one row per exit.

`gates_frame` builds the frame (index `exit_<d>`: exit, loss, accuracy, relative_loss_change,
loss_vs_shallower, loss_margin below ln V, accuracy_over_floor, rl_accuracy_change) from
`metrics/eval_quality.json` (or eval.json), `metrics/compress.json` and `metrics/rl.json`; a value
that is missing or not a number becomes null and fails its row; a file without `exit_<d>` entries is a
ValueError. From the evaluate stage's per-item results and the rl stage's per-prompt verdicts
(`data_contracts.items`), `gate_intervals` computes each per-item statistic's paired bootstrap interval,
`with_intervals` adds them to the frame (`<column>_low`, `<column>_high`), and `undecided` lists the
gates whose interval straddles the bar.
`gates_suite` holds the gates: on the estimates (`verdict="point"`) or on the interval's bound nearest
the bar (`verdict="interval"`: a gate fails only when the whole interval lies past its bar). Run by
`python -m tasks.gates`. The gates: docs/choices.md#gates.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any, Literal

import great_expectations as gx
import great_expectations.expectations as gxe
import numpy as np

from data_contracts.bootstrap import interval, resample_matrix
from data_contracts.items import ItemResults, RLItemResults

SUITE = "model_gates"
_EXIT_KEY = re.compile(r"exit_(\d+)")
Verdict = Literal["point", "interval"]
#: The gates on per-item estimates: column -> which side of its bar passes ("max": at most the bar,
#: "min": at least it). The bars themselves: `gate_bars`.
ITEM_GATES: dict[str, str] = {
    "loss": "max",
    "loss_vs_shallower": "max",
    "loss_margin": "min",
    "accuracy_over_floor": "min",
    "rl_accuracy_change": "min",
}
#: Agreement asked of the per-item losses' token mean with the reported loss (one forward per exit
#: against the stage's own pass: float rounding only).
ITEM_LOSS_RTOL = 1e-4
#: Agreement asked of rl's per-prompt verdicts with its reported accuracies (stored as float32, or
#: rounded to 6 decimals by the VL body).
RL_ACCURACY_ATOL = 1e-6


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


def loss_vs_shallower(losses: np.ndarray) -> np.ndarray:
    """The depth gate's ratio, `loss / min(shallower losses)`, along the last axis (exits by depth).

    NaN for the shallowest exit, where a loss is missing (NaN; the missing loss is skipped as a
    shallower one), and where the best shallower loss is not positive. Any leading axes (resamples)
    are kept.
    """
    losses = np.asarray(losses, dtype=float)
    best = np.fmin.accumulate(losses, axis=-1)  # running minimum, NaN skipped
    shallower = np.concatenate([np.full(losses.shape[:-1] + (1,), np.nan), best[..., :-1]], axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = losses / shallower
    ratio[~(shallower > 0)] = np.nan
    return ratio


def check_items_match(items: ItemResults, eval_metrics: dict[str, Any], where: tuple[str, str]) -> None:
    """The per-item results are those of the reported metrics: the same exits, each exit's token-mean
    loss within `ITEM_LOSS_RTOL` and its accuracy equal.

    Raises:
        ValueError: naming both files (`where`: items file, metrics file) and the first disagreement.
    """
    evals = _exit_entries(eval_metrics, where[1])
    if sorted(evals) != list(items.exits):
        raise ValueError(f"{where[0]} has exits {list(items.exits)}, {where[1]} has {sorted(evals)}")
    for d, loss, acc in zip(items.exits, items.losses(), items.accuracies(), strict=True):
        reported_loss, reported_acc = _number(evals[d].get("loss")), _number(evals[d].get("accuracy"))
        if reported_loss is not None and not math.isclose(loss, reported_loss, rel_tol=ITEM_LOSS_RTOL):
            raise ValueError(
                f"{where[0]}: exit {d}'s per-item losses average {loss:.6f}, but {where[1]} reports "
                f"{reported_loss:.6f} (not the same evaluation: run the evaluate stage again)"
            )
        if reported_acc is not None and abs(acc - reported_acc) > 1e-9:
            raise ValueError(
                f"{where[0]}: exit {d}'s per-item accuracy is {acc:.4f}, but {where[1]} reports "
                f"{reported_acc:.4f} (not the same evaluation: run the evaluate stage again)"
            )


def check_rl_items_match(items: RLItemResults, rl_metrics: dict[str, Any], where: tuple[str, str]) -> None:
    """rl's per-prompt verdicts are those of its reported metrics: the members it trained (the exits
    `rl_metrics` has entries for), each one's accuracy before rl and at the kept step within
    `RL_ACCURACY_ATOL` of `accuracy_start` and `accuracy_end`.

    Raises:
        ValueError: naming both files (`where`: items file, metrics file) and the first disagreement.
    """
    reported = _exit_entries(rl_metrics, where[1])
    if sorted(reported) != list(items.exits):
        raise ValueError(f"{where[0]} has members {list(items.exits)}, {where[1]} has {sorted(reported)}")
    for k, d in enumerate(items.exits):
        for key, verdicts in (("accuracy_start", items.start), ("accuracy_end", items.end)):
            value = _number(reported[d].get(key))
            if value is None:
                raise ValueError(f"{where[1]}: exit_{d} has no {key} (a number)")
            mean = float(verdicts[:, k].mean())
            if abs(mean - value) > RL_ACCURACY_ATOL:
                raise ValueError(
                    f"{where[0]}: exit {d}'s per-prompt {key} is {mean:.4f}, but {where[1]} reports "
                    f"{value:.4f} (not the same rl run: run the rl stage again)"
                )


def gate_intervals(
    items: ItemResults,
    ln_vocab: float | None,
    accuracy_floor: Callable[[int], float] | None,
    resamples: int,
    confidence: float,
    seed: int,
    rl_items: RLItemResults | None = None,
) -> dict[int, dict[str, tuple[float, float]]]:
    """Paired bootstrap intervals of every per-item gate statistic (`ITEM_GATES`), per exit.

    The loss items, the problems and rl's held-out prompts are resampled independently (`resamples`
    draws each, seeds `seed`, `seed + 1` and `seed + 2`), every member on the same draw and each rl
    prompt's two verdicts (before rl, at the kept step) together; each statistic is computed on each
    draw as `gates_frame` computes it (token-mean losses, `loss_vs_shallower`, ln V - loss, accuracy -
    floor, accuracy at the kept step - before).

    Returns:
        {exit: {column: (low, high)}}: the central `confidence` interval (NaN where undefined, e.g.
        `loss_vs_shallower` of the shallowest exit, or `loss_margin` without ln V);
        `rl_accuracy_change` for the members of `rl_items` only.
    """
    exits = list(items.exits)
    idx = resample_matrix(len(items.loss_items), resamples, seed)
    losses = items.loss_sums[idx].sum(axis=1) / items.tokens[idx].sum(axis=1)[:, None]  # draws x exits
    ratios = loss_vs_shallower(losses)
    margins = ln_vocab - losses if ln_vocab is not None else np.full_like(losses, np.nan)
    idx = resample_matrix(len(items.accuracy_items), resamples, seed + 1)
    floors = np.array([float(accuracy_floor(d)) if accuracy_floor is not None else 0.0 for d in exits])
    over = items.correct[idx].mean(axis=1) - floors
    out = {}
    for k, d in enumerate(exits):
        out[d] = {
            column: interval(draws[:, k], confidence)
            for column, draws in (
                ("loss", losses),
                ("loss_vs_shallower", ratios),
                ("loss_margin", margins),
                ("accuracy_over_floor", over),
            )
        }
    if rl_items is not None:
        idx = resample_matrix(len(rl_items.items), resamples, seed + 2)
        change = rl_items.end[idx].mean(axis=1) - rl_items.start[idx].mean(axis=1)  # draws x rl members
        for k, d in enumerate(rl_items.exits):
            out.setdefault(d, {})["rl_accuracy_change"] = interval(change[:, k], confidence)
    return out


def gate_bars(
    max_loss: float, depth_tolerance: float, min_loss_margin: float, max_rl_accuracy_drop: float = 0.0
) -> dict[str, float]:
    """The bar of each per-item gate (`ITEM_GATES` says which side of it passes)."""
    return {
        "loss": max_loss,
        "loss_vs_shallower": 1.0 + depth_tolerance,
        "loss_margin": min_loss_margin,
        "accuracy_over_floor": 0.0,
        "rl_accuracy_change": 0.0 - max_rl_accuracy_drop,  # not -0.0 for a bar of 0
    }


def undecided(frame, bars: dict[str, float]) -> list[dict[str, Any]]:
    """The per-item gates whose interval straddles the bar: their verdict is the draw of the items.

    Returns:
        One entry per (exit, gate): exit label, gate (column), estimate, interval, bar, and whether the
        estimate passes.
    """
    out = []
    for label, row in frame.iterrows():
        for column, bar in bars.items():
            lo, hi, estimate = row.get(f"{column}_low"), row.get(f"{column}_high"), row.get(column)
            if any(v is None or v != v for v in (lo, hi, estimate)):
                continue
            upper = ITEM_GATES[column] == "max"
            decided = (hi <= bar or lo > bar) if upper else (lo >= bar or hi < bar)
            if not decided:
                out.append(
                    {
                        "exit": str(label),
                        "gate": column,
                        "estimate": float(estimate),
                        "interval": [float(lo), float(hi)],
                        "bar": float(bar),
                        "passes": bool(estimate <= bar if upper else estimate >= bar),
                    }
                )
    return out


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
    losses = [_number(evals.get(d, {}).get("loss")) for d in exits]
    ratios = loss_vs_shallower(np.array([np.nan if v is None else v for v in losses]))
    rows = []
    for d, loss, ratio in zip(exits, losses, ratios, strict=True):
        accuracy = _number(evals.get(d, {}).get("accuracy"))
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
                "loss_vs_shallower": None if math.isnan(ratio) else float(ratio),
                "loss_margin": None if ln_vocab is None or loss is None else ln_vocab - loss,
                "accuracy_over_floor": None if accuracy is None else accuracy - floor,
                "rl_accuracy_change": rl_change,
            }
        )
    frame = pd.DataFrame(rows, index=pd.Index([f"exit_{d}" for d in exits], dtype=object))
    for column in frame.columns:
        if column != "exit":
            frame[column] = frame[column].astype("float64")
    return frame


def with_intervals(frame, intervals: dict[int, dict[str, tuple[float, float]]]):
    """`frame` (from `gates_frame`) with `<column>_low` and `<column>_high` for every column of
    `ITEM_GATES`, from `gate_intervals`' output (NaN for an exit or statistic it does not cover)."""
    frame = frame.copy()
    for column in ITEM_GATES:
        for k, suffix in enumerate(("low", "high")):
            frame[f"{column}_{suffix}"] = [
                float(intervals.get(int(d), {}).get(column, (np.nan, np.nan))[k]) for d in frame["exit"]
            ]
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
    verdict: Verdict = "point",
) -> gx.ExpectationSuite:
    """The gates as an expectation suite (docs/choices.md#gates lists each gate).

    `verdict="point"` checks the estimates. `verdict="interval"` checks each per-item gate
    (`ITEM_GATES`) on its interval's bound nearest the bar (the frame's `<column>_low` for an upper bar,
    `_high` for a lower one), so it fails only when the whole interval lies past the bar; the interval
    columns must then be present (not null), rl's for the rows of `rl_members` only (as its estimate,
    under either verdict).
    """
    if verdict not in ("point", "interval"):
        raise ValueError(f"verdict must be 'point' or 'interval', got {verdict!r}")
    interval_gate = verdict == "interval"
    bars = gate_bars(max_loss, depth_tolerance, min_loss_margin, max_rl_accuracy_drop)

    def gated(column: str) -> str:
        if not interval_gate:
            return column
        return f"{column}_low" if ITEM_GATES[column] == "max" else f"{column}_high"

    on = " (the interval's bound nearest the bar)" if interval_gate else ""
    expectations = [
        gxe.ExpectColumnDistinctValuesToEqualSet(
            column="exit",
            value_set=list(exit_layers),
            description=f"every member of model.exit_layers {list(exit_layers)} was evaluated and compressed",
        ),
        gxe.ExpectColumnValuesToNotBeNull(column="loss", description="loss reported and not NaN"),
        gxe.ExpectColumnValuesToBeBetween(
            column=gated("loss"),
            min_value=0.0,
            max_value=bars["loss"],
            strict_max=True,
            description=f"held-out loss below gates.max_loss={max_loss}{on}",
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column=gated("loss_vs_shallower"),
            max_value=bars["loss_vs_shallower"],
            description="not worse than any shallower exit by more than "
            f"gates.depth_tolerance={depth_tolerance} "
            f"(loss / best shallower loss){on}",
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
            column=gated("loss_margin"),
            min_value=bars["loss_margin"],
            description=f"held-out loss at least gates.min_loss_margin={min_loss_margin} nats "
            f"below ln(vocab_size) (a uniform model's loss){on}",
        ),
        gxe.ExpectColumnValuesToNotBeNull(column="accuracy", description="accuracy reported"),
        gxe.ExpectColumnValuesToBeBetween(
            column=gated("accuracy_over_floor"),
            min_value=bars["accuracy_over_floor"],
            description=f"accuracy at least its floor gates.min_accuracy={min_accuracy}{on}",
        ),
    ]
    if interval_gate:
        expectations += [
            gxe.ExpectColumnValuesToNotBeNull(
                column=gated(column), description=f"the per-item interval of {column} computed"
            )
            for column in ("loss", "loss_margin", "accuracy_over_floor")
        ]
    if rl_members:
        trained = f"exit in {sorted(int(d) for d in rl_members)}"  # the rows of the RL-trained members
        expectations += [
            gxe.ExpectColumnValuesToNotBeNull(
                column=column,
                row_condition=trained,
                condition_parser="pandas",
                description=f"RL-trained members {list(rl_members)}: {column} reported",
            )
            for column in dict.fromkeys(("rl_accuracy_change", gated("rl_accuracy_change")))
        ]
        expectations.append(
            gxe.ExpectColumnValuesToBeBetween(
                column=gated("rl_accuracy_change"),
                min_value=bars["rl_accuracy_change"],
                description=f"RL-trained members {list(rl_members)} not worse after rl than before "
                f"(drop at most gates.max_rl_accuracy_drop={max_rl_accuracy_drop}){on}",
            )
        )
    return gx.ExpectationSuite(name=SUITE, expectations=expectations)
