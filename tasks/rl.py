"""Stage `rl`: on-policy RL with a verifiable math reward on the family's members, GRPO or BPPO.

    python -m tasks.rl [--params params.yaml] [--set rl.algorithm=grpo] [--set rl.members=all] ...

Reads `artifacts/sft/` and `data/validated/rl.jsonl`. Writes `artifacts/rl/`, resumable checkpoints in
`artifacts/checkpoints/rl/`, `metrics/rl.json` (reward and accuracy before/after per member, steps with
gradient, timings) and `plots/rl/curves.{png,csv}`. The step is `tasks.training.rl_trainer.RLTrainer`,
the losses are in `tasks.training.rl_algos`. Choices: docs/choices.md#rl.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.core.artifacts import load_family, save_family
from tasks.core.files import atomic_file, pyplot, save_figure, sha256_file, write_metrics
from tasks.core.params import Params
from tasks.core.paths import Workspace
from tasks.core.stage import StageError, seed_everything, stage_main
from tasks.training.checkpoint import Checkpointer, dir_sha256, fingerprint_info
from tasks.training.curves import HeldOut, draw_held_out, held_out_columns, running_mean
from tasks.training.rl_trainer import (
    RLTrainer,
    evaluate_members,
    load_rl_rows,
    resolve_members,
    split_rows,
    trainable_parameters,
)

log = logging.getLogger("ruyi.rl")

CURVE_KEYS = (
    "reward",
    "accuracy",
    "length",
    "kl",
    "budget",
    "tokens_generated",
    "trained_tokens",
    "loss",
    "clip_ratio",
    "pairs",
    "skipped_groups",
    "has_gradient",
    "truncated",
    "stopped_early",
    "rollout_s",
    "train_s",
    "loss_s",
    "optim_s",
    "time_s",
)


# --- checkpoints -----------------------------------------------------------------------------------


def checkpoint_info(
    params: Params, rl_path: Path, sft_dir: Path, code_root: Path | None = None
) -> dict[str, Any]:
    """What an rl checkpoint must agree on (`tasks.training.checkpoint.fingerprint_info`): params.rl, the
    seed, rl.jsonl, the SFT checkpoint and the code of every module this stage imports. `steps` and
    `checkpoint_every` are left out: extending a run resumes it (the lr is constant, so nothing before
    step n depends on the total); so is `eval_every` (greedy evaluation never changes training)."""
    inputs = {"rl": sha256_file(rl_path), "sft": dir_sha256(sft_dir)}
    return fingerprint_info(
        "rl",
        params.rl,
        seed=params.seed,
        exclude=("steps", "checkpoint_every", "eval_every"),
        inputs=inputs,
        code_root=code_root,
    )


# --- plots -----------------------------------------------------------------------------------------


def write_curves(
    history: dict[int, list[dict[str, float]]],
    out_dir: Path,
    algorithm: str,
    held_out: HeldOut | None = None,
    window: int = 10,
) -> None:
    """`curves.csv` (step, member and every curve) and `curves.png` (reward, accuracy, length, KL).

    Reward and sampled accuracy move a lot from step to step (8 prompts a step): each member's steps are
    faint points with their running mean over the last `window` steps drawn through them. `held_out`
    (member -> its held-out evaluations, `{"step", "accuracy", ...}` each: before rl, every
    `rl.eval_every` steps, after rl) is drawn on the accuracy panel, so the figure shows what rl changed
    where it counts, beside what it sampled."""
    import csv
    import io

    plt = pyplot()
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["step", "member", *CURVE_KEYS])
    for d, rows in history.items():
        for r in rows:
            writer.writerow(
                [int(r["step"]), f"exit_{d}", *[round(float(r.get(k, 0.0)), 6) for k in CURVE_KEYS]]
            )
    with atomic_file(out_dir / "curves.csv") as f:
        f.write(buf.getvalue())
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    colors = {}
    for d, rows in history.items():
        steps = [r["step"] for r in rows]
        for ax, key in ((axes[0, 0], "reward"), (axes[0, 1], "accuracy")):
            values = [r[key] for r in rows]
            (line,) = ax.plot(
                steps, running_mean(values, window), lw=1.6, label=f"exit {d} (mean of {window})"
            )
            ax.plot(steps, values, "o", ms=2.5, alpha=0.35, color=line.get_color())
        colors[d] = line.get_color()
        axes[1, 0].plot(steps, [r["length"] for r in rows], label=f"exit {d} mean length")
        if any(r["budget"] for r in rows):
            axes[1, 0].plot(steps, [r["budget"] for r in rows], "--", label=f"exit {d} budget")
        axes[1, 1].plot(steps, [r["kl"] for r in rows], label=f"exit {d}")
    draw_held_out(axes[0, 1], held_out or {}, colors)
    for ax, title in zip(
        axes.flat,
        ["reward (sampled)", "accuracy (sampled; held-out: greedy)", "response length (tokens)", "KL"],
    ):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"rl ({algorithm})")
    fig.tight_layout()
    save_figure(fig, out_dir / "curves.png")


# --- the stage -------------------------------------------------------------------------------------


def run(params: Params) -> dict[str, Any]:
    """Runs the rl stage (see docs/choices.md#rl); returns its metrics."""
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    cfg, ws = params.rl, Workspace.from_params(params)
    inputs = _load_inputs(params)
    model, tokenizer, members = inputs.model, inputs.tokenizer, inputs.members
    rl_path, sft_dir = inputs.rl_path, inputs.sft_dir
    train_rows, eval_rows = inputs.train_rows, inputs.eval_rows
    trainable = trainable_parameters(model, cfg.members, members)
    n_train = sum(p.numel() for _, p in trainable)
    log.info(
        "rl: %s on members %s, %d trainable parameters of %d, %d train / %d eval prompts",
        cfg.algorithm,
        members,
        n_train,
        sum(p.numel() for p in model.parameters()),
        len(train_rows),
        len(eval_rows),
    )
    trainer = RLTrainer(
        model, tokenizer, train_rows, cfg, members=members, trainable=trainable, seed=params.seed
    )
    checkpointer = Checkpointer(ws.checkpoints("rl"), checkpoint_info(params, rl_path, sft_dir))
    latest = checkpointer.find_resumable()
    state = None
    if latest is not None:
        state = checkpointer.load(latest, model, trainer.optimizer)
        trainer.load_state_dict(state)
    resumed_from = trainer.step_index if state is not None else None
    # Wall time of the earlier processes up to the checkpoint resumed from (work after it was redone).
    prior_wall_s = float(state.get("wall_time_s", 0.0)) if state is not None else 0.0

    def held_out_eval() -> dict[int, dict[str, float]]:
        return evaluate_members(model, tokenizer, eval_rows, members, cfg.max_new_tokens, cfg.format_reward)

    # Each member's held-out evaluations: step 0 (before rl), every rl.eval_every steps, after rl. Its first
    # and last points are the before/after figures; a checkpoint keeps it whole.
    curve = {int(d): list(points) for d, points in (state or {}).get("held_out_curve", {}).items()}
    if not curve and state is not None and "eval_before" in state:  # a checkpoint from before the curve
        curve = {int(d): [{"step": 0, **v}] for d, v in state["eval_before"].items()}
    if not curve:
        before = held_out_eval()
        curve = {d: [{"step": 0, **before[d]}] for d in members}
    bar = tqdm(
        range(trainer.step_index, cfg.steps),
        desc=f"rl {cfg.algorithm}",
        initial=trainer.step_index,
        total=cfg.steps,
    )
    held = f"{curve[members[0]][-1]['accuracy']:.2f}"
    for _ in bar:
        stats = trainer.step()
        if cfg.eval_every and trainer.step_index % cfg.eval_every == 0 and trainer.step_index < cfg.steps:
            result = held_out_eval()
            for d in members:
                curve[d].append({"step": trainer.step_index, **result[d]})
            held = f"{result[members[0]]['accuracy']:.2f}"
        first = stats[members[0]]
        bar.set_postfix(
            reward=f"{first['reward']:.3f}",
            len=f"{first['length']:.1f}",
            kl=f"{first['kl']:.4f}",
            held_out=held,
        )
        if (
            cfg.checkpoint_every
            and trainer.step_index % cfg.checkpoint_every == 0
            and trainer.step_index < cfg.steps
        ):
            checkpointer.save(
                trainer.step_index,
                model,
                trainer.optimizer,
                None,
                {
                    **trainer.state_dict(),
                    "held_out_curve": {str(d): points for d, points in curve.items()},
                    "wall_time_s": prior_wall_s + time.perf_counter() - t_start,
                },
            )
    after = held_out_eval()
    for d in members:
        curve[d].append({"step": trainer.step_index, **after[d]})
    save_family(model, tokenizer, ws.artifacts("rl"))
    write_curves(trainer.history, ws.plots("rl"), cfg.algorithm, curve)

    this_run_s = time.perf_counter() - t_start
    metrics = _metrics(
        cfg,
        trainer,
        members,
        curve,
        n_train=n_train,
        eval_prompts=len(eval_rows),
        resumed_from=resumed_from,
        checkpointer=checkpointer,
        wall_time_s=prior_wall_s + this_run_s,
        this_run_s=this_run_s,
    )
    write_metrics(params, "rl", metrics)
    return metrics


@dataclass
class _Inputs:
    """What the rl stage reads: the SFT family, the prompts split train / eval, the members to train."""

    model: Any
    tokenizer: Any
    train_rows: list[dict]
    eval_rows: list[dict]
    members: list[int]
    rl_path: Path
    sft_dir: Path


def _load_inputs(params: Params) -> _Inputs:
    """Reads rl.jsonl and the SFT family (then seeds everything); a prompt too long for
    `max_position_embeddings` with `rl.max_new_tokens` is an error naming its row."""
    from tasks.training.rl_algos import encode_chat_prompts

    cfg = params.rl
    ws = Workspace.from_params(params)
    rl_path, sft_dir = ws.rl_data, ws.artifacts("sft")
    rows = load_rl_rows(rl_path)
    train_rows, eval_rows = split_rows(rows, cfg.eval_prompts, rl_path)
    model, tokenizer = load_family(sft_dir)
    seed_everything(params.seed)
    members = resolve_members(model.config, cfg.members)
    limit = model.config.max_position_embeddings
    for i, row in enumerate(rows, 1):
        n_tok = encode_chat_prompts(tokenizer, [row["question"]])[0].shape[1]
        if n_tok + cfg.max_new_tokens > limit:
            raise StageError(
                f"{rl_path}: row {i} (id={row['id']!r}) has {n_tok} prompt tokens; with "
                f"rl.max_new_tokens={cfg.max_new_tokens} it exceeds "
                f"max_position_embeddings={limit}"
            )
    return _Inputs(model, tokenizer, train_rows, eval_rows, members, rl_path, sft_dir)


def _metrics(
    cfg,
    trainer: RLTrainer,
    members: list[int],
    curve: HeldOut,
    *,
    n_train: int,
    eval_prompts: int,
    resumed_from: int | None,
    checkpointer: Checkpointer,
    wall_time_s: float,
    this_run_s: float,
) -> dict[str, Any]:
    """Reward and accuracy before/after (mean over members and per member: the first and last points of
    the held-out curve, greedy, before rl, every `rl.eval_every` steps and after), the curve, training
    curves and times."""

    def mean(vals):
        return float(sum(vals) / len(vals))

    before = {d: curve[d][0] for d in members}
    after = {d: curve[d][-1] for d in members}

    per_member = {}
    for d in members:
        hist = trainer.history[d]
        per_member[f"exit_{d}"] = {
            "reward_start": before[d]["reward"],
            "reward_end": after[d]["reward"],
            "accuracy_start": before[d]["accuracy"],
            "accuracy_end": after[d]["accuracy"],
            "train_reward_first": hist[0]["reward"] if hist else None,
            "train_reward_last": hist[-1]["reward"] if hist else None,
            "mean_response_length": mean([h["length"] for h in hist]) if hist else None,
            "tokens_generated": sum(h["tokens_generated"] for h in hist),
            "tokens_trained": sum(h["trained_tokens"] for h in hist),
            "rollout_time_s": sum(h["rollout_s"] for h in hist),
            "train_time_s": sum(h["train_s"] for h in hist),
            "steps_with_gradient": int(sum(h["has_gradient"] for h in hist)),
            "skipped_steps": int(sum(1 - h["has_gradient"] for h in hist)),
            "held_out_curve": held_out_columns(curve[d], ("step", "accuracy", "reward")),
            "curves": {k: [h[k] for h in hist] for k in ("step", *CURVE_KEYS)},
        }
    metrics = {
        "algorithm": cfg.algorithm,
        "members": members,
        "steps": cfg.steps,
        "trainable_params": n_train,
        "reward_start": mean([before[d]["reward"] for d in members]),
        "reward_end": mean([after[d]["reward"] for d in members]),
        "accuracy_start": mean([before[d]["accuracy"] for d in members]),
        "accuracy_end": mean([after[d]["accuracy"] for d in members]),
        "accuracy_gain": mean([after[d]["accuracy"] - before[d]["accuracy"] for d in members]),
        # Optimizer steps whose loss carried a gradient (a non-degenerate group), fewest over the members.
        "steps_with_gradient": min(per_member[f"exit_{d}"]["steps_with_gradient"] for d in members),
        "steps_with_gradient_fraction": min(per_member[f"exit_{d}"]["steps_with_gradient"] for d in members)
        / max(cfg.steps, 1),
        "eval_prompts": eval_prompts,
        "train_time_s": trainer.elapsed_s,
        # Where the time and the work went, summed over members and steps (`dvc metrics diff` shows
        # them side by side for rl.algorithm=grpo and bppo): rollouts (sampling, scoring, selection),
        # training (loss forward/backward + optimizer, as loss_time_s + optimizer_time_s, and the KL
        # measurement), tokens decoded and tokens that carried loss.
        "rollout_time_s": sum(h["rollout_s"] for d in members for h in trainer.history[d]),
        "loss_time_s": sum(h.get("loss_s", 0.0) for d in members for h in trainer.history[d]),
        "optimizer_time_s": sum(h.get("optim_s", 0.0) for d in members for h in trainer.history[d]),
        "update_time_s": sum(h["train_s"] for d in members for h in trainer.history[d]),
        "tokens_generated": sum(h["tokens_generated"] for d in members for h in trainer.history[d]),
        "tokens_trained": sum(h["trained_tokens"] for d in members for h in trainer.history[d]),
        "resumed_from_step": resumed_from,
        "stale_checkpoint": checkpointer.stale,
        "skipped_checkpoints": checkpointer.skipped,
        "wall_time_s": wall_time_s,
        "wall_time_this_run_s": this_run_s,
        **per_member,
    }
    return metrics


def main(argv: list[str] | None = None) -> int:
    return stage_main("rl", __doc__, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
