"""Stage `route`: fits and calibrates the difficulty router of the `auto` tier on the deployed family.

    python -m tasks.route [--params params.yaml] [--set route.threshold=0.6] [--set ...]

Reads `artifacts/compress/` (the family export publishes), `data/validated/select.jsonl` (calibration:
a split no stage trains on) and `eval.jsonl` (the report). Every member decodes both splits greedily;
a request's label for a cheaper member is whether it answers as well as the deepest. Per cheaper
member a logistic probe on the prompt's hidden state after `route.probe_layers` backbone layers
(`tasks.release.router`) is fitted on select; the threshold is the cheapest point of the cross-fitted
select sweep within `route.max_accuracy_loss` of always-deepest (or `route.threshold`). Writes
`artifacts/route/router.json` (what export ships and the `auto` tier applies), `metrics/route.json`
(always-deepest and the router at the operating point on eval: layers per request, accuracy, saving,
the goal), `reports/route/routes.jsonl` (per eval problem) and `plots/route/cost_quality.{png,csv}`.
Choices: docs/choices.md#route.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from tasks.core.artifacts import load_family
from tasks.core.files import (
    atomic_dir,
    atomic_file,
    pyplot,
    read_jsonl,
    save_figure,
    write_jsonl,
    write_metrics,
)
from tasks.core.params import Params
from tasks.core.paths import Workspace
from tasks.core.stage import StageError, seed_everything, stage_main
from tasks.release.router import (
    ROUTER_FILE,
    auc,
    build_router,
    cross_fitted,
    curve_point,
    fit_probe,
    member_costs,
    operating_point,
    probe_cost,
    prompt_features,
    route,
    shared_depth,
    sweep,
)

log = logging.getLogger("ruyi.route")

#: The thresholds of the reported curve (every calibrated threshold is one of them).
THRESHOLDS = tuple(round(i / 100, 2) for i in range(101))


def member_correct(
    model, tokenizer, rows: list[dict], question_key: str, where: Path, cfg
) -> dict[int, np.ndarray]:
    """Whether each member's greedy answer to each row is right (by exit layer)."""
    from ruyi_model.decoding import greedy_generate
    from tasks.data.mathgen import answers_match, extract_answer

    out = {}
    for d in model.config.exit_layers:
        texts = greedy_generate(
            model,
            tokenizer,
            [str(r[question_key]) for r in rows],
            d,
            cfg.max_new_tokens,
            batch_size=cfg.decode_batch_size,
            progress=f"{where.name}: decode exit {d}",
        )
        ok = []
        for lineno, (row, text) in enumerate(zip(rows, texts), 1):
            try:
                ok.append(answers_match(extract_answer(text), str(row["answer"])))
            except ValueError as e:
                raise StageError(f"{where}: row {lineno} (id={row.get('id')!r}): {e}") from None
        out[int(d)] = np.asarray(ok, dtype=bool)
        log.info("%s: exit %d answers %.3f", where.name, d, float(np.mean(ok)))
    return out


def as_good_labels(correct: dict[int, np.ndarray], deepest: int) -> dict[int, np.ndarray]:
    """Per member: 1 where its answer is right or the deepest's is wrong (it answers as well)."""
    return {d: (c | ~correct[deepest]).astype(np.float64) for d, c in correct.items() if d != deepest}


def plot_curve(
    select_pts, eval_pts, singles: dict[int, dict], chosen: dict, oracle: dict, out_dir: Path
) -> None:
    """plots/route/cost_quality.png (accuracy vs layers per request over the threshold sweep; each single
    member, the oracle and the operating point marked) and cost_quality.csv (both curves)."""
    import csv

    plt = pyplot()

    with atomic_file(out_dir / "cost_quality.csv") as f:
        writer = csv.writer(f)
        writer.writerow(["split", "threshold", "layers_per_request", "accuracy"])
        for split, pts in (("select_crossfit", select_pts), ("eval", eval_pts)):
            for p in pts:
                writer.writerow(
                    [split, p["threshold"], round(p["layers_per_request"], 6), round(p["accuracy"], 6)]
                )
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for pts, style, label in (
        (eval_pts, "-", "router on eval (threshold 0..1)"),
        (select_pts, ":", "router on select (cross-fitted; calibration)"),
    ):
        ax.plot(
            [p["layers_per_request"] for p in pts], [p["accuracy"] for p in pts], style, lw=1.2, label=label
        )
    deepest = max(singles)
    for d, p in sorted(singles.items()):
        marker = "s" if d == deepest else "o"
        ax.plot(
            p["layers_per_request"], p["accuracy"], marker, ms=7, color="black" if d == deepest else "grey"
        )
        name = f"always exit {d}" + (" (deepest)" if d == deepest else "")
        ax.annotate(
            name,
            (p["layers_per_request"], p["accuracy"]),
            textcoords="offset points",
            xytext=(5, -12),
            fontsize=8,
        )
    ax.plot(
        oracle["layers_per_request"],
        oracle["accuracy"],
        "D",
        ms=6,
        color="tab:green",
        label="oracle on eval (cheapest member as good as the deepest)",
    )
    ax.plot(
        chosen["layers_per_request"],
        chosen["accuracy"],
        "*",
        ms=14,
        color="tab:red",
        label=f"operating point (threshold {chosen['threshold']:.2f})",
    )
    ax.set_xlabel("decoder layers per request (member + router probe)")
    ax.set_ylabel("math accuracy (exact match)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title("Difficulty router: cost vs quality")
    fig.tight_layout()
    save_figure(fig, out_dir / "cost_quality.png")


def run(params: Params) -> dict[str, Any]:
    """Calibrates the router of artifacts/compress; returns the content of metrics/route.json."""
    from ruyi_model.decoding import encode_prompts
    from tasks.training.heldout import check_family_inputs
    from tasks.training.members import device_for_training

    cfg, ws = params.route, Workspace.from_params(params)
    seed_everything(params.seed)
    checkpoint = ws.artifacts("compress")
    model, tokenizer = load_family(checkpoint)
    model.to(device_for_training()).eval()
    check_family_inputs(model, tokenizer, checkpoint, cfg.max_new_tokens, "route.max_new_tokens")
    exits = [int(d) for d in model.config.exit_layers]
    deepest = exits[-1]
    costs = member_costs(model)
    probe_layers = shared_depth(model) if cfg.probe_layers is None else cfg.probe_layers
    if probe_layers > model.config.num_hidden_layers:
        raise StageError(
            f"route.probe_layers={probe_layers} exceeds the family's {model.config.num_hidden_layers} "
            f"backbone layers ({checkpoint})"
        )

    select_file, eval_file = ws.validated_file("select.jsonl"), ws.eval_data
    select = read_jsonl(select_file, required=("id", "prompt", "answer"))[: cfg.num_select]
    problems = read_jsonl(eval_file, required=("id", "question", "answer"))[: cfg.num_problems]
    for f, rows, n, key in (
        (select_file, select, cfg.num_select, "num_select"),
        (eval_file, problems, cfg.num_problems, "num_problems"),
    ):
        if len(rows) < n:
            log.warning("%s has only %d rows (route.%s=%d)", f, len(rows), key, n)
    if len(select) < cfg.folds:
        raise StageError(f"{select_file}: {len(select)} rows; route.folds={cfg.folds} needs at least as many")

    sel_correct = member_correct(model, tokenizer, select, "prompt", select_file, cfg)
    eval_correct = member_correct(model, tokenizer, problems, "question", eval_file, cfg)
    sel_ids = encode_prompts(tokenizer, [str(r["prompt"]) for r in select])
    eval_ids = encode_prompts(tokenizer, [str(r["question"]) for r in problems])
    sel_x = prompt_features(model, sel_ids, probe_layers)
    eval_x = prompt_features(model, eval_ids, probe_layers)

    labels = as_good_labels(sel_correct, deepest)
    router = build_router(
        model, {d: fit_probe(sel_x, labels[d], cfg.l2) for d in labels}, probe_layers, 1.0, sel_ids[0]
    )
    order = router.order
    oof = {d: cross_fitted(sel_x, labels[d], cfg.l2, cfg.folds, params.seed) for d in order}
    sel_pts = sweep(oof, order, deepest, THRESHOLDS, sel_correct, costs, probe_layers)
    floor = float(sel_correct[deepest].mean()) - cfg.max_accuracy_loss
    if cfg.threshold is None:
        threshold, how = operating_point(sel_pts, floor)["threshold"], "calibrated"
    else:
        threshold, how = float(cfg.threshold), "route.threshold"
    info = {
        "threshold_source": how,
        "calibration": {
            "split": "select",
            "rows": len(select),
            "folds": cfg.folds,
            "l2": cfg.l2,
            "max_accuracy_loss": cfg.max_accuracy_loss,
            "deepest_accuracy": float(sel_correct[deepest].mean()),
            "crossfit_at_threshold": next(p for p in sel_pts if p["threshold"] == threshold)
            if threshold in THRESHOLDS
            else curve_point(
                route(oof, order, deepest, threshold), sel_correct, costs, probe_cost(probe_layers, threshold)
            ),
        },
    }
    router = build_router(model, router.probes, probe_layers, threshold, sel_ids[0], info)

    eval_scores = router.scores(eval_x)
    eval_pts = sweep(eval_scores, order, deepest, THRESHOLDS, eval_correct, costs, probe_layers)
    chosen_members = route(eval_scores, order, deepest, threshold)
    at = {
        "threshold": threshold,
        **curve_point(chosen_members, eval_correct, costs, probe_cost(probe_layers, threshold)),
    }
    singles = {d: curve_point(np.full(len(problems), d), eval_correct, costs, 0) for d in exits}
    base = singles[deepest]
    saving = 1.0 - at["layers_per_request"] / base["layers_per_request"]
    loss = base["accuracy"] - at["accuracy"]
    # The best any router on this signal's costs could do: per problem the cheapest member as good as
    # the deepest (with the probe's layers paid), a bound for reference, not a result.
    oracle = np.array(
        [
            next(
                d
                for d in (*order, deepest)
                if d == deepest or eval_correct[d][i] or not eval_correct[deepest][i]
            )
            for i in range(len(problems))
        ]
    )
    metrics: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "exits": exits,
        "member_layers": {str(d): c for d, c in costs.items()},
        "probe_layers": probe_layers,
        "select_rows": len(select),
        "eval_problems": len(problems),
        "threshold": threshold,
        "threshold_source": how,
        "always_deepest": {"layers_per_request": base["layers_per_request"], "accuracy": base["accuracy"]},
        "members": {
            f"exit_{d}": {"layers_per_request": p["layers_per_request"], "accuracy": p["accuracy"]}
            for d, p in singles.items()
        },
        "router": {k: at[k] for k in ("layers_per_request", "accuracy", "share")},
        "relative_layer_saving": saving,
        "accuracy_loss": loss,
        "oracle": curve_point(oracle, eval_correct, costs, probe_layers),
        "goal": {
            "min_layer_saving": cfg.target_layer_saving,
            "max_accuracy_loss": cfg.max_accuracy_loss,
            "met": bool(saving >= cfg.target_layer_saving and loss <= cfg.max_accuracy_loss + 1e-12),
        },
        "calibration": info["calibration"],
        # How well each probe ranks "answers as well as the deepest" (0.5: no better than chance):
        # cross-fitted on select, and the final probe on eval.
        "probe_auc": {
            f"exit_{d}": {
                "select_crossfit": auc(oof[d], labels[d]),
                "eval": auc(eval_scores[d], as_good_labels(eval_correct, deepest)[d]),
            }
            for d in order
        },
    }
    log.info(
        "router at threshold %.2f (%s): %.2f layers/request vs %.2f always-deepest (%.1f%% fewer), "
        "accuracy %.3f vs %.3f; goal %s",
        threshold,
        how,
        at["layers_per_request"],
        base["layers_per_request"],
        100 * saving,
        at["accuracy"],
        base["accuracy"],
        "met" if metrics["goal"]["met"] else "missed",
    )

    with atomic_dir(ws.artifacts("route")) as out:
        router.save(out / ROUTER_FILE)
    write_jsonl(
        ws.reports("route") / "routes.jsonl",
        [
            {
                "id": p["id"],
                "member": int(chosen_members[i]),
                "scores": {str(d): round(float(eval_scores[d][i]), 6) for d in order},
                "correct": {str(d): bool(eval_correct[d][i]) for d in exits},
            }
            for i, p in enumerate(problems)
        ],
    )
    plot_curve(sel_pts, eval_pts, singles, at, metrics["oracle"], ws.plots("route"))
    metrics["curve"] = [
        {
            "threshold": p["threshold"],
            "layers_per_request": p["layers_per_request"],
            "accuracy": p["accuracy"],
        }
        for p in eval_pts
    ]
    write_metrics(params, "route", metrics)
    return metrics


def main(argv: list[str] | None = None) -> int:
    return stage_main("route", __doc__, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
