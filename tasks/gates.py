"""Stage `gates`: the model quality gates, checked before export and deploy.

    python -m tasks.gates [--params params.yaml] [--set gates.max_loss=6.0]

Reads `metrics/eval_quality.json`, `metrics/reproducible/compress.json` and `metrics/reproducible/rl.json`;
validates one row per exit with the GX
suite of `data_contracts.gates`. Writes `metrics/gates.json` and `reports/gates/data_docs/` in both
outcomes; a failed gate raises `ContractViolation` (never retried) naming every failing expectation and
exit. Choices: docs/choices.md#gates.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tasks.core.files import write_metrics
from tasks.core.params import Params
from tasks.core.paths import Workspace
from tasks.core.stage import ContractViolation, StageError, log, stage_main

STAGE = "gates"
EVAL_METRICS = "eval_quality.json"  # the reproducible subset of eval.json (same exit_<d> loss/accuracy)


def _read_metrics(path: Path, stage: str) -> dict[str, Any]:
    if not path.is_file():
        raise StageError(f"{path} not found (run the {stage} stage first)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise StageError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def check_gates(params: Params) -> dict[str, Any]:
    """Validates the evaluate/compress metrics against the gates; returns the gates metrics.

    Returns:
        The content of `metrics/gates.json` (with "passed": True).

    Raises:
        StageError: a metrics file is missing or malformed.
        ContractViolation: a gate failed (after `metrics/gates.json` and the Data Docs are written).
    """
    from data_contracts.context import ContractContext
    from data_contracts.gates import SUITE, gates_frame, gates_suite

    ws = Workspace.from_params(params)
    # the reproducible parts (what dvc.yaml declares as deps: the gates rerun exactly when they change)
    eval_path, compress_path = ws.metrics_dir / EVAL_METRICS, ws.reproducible_metrics("compress")
    rl_path = ws.reproducible_metrics("rl")
    evals = _read_metrics(eval_path, "evaluate")
    compress = _read_metrics(compress_path, "compress")
    rl = _read_metrics(rl_path, "rl")
    rl_members = rl.get("members") if isinstance(rl, dict) else None
    if not isinstance(rl_members, list) or not rl_members:
        raise StageError(f"{rl_path}: no 'members' list (the members rl trained)")
    for d in rl_members:
        entry = rl.get(f"exit_{d}")
        if not isinstance(entry, dict) or not all(k in entry for k in ("accuracy_start", "accuracy_end")):
            raise StageError(f"{rl_path}: exit_{d} (an rl member) has no accuracy_start/accuracy_end")
    g = params.gates
    try:
        frame = gates_frame(
            evals,
            compress,
            where=(str(eval_path), str(compress_path), str(rl_path)),
            rl_metrics=rl,
            accuracy_floor=g.accuracy_floor,
        )
    except ValueError as e:
        raise StageError(str(e)) from None

    thresholds = {
        "max_loss": g.max_loss,
        "min_loss_margin": g.min_loss_margin,
        "depth_tolerance": g.depth_tolerance,
        "max_relative_loss_increase": params.compress.max_relative_loss_increase,
        "min_accuracy": g.min_accuracy,
        "max_rl_accuracy_drop": g.max_rl_accuracy_drop,
        "rl_members": rl_members,
        "exit_layers": list(params.model.exit_layers),
    }
    suite = gates_suite(
        params.model.exit_layers,
        g.max_loss,
        g.depth_tolerance,
        params.compress.max_relative_loss_increase,
        g.min_accuracy,
        min_loss_margin=g.min_loss_margin,
        max_rl_accuracy_drop=g.max_rl_accuracy_drop,
        rl_members=rl_members,
    )
    reports = ws.reports(STAGE)
    ctx = ContractContext(reports)
    ctx.forget(SUITE)
    result = ctx.validate(SUITE, frame, suite, run_name="gates")
    ctx.build_docs()

    failures = [f.to_dict() for f in result.failures]
    exits = {
        label: {k: (None if v != v else v) for k, v in row.items()}  # NaN -> null in JSON
        for label, row in frame.to_dict(orient="index").items()
    }
    metrics = {
        "passed": result.success,
        "thresholds": thresholds,
        "exits": exits,
        "expectations_evaluated": result.evaluated,
        "expectations_failed": len(result.failures),
        "failures": failures,
        "failing_exits": sorted({str(r) for f in result.failures for r in f.rows}),
        "data_docs": str(reports / "data_docs" / "index.html"),
    }
    write_metrics(params, STAGE, metrics)
    if not result.success:
        raise ContractViolation(
            f"model quality gates failed ({len(result.failures)} of {result.evaluated} expectations; "
            f"{eval_path}, {compress_path}, {rl_path}); Data Docs: {metrics['data_docs']}\n"
            + result.describe(),
            [{"suite": SUITE, **f} for f in failures],
        )
    log.info("gates passed: %d expectations over exits %s", result.evaluated, list(exits))
    return metrics


def run(params: Params) -> dict[str, Any]:
    return check_gates(params)


def main(argv: list[str] | None = None) -> int:
    return stage_main(STAGE, __doc__, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
