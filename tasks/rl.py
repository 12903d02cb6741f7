"""Stage `rl`: on-policy RL with a verifiable math reward on the family's members, GRPO or BPPO.

    python -m tasks.rl [--params params.yaml] [--set rl.algorithm=grpo] [--set rl.members=all] ...

Reads `artifacts/sft/`, `data/validated/rl.jsonl` and, with `rl.select_prompts`, `select.jsonl` (the
checkpoint selection: the weights of the held-out evaluation point, step 0 included, that answers the
most select problems are kept). Writes `artifacts/rl/`, resumable checkpoints in
`artifacts/checkpoints/rl/`, `metrics/rl.json` (reward and accuracy before/after per member, the kept
step, steps with gradient, timings), `reports/rl/items.jsonl` (each held-out prompt's greedy verdict
before rl and at the kept step, per member: what the gates resample) and `plots/rl/curves.{png,csv}`.
The step is `tasks.training.rl_trainer.RLTrainer`, the losses are in `tasks.training.rl_algos`. Choices:
docs/choices.md#rl.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_contracts.items import rl_item_rows
from tasks.core.artifacts import load_family, save_family
from tasks.core.files import atomic_file, pyplot, save_figure, sha256_file, write_jsonl, write_metrics
from tasks.core.params import Params
from tasks.core.paths import Workspace
from tasks.core.stage import StageError, seed_everything, stage_main
from tasks.training.checkpoint import Checkpointer, dir_sha256, fingerprint_info
from tasks.training.curves import HeldOut, draw_held_out, held_out_columns, running_mean
from tasks.training.rl_trainer import (
    RLTrainer,
    evaluate_members,
    load_rl_rows,
    load_select_rows,
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
    params: Params,
    rl_path: Path,
    sft_dir: Path,
    code_root: Path | None = None,
    select_path: Path | None = None,
) -> dict[str, Any]:
    """What an rl checkpoint must agree on (`tasks.training.checkpoint.fingerprint_info`): params.rl, the
    seed, rl.jsonl, the SFT checkpoint and the code of every module this stage imports. `steps` and
    `checkpoint_every` are left out: extending a run resumes it (the lr is constant, so nothing before
    step n depends on the total); so are `kl_every` (the KL metric's pass draws nothing and trains
    nothing) and `eval_every` (greedy evaluation never changes training), unless `rl.select_prompts`
    selects among its points: then it and select.jsonl (`select_path`) count."""
    inputs = {"rl": sha256_file(rl_path), "sft": dir_sha256(sft_dir)}
    extra = None
    if params.rl.select_prompts:
        if select_path is None:
            raise ValueError("rl.select_prompts is set: checkpoint_info needs select_path")
        inputs["select"] = sha256_file(select_path)
        extra = {"selection_eval_every": params.rl.eval_every}
    return fingerprint_info(
        "rl",
        params.rl,
        seed=params.seed,
        exclude=("steps", "checkpoint_every", "eval_every", "kl_every"),
        inputs=inputs,
        extra=extra,
        code_root=code_root,
    )


# --- checkpoint selection --------------------------------------------------------------------------


class Selection:
    """rl's checkpoint selection (`rl.select_prompts`): at each held-out evaluation point the members'
    mean greedy accuracy on the select rows; keeps a copy of the trainable weights of the best point so
    far (the earliest of equals: fewer rl steps for the same score, step 0 being the SFT weights)."""

    def __init__(self, rows: list[dict], trainable: list[tuple[str, Any]]):
        self.rows = rows
        self.trainable = trainable
        self.curve: list[dict[str, float]] = []
        self.best: dict[str, float] | None = None
        self.weights: dict[str, Any] = {}

    def observe(self, step: int, model, tokenizer, members: list[int], cfg) -> None:
        result = evaluate_members(model, tokenizer, self.rows, members, cfg.max_new_tokens, cfg.format_reward)
        point = {
            "step": step,
            "accuracy": sum(result[d]["accuracy"] for d in members) / len(members),
            "reward": sum(result[d]["reward"] for d in members) / len(members),
        }
        self.curve.append(point)
        if self.best is None or point["accuracy"] > self.best["accuracy"]:
            self.best = point
            self.weights = {name: p.detach().clone() for name, p in self.trainable}
        log.info(
            "rl: select accuracy %.3f at step %d (best %.3f, step %d)",
            point["accuracy"],
            step,
            self.best["accuracy"],
            self.best["step"],
        )

    def restore(self) -> None:
        """Copies the kept weights into the trainable parameters."""
        import torch

        with torch.no_grad():
            for name, p in self.trainable:
                p.copy_(self.weights[name])

    def state_dict(self) -> dict[str, Any]:
        return {"selection_curve": self.curve, "selection_best": self.best}

    def load(self, state: dict[str, Any], tensors: dict[str, Any], where: Path) -> None:
        self.curve = list(state.get("selection_curve") or [])
        self.best = state.get("selection_best")
        names = {name for name, _ in self.trainable}
        if self.best is not None and set(tensors) != names:
            raise StageError(
                f"{where}: the kept weights hold {sorted(set(tensors) ^ names)[:5]} unlike the trainable "
                "parameters; delete the checkpoint to start over"
            )
        self.weights = dict(tensors)


# --- plots -----------------------------------------------------------------------------------------


def _cell(value: float | None) -> float | str:
    """A curves.csv cell: the value to 6 decimals, empty where a step did not measure it (kl)."""
    return "" if value is None else round(float(value), 6)


def write_curves(
    history: dict[int, list[dict[str, float | None]]],
    out_dir: Path,
    algorithm: str,
    held_out: HeldOut | None = None,
    window: int = 10,
    selection: Selection | None = None,
) -> None:
    """`curves.csv` (step, member and every curve) and `curves.png` (reward, accuracy, length, KL).

    Reward and sampled accuracy move a lot from step to step (8 prompts a step): each member's steps are
    faint points with their running mean over the last `window` steps drawn through them. `held_out`
    (member -> its held-out evaluations, `{"step", "accuracy", ...}` each: before rl, every
    `rl.eval_every` steps, after rl) is drawn on the accuracy panel, so the figure shows what rl changed
    where it counts, beside what it sampled; so is the checkpoint selection's select curve, with the
    kept step marked."""
    import csv
    import io

    plt = pyplot()
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["step", "member", *CURVE_KEYS])
    for d, rows in history.items():
        for r in rows:
            writer.writerow([int(r["step"]), f"exit_{d}", *[_cell(r.get(k, 0.0)) for k in CURVE_KEYS]])
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
        measured = [r for r in rows if r["kl"] is not None]  # every rl.kl_every-th step (beta 0)
        axes[1, 1].plot(
            [r["step"] for r in measured], [r["kl"] for r in measured], "o-", ms=3, label=f"exit {d}"
        )
    draw_held_out(axes[0, 1], held_out or {}, colors)
    if selection is not None and selection.curve:
        ax = axes[0, 1]
        ax.plot(
            [p["step"] for p in selection.curve],
            [p["accuracy"] for p in selection.curve],
            "k:",
            marker="s",
            ms=3,
            label="select (greedy, mean of members)",
        )
        ax.axvline(selection.best["step"], color="k", lw=0.8, alpha=0.5)
        ax.annotate(
            f"kept: step {selection.best['step']}",
            (selection.best["step"], selection.best["accuracy"]),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
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
    select_path = ws.validated_file("select.jsonl") if cfg.select_prompts else None
    selection = (
        Selection(load_select_rows(select_path, cfg.select_prompts), trainable) if select_path else None
    )
    checkpointer = Checkpointer(
        ws.checkpoints("rl"), checkpoint_info(params, rl_path, sft_dir, select_path=select_path)
    )
    latest = checkpointer.find_resumable()
    state = None
    if latest is not None:
        state = checkpointer.load(latest, model, trainer.optimizer)
        trainer.load_state_dict(state)
        if selection is not None:
            selection.load(state, checkpointer.load_tensors(latest), latest)
    resumed_from = trainer.step_index if state is not None else None
    # Wall time of the earlier processes up to the checkpoint resumed from (work after it was redone).
    prior_wall_s = float(state.get("wall_time_s", 0.0)) if state is not None else 0.0

    def held_out_eval() -> dict[int, dict[str, float]]:
        if selection is not None:
            selection.observe(trainer.step_index, model, tokenizer, members, cfg)
        return evaluate_members(model, tokenizer, eval_rows, members, cfg.max_new_tokens, cfg.format_reward)

    # Each member's held-out evaluations: step 0 (before rl), every rl.eval_every steps, after rl, each with
    # its per-prompt verdicts. Its first point and the kept step's are the before/after figures (and the
    # gates' per-prompt file); a checkpoint keeps it whole.
    curve = {int(d): list(points) for d, points in (state or {}).get("held_out_curve", {}).items()}
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
    kl = "-"  # the last measured KL (rl.kl_every)
    for _ in bar:
        stats = trainer.step()
        if cfg.eval_every and trainer.step_index % cfg.eval_every == 0 and trainer.step_index < cfg.steps:
            result = held_out_eval()
            for d in members:
                curve[d].append({"step": trainer.step_index, **result[d]})
            held = f"{result[members[0]]['accuracy']:.2f}"
        first = stats[members[0]]
        if first["kl"] is not None:
            kl = f"{first['kl']:.4f}"
        bar.set_postfix(reward=f"{first['reward']:.3f}", len=f"{first['length']:.1f}", kl=kl, held_out=held)
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
                    **(selection.state_dict() if selection is not None else {}),
                    "held_out_curve": {str(d): points for d, points in curve.items()},
                    "wall_time_s": prior_wall_s + time.perf_counter() - t_start,
                },
                tensors=selection.weights if selection is not None else None,
            )
    after = held_out_eval()
    for d in members:
        curve[d].append({"step": trainer.step_index, **after[d]})
    kept = trainer.step_index
    if selection is not None:
        kept = int(selection.best["step"])
        if kept != trainer.step_index:
            selection.restore()
            log.info(
                "rl: kept the weights of step %d (select accuracy %.3f)", kept, selection.best["accuracy"]
            )
    save_family(model, tokenizer, ws.artifacts("rl"))
    write_jsonl(ws.rl_items, rl_item_rows(curve, members, eval_rows, kept))
    write_curves(trainer.history, ws.plots("rl"), cfg.algorithm, curve, selection=selection)

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
        kept_step=kept,
        selection=selection,
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
    kept_step: int,
    selection: Selection | None = None,
) -> dict[str, Any]:
    """Reward and accuracy before/after (mean over members and per member: the held-out curve's first
    point and its point at `kept_step`, the weights the stage saved; greedy, before rl, every
    `rl.eval_every` steps and after), the curve, training curves and times."""

    def mean(vals):
        return float(sum(vals) / len(vals))

    before = {d: curve[d][0] for d in members}
    after = {d: next(p for p in curve[d] if p["step"] == kept_step) for d in members}
    last = {d: curve[d][-1] for d in members}

    per_member = {}
    for d in members:
        hist = trainer.history[d]
        per_member[f"exit_{d}"] = {
            "reward_start": before[d]["reward"],
            "reward_end": after[d]["reward"],
            "accuracy_start": before[d]["accuracy"],
            "accuracy_end": after[d]["accuracy"],
            "accuracy_last_step": last[d]["accuracy"],
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
        # The weights saved: those after kept_step steps (the last step unless rl.select_prompts chose).
        "kept_step": kept_step,
        "accuracy_last_step": mean([last[d]["accuracy"] for d in members]),
        "selection": None
        if selection is None
        else {
            "split": "select.jsonl",
            "prompts": len(selection.rows),
            "curve": held_out_columns(selection.curve, ("step", "accuracy", "reward")),
            "kept_step": kept_step,
            "kept_accuracy": selection.best["accuracy"],
        },
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
