"""The model quality gates' verdict on one set of metrics (`judge`), shared by the text gates stage
(`tasks.gates`) and the VL profile's (`tasks.training.vl_pipeline.gates`): the per-item results of the
evaluate stage and rl's per-prompt verdicts, their paired bootstrap intervals, and the
`data_contracts.gates` suite under `gates.verdict`. Choices: docs/choices.md#gates.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tasks.core.params import Params
from tasks.core.paths import Workspace
from tasks.core.stage import StageError

log = logging.getLogger("ruyi")


def judge(
    params: Params,
    evals: dict[str, Any],
    compress: dict[str, Any],
    rl: dict[str, Any],
    where: tuple[str, str, str],
    items_path: Path,
    rl_items_path: Path,
):
    """The gates' verdict on one set of metrics, shared by the text and the VL profile.

    Reads the evaluate stage's per-item results (`items_path`) and the rl stage's per-prompt verdicts
    (`rl_items_path`), checks that they are those of `evals` and `rl`, computes every per-item gate's
    paired bootstrap interval (rl's accuracy change included), and validates the frame with the
    `gates.verdict` suite in the stage's own GX project (`reports/<profile>/gates/`, Data Docs built).

    Args:
        where: the files of `evals`, `compress` and `rl`, for messages.

    Returns:
        (SuiteResult, the metrics common to both profiles: passed, verdict, thresholds, intervals,
        exits (the frame, interval columns included), expectations_evaluated, failures, failing_exits,
        undecided, data_docs).

    Raises:
        StageError: the per-item results or verdicts are missing, malformed or not those of `evals` /
            `rl`, or a metrics file is malformed.
    """
    from data_contracts.context import ContractContext
    from data_contracts.gates import (
        SUITE,
        check_items_match,
        check_rl_items_match,
        gate_bars,
        gate_intervals,
        gates_frame,
        gates_suite,
        undecided,
        with_intervals,
    )
    from data_contracts.items import read_items, read_rl_items

    g = params.gates
    try:
        frame = gates_frame(evals, compress, where=where, rl_metrics=rl, accuracy_floor=g.accuracy_floor)
    except ValueError as e:
        raise StageError(str(e)) from None
    for path, stage in ((items_path, "evaluate"), (rl_items_path, "rl")):
        if not path.is_file():
            raise StageError(f"{path} not found (run the {stage} stage: it writes the per-item results)")
    try:
        items = read_items(items_path)
        check_items_match(items, evals, (str(items_path), where[0]))
        rl_items = read_rl_items(rl_items_path)
        check_rl_items_match(rl_items, rl, (str(rl_items_path), where[2]))
    except ValueError as e:
        raise StageError(str(e)) from None
    ln_vocab = evals.get("ln_vocab")
    intervals = gate_intervals(
        items,
        float(ln_vocab) if isinstance(ln_vocab, (int, float)) else None,
        g.accuracy_floor,
        g.resamples,
        g.confidence,
        params.seed,
        rl_items=rl_items,
    )
    frame = with_intervals(frame, intervals)
    rl_members = list(rl["members"])
    suite = gates_suite(
        params.model.exit_layers,
        g.max_loss,
        g.depth_tolerance,
        params.compress.max_relative_loss_increase,
        g.min_accuracy,
        min_loss_margin=g.min_loss_margin,
        max_rl_accuracy_drop=g.max_rl_accuracy_drop,
        rl_members=rl_members,
        verdict=g.verdict,
    )
    reports = Workspace.from_params(params).reports("gates")
    ctx = ContractContext(reports)
    ctx.forget(SUITE)
    result = ctx.validate(SUITE, frame, suite, run_name="gates")
    ctx.build_docs()
    open_calls = undecided(
        frame, gate_bars(g.max_loss, g.depth_tolerance, g.min_loss_margin, g.max_rl_accuracy_drop)
    )
    for u in open_calls:
        log.warning(
            "gate %s of %s is undecided: %.4f, %.0f%% interval [%.4f, %.4f] straddles the bar %.4f (%s by "
            "the estimate; %d loss items, %d problems, %d rl prompts)",
            u["gate"],
            u["exit"],
            u["estimate"],
            100 * g.confidence,
            *u["interval"],
            u["bar"],
            "passes" if u["passes"] else "fails",
            len(items.loss_items),
            len(items.accuracy_items),
            len(rl_items.items),
        )
    failures = [f.to_dict() for f in result.failures]
    metrics = {
        "passed": result.success,
        "verdict": g.verdict,
        "thresholds": {
            "max_loss": g.max_loss,
            "min_loss_margin": g.min_loss_margin,
            "depth_tolerance": g.depth_tolerance,
            "max_relative_loss_increase": params.compress.max_relative_loss_increase,
            "min_accuracy": g.min_accuracy,
            "max_rl_accuracy_drop": g.max_rl_accuracy_drop,
            "rl_members": rl_members,
            "exit_layers": list(params.model.exit_layers),
        },
        "intervals": {
            "confidence": g.confidence,
            "resamples": g.resamples,
            "seed": params.seed,
            "loss_items": len(items.loss_items),
            "problems": len(items.accuracy_items),
            "rl_prompts": len(rl_items.items),
        },
        "exits": {
            label: {k: (None if v != v else v) for k, v in row.items()}  # NaN -> null in JSON
            for label, row in frame.to_dict(orient="index").items()
        },
        "expectations_evaluated": result.evaluated,
        "expectations_failed": len(result.failures),
        "failures": failures,
        "failing_exits": sorted({str(r) for f in result.failures for r in f.rows}),
        "undecided": open_calls,
        "data_docs": str(reports / "data_docs" / "index.html"),
    }
    return result, metrics
