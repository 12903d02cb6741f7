"""The VL depth gate against the noise of its own eval set: does a verdict say more than the draw of items?

    python benchmarks/experiments/vl_depth_gate_noise.py [--params params.vl.yaml] [--family DIR]
        [--boot 2000] [--seed 0] [--threads 1] [--json out.json]

The gates stage fails a member whose mean answer loss on the eval split is above the best shallower
member's by more than `gates.depth_tolerance` (5%: `loss_vs_shallower`, `data_contracts.gates`). This
script measures how finely the eval split resolves that ratio. It computes every member's answer loss
on each of the first `evaluate.num_problems` eval items, as the evaluate stage does
(`vl_multi_exit_eval` on `encode_sft`, one item at a time), and resamples the items with replacement
(`--boot` times, the members paired on the same items). For each member it prints the gate's ratio as
`gates_frame` computes it, its 95% bootstrap interval, the share of resamples over the bar (1 +
tolerance), the verdict, whether the interval lies on one side of the bar ("decided"), and about how
many items the interval would need to exclude the bar at this ratio (its half-width shrinks as
1/sqrt(items)).

`--family` defaults to the params file's rl output (`<artifacts_dir>/rl`), the family the evaluate
stage scores; the means are then compared with the evaluate stage's `eval_quality.json` where it
exists. Figures: benchmarks/RESULTS.md ("The VL depth gate against its eval set's noise").
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from paired_bootstrap import add_arguments, check_arguments  # noqa: E402

from data_contracts.bootstrap import interval95, resamples  # noqa: E402

# (summed answer loss, answer tokens) per exit for a batch of eval rows: `vl_multi_exit_eval`'s contract
EvalBatch = Callable[[Sequence[dict]], dict[int, tuple[float, int]]]


def item_losses(
    eval_batch: EvalBatch, rows: Sequence[dict], exits: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Per item: the summed answer loss of every exit (items x exits) and its answer tokens (items)."""
    sums = np.zeros((len(rows), len(exits)))
    tokens = np.zeros(len(rows))
    for i, row in enumerate(rows):
        out = eval_batch([row])
        missing = [d for d in exits if d not in out]
        if missing:
            raise ValueError(f"eval item {i} ({row.get('id', '?')}): no loss for exits {missing}")
        sums[i] = [out[d][0] for d in exits]
        tokens[i] = out[exits[0]][1]
    if not tokens.all():
        raise ValueError(f"eval items {np.flatnonzero(tokens == 0).tolist()} have no answer tokens")
    return sums, tokens


def gate_ratios(sums: np.ndarray, tokens: np.ndarray, exits: Sequence[int]) -> dict[int, float]:
    """`loss_vs_shallower` of every exit but the shallowest, as the gates stage computes it
    (`data_contracts.gates.gates_frame`) from the mean answer loss over these items."""
    from data_contracts.gates import gates_frame

    means = sums.sum(axis=0) / tokens.sum()
    evals = {f"exit_{d}": {"loss": float(m)} for d, m in zip(exits, means, strict=True)}
    compress = {f"exit_{d}": {"relative_loss_change": 0.0} for d in exits}
    frame = gates_frame(evals, compress, where=("item means", "no compression", "no rl"))
    return {d: float(frame.loc[f"exit_{d}", "loss_vs_shallower"]) for d in exits[1:]}


def bootstrap(
    sums: np.ndarray, tokens: np.ndarray, exits: Sequence[int], boots: int, seed: int
) -> dict[int, np.ndarray]:
    """The gate's ratios over `boots` resamples of the items (with replacement; every exit on the same
    items)."""
    draws: dict[int, list[float]] = {d: [] for d in exits[1:]}
    for idx in resamples(len(tokens), boots, seed):
        for d, r in gate_ratios(sums[idx], tokens[idx], exits).items():
            draws[d].append(r)
    return {d: np.asarray(v) for d, v in draws.items()}


def summarise(
    point: dict[int, float], draws: dict[int, np.ndarray], tolerance: float, items: int
) -> list[dict]:
    """One row per gated exit: the ratio, its 95% interval, the share of resamples over the bar, the
    verdict, whether the interval decides it, and the items the interval would need to exclude the bar."""
    bar = 1.0 + tolerance
    rows = []
    for d, ratio in point.items():
        lo, hi = interval95(draws[d])
        half = (hi - lo) / 2
        distance = abs(ratio - bar)
        rows.append(
            {
                "exit": d,
                "ratio": ratio,
                "ci95": [lo, hi],
                "p_over_bar": float((draws[d] > bar).mean()),
                "passes": ratio <= bar,
                "decided": hi <= bar or lo > bar,
                # half-width ~ 1/sqrt(items): the items at which it would equal the distance to the bar
                "items_to_decide": None if distance == 0 else math.ceil(items * (half / distance) ** 2),
            }
        )
    return rows


def _format(rows: list[dict], tolerance: float) -> str:
    lines = [
        f"{'exit':>4}  {'loss / best shallower':>21}  {'95% interval':>15}  {f'P(> {1 + tolerance:.2f})':>9}"
        f"  {'gate':>6}  {'decided':>7}  items to decide"
    ]
    for r in rows:
        lo, hi = r["ci95"]
        need = "never (on the bar)" if r["items_to_decide"] is None else f"{r['items_to_decide']:,}"
        lines.append(
            f"{r['exit']:>4}  {r['ratio']:>21.3f}  [{lo:.3f}, {hi:.3f}]  {r['p_over_bar']:>9.2f}"
            f"  {'passes' if r['passes'] else 'FAILS':>6}  {'yes' if r['decided'] else 'no':>7}  {need}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--params", default="params.vl.yaml", help="the VL params file (its paths, eval split, tolerance)"
    )
    ap.add_argument("--family", default=None, help="a VL family checkpoint (default: <artifacts_dir>/rl)")
    add_arguments(ap, boot=2000, items="eval items")
    ap.add_argument("--json", default=None, help="also write the rows and per-item losses here")
    args = ap.parse_args(argv)
    check_arguments(ap, args)

    import torch

    from tasks.core.params import ParamsError, load_params
    from tasks.core.paths import Workspace
    from tasks.core.stage import StageError
    from tasks.training.vl_pipeline import _rows, encode_sft, load_family, load_processor, vl_multi_exit_eval

    torch.set_num_threads(args.threads)
    try:
        params = load_params(Path(args.params))
        if params.model.modality != "vl":
            ap.error(f"--params {args.params}: model.modality is {params.model.modality!r}, not 'vl'")
        family = load_family(params, "--family", args.family) if args.family else load_family(params, "rl")
        processor = load_processor(params)
        rows = _rows(params, "eval", params.vl.tasks)[: params.evaluate.num_problems]
    except (ParamsError, StageError) as e:
        ap.error(str(e))
    model = family.eval()
    exits = list(params.model.exit_layers)
    t0 = time.perf_counter()
    with torch.no_grad():
        sums, tokens = item_losses(lambda b: vl_multi_exit_eval(model, encode_sft(processor, b)), rows, exits)
    means = sums.sum(axis=0) / tokens.sum()
    print(f"{len(rows)} eval items, {int(tokens.sum())} answer tokens ({time.perf_counter() - t0:.0f} s)")
    recorded = Workspace.from_params(params).metrics_dir / "eval_quality.json"
    for d, m in zip(exits, means, strict=True):
        line = f"exit {d}: mean answer loss {m:.4f}"
        if args.family is None and recorded.is_file():
            line += f" (evaluate: {json.loads(recorded.read_text())[f'exit_{d}']['loss']:.4f})"
        print(line)
    tolerance = params.gates.depth_tolerance
    point = gate_ratios(sums, tokens, exits)
    summary = summarise(point, bootstrap(sums, tokens, exits, args.boot, args.seed), tolerance, len(rows))
    print(_format(summary, tolerance))
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "params": args.params,
                    "family": args.family,
                    "exits": exits,
                    "depth_tolerance": tolerance,
                    "boot": args.boot,
                    "rows": summary,
                    "item_sums": sums.tolist(),
                    "item_tokens": tokens.tolist(),
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
