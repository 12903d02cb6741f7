"""Stage `gates`: the model quality gates, checked before export and deploy.

    python -m tasks.gates [--params params.yaml] [--set gates.max_loss=6.0]

Reads `metrics/eval_quality.json`, `metrics/reproducible/compress.json`, `metrics/reproducible/rl.json`,
the evaluate stage's per-item results (`reports/evaluate/items.jsonl`) and rl's per-prompt verdicts
(`reports/rl/items.jsonl`), resampled for each per-item gate's paired bootstrap interval; validates one
row per exit with the GX suite of `data_contracts.gates` (`gates.verdict`: on the interval, or on the
estimate). Writes `metrics/gates.json` (with the gates whose interval straddles their bar: `undecided`)
and `reports/gates/data_docs/` in both outcomes; a failed gate raises `ContractViolation` (never
retried) naming every failing expectation and exit. Choices: docs/choices.md#gates.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tasks.core.files import write_metrics
from tasks.core.params import Params
from tasks.core.paths import Workspace
from tasks.core.stage import ContractViolation, StageError, log, stage_main
from tasks.release.gates import judge

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
    """Validates the evaluate/compress/rl metrics against the gates; returns the gates metrics.

    Returns:
        The content of `metrics/gates.json` (with "passed": True).

    Raises:
        StageError: a metrics or per-item file is missing or malformed.
        ContractViolation: a gate failed (after `metrics/gates.json` and the Data Docs are written).
    """
    from data_contracts.gates import SUITE

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
    where = (str(eval_path), str(compress_path), str(rl_path))
    result, metrics = judge(params, evals, compress, rl, where, ws.eval_items, ws.rl_items)
    write_metrics(params, STAGE, metrics)
    if not result.success:
        raise ContractViolation(
            f"model quality gates failed ({len(result.failures)} of {result.evaluated} expectations, "
            f"verdict {metrics['verdict']}; {eval_path}, {compress_path}, {rl_path}); Data Docs: "
            f"{metrics['data_docs']}\n" + result.describe(),
            [{"suite": SUITE, **f} for f in metrics["failures"]],
        )
    log.info(
        "gates passed: %d expectations over exits %s (verdict %s, %d undecided)",
        result.evaluated,
        list(metrics["exits"]),
        metrics["verdict"],
        len(metrics["undecided"]),
    )
    return metrics


def run(params: Params) -> dict[str, Any]:
    return check_gates(params)


def main(argv: list[str] | None = None) -> int:
    return stage_main(STAGE, __doc__, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
