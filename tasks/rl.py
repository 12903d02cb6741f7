"""The `rl` stage: on-policy RL with a verifiable math reward on the family's members, GRPO or BPPO.

Command line:
    python -m tasks.rl [--params params.yaml] [--set rl.algorithm=grpo] [--set rl.members=all] ...
    ruyi stage rl ...

Reads `artifacts/sft/` (model + tokenizer, `tasks.core.load_family`) and
`data/validated/rl.jsonl` ({"id", "question", "answer", "level"}). Writes `artifacts/rl/`
(`save_family`), `metrics/rl.json`, `plots/rl/curves.{png,csv}` and resumable checkpoints in
`artifacts/checkpoints/rl/step_<n>/`.

What one step does (`RLTrainer.step`), for every trained member d:
1. takes `prompts_per_step` training prompts (a seeded permutation per epoch), renders them with the
   chat template (`<|im_start|>assistant\\n` generation prompt) and samples `group_size` responses
   each at member d, with its own KV cache, up to `max_new_tokens` (BPPO with the adaptive schedule:
   up to the current budget) or `<|im_end|>`/eos (`tasks.training.rl_algos.sample_completions`);
2. scores them: 1 for the exact final answer (`tasks.data.mathgen.answers_match` on `extract_answer`) plus
   `format_reward` for a well-formed final `#### <number>` line; group-normalised advantages as TRL;
3. GRPO trains on all responses; BPPO on the shortest correct and shortest incorrect response of
   every non-degenerate group, through their prefixes only (tasks/training/rl_algos.py has the formulas and
   every choice the papers leave open);
4. one optimizer step (AdamW, constant lr, no weight decay, gradient clipping) per generation batch,
   or `num_iterations` steps reusing it with importance ratios against the sampling policy.
The losses of several members (`members: all`) are summed into one optimizer step.

Why not TRL's GRPOTrainer: it samples with `generate()` under the checkpoint's generation config
(no member selection, top-k etc. leaking in), owns the training loop and batching, and BPPO's
row/prefix selection would mean overriding most of it. We keep TRL's loss exactly (the parity test
compares loss and gradients with `GRPOTrainer.compute_loss`) and write the loop around our
member-aware sampler.

Design choices and deviations:
- Members: `dae` trains every member with DaE blocks (normally one: the expanded smallest member),
  and only `ruyi_model.dae.dae_trainable_parameters` (its DaE blocks, norm and head), so the other
  members stay bit-identical. A family without DaE blocks falls back to the smallest member and its
  own parameters (branch layers, norm, untied head), again leaving the others unchanged (logged).
  `all` (or a list of exit layers) samples and trains each listed member with its own rollouts and
  trains every parameter of the family: the shared backbone moves for all members.
- Old log-probs: with `num_iterations: 1` (default, as TRL) the ratio is exactly 1 (old = current,
  detached); with more iterations the log-probs measured right after sampling are the old ones.
- Reference model for `beta > 0`: a frozen copy of the SFT model, as TRL's separate ref model.
- KL in the metrics: k3 to the reference when `beta > 0` (at the step-start policy, on the trained
  tokens); otherwise k3 of KL(step-start policy || updated policy) on the trained tokens, one extra
  no-grad forward after the update (the brief's "approx" KL).
- Evaluation: the last `eval_prompts` rows of rl.jsonl are never trained on; greedy decoding
  (`ruyi_model.decoding.greedy_generate`, `max_new_tokens`) gives reward and accuracy per member before
  and after training (`reward_start/end`, `accuracy_start/end` in metrics are their means).
- Reproducibility: prompt order and every rollout draw from generators seeded by (seed, epoch) and
  (seed, step, member); no other randomness. Resume is automatic and logged (`resumed_from_step`):
  a checkpoint holds the weights, the optimizer, the adaptive budgets, the curves and the
  evaluation before training, so a resumed run equals an uninterrupted one bitwise on CPU (tested).
  Checkpoints carry a fingerprint of `params.rl` (but `steps`, `checkpoint_every`), the seed,
  rl.jsonl, the SFT checkpoint and the stage's code (tasks/rl.py, tasks/training/rl_algos.py); one made
  from different inputs is moved aside to `artifacts/checkpoints/rl.stale-<time>-<random hex>/`
  (unique even for two set-asides within one second) with a warning, never resumed.
- Timing: `time_s`, `rollout_s`, `train_s` in the curves count training steps only (rollouts,
  losses, optimizer, the KL metric), not evaluation or checkpointing; `wall_time_s` is the whole
  stage, cumulative over resumes like `train_time_s` (the earlier processes' time up to the checkpoint
  resumed from, stored in it, plus this process; work done after that checkpoint by a killed process
  was redone and is not counted), and `wall_time_this_run_s` this process alone. They are
  measurements; every other number in metrics/rl.json is reproducible bitwise on CPU with the same
  torch thread count.
- Steps without gradient: a BPPO step where no group has a correct/incorrect pair (or a GRPO step
  where every group's rewards are equal) carries no learning signal; BPPO then takes no optimizer
  step. The curves' `has_gradient` (1/0) marks them, and every member's metrics count
  `steps_with_gradient` and `skipped_steps`. `benchmarks/bppo_vs_grpo.py` counts only steps with
  gradient as optimizer steps to the target.
- A checkpoint stores the whole model (simple and robust; with `members: dae` only the DaE
  parameters change, so a paper-scale run could store just those).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from tasks.core.artifacts import load_family, save_family
from tasks.core.codedeps import code_fingerprint
from tasks.core.files import save_figure, write_json, write_metrics
from tasks.core.params import Params
from tasks.core.paths import checkpoint_dir, plots_dir, stage_dir
from tasks.core.stage import StageError, seed_everything, stage_main
from tasks.training.rl_trainer import (
    RLTrainer,
    evaluate_members,
    load_rl_rows,
    resolve_members,
    split_rows,
    trainable_parameters,
)

log = logging.getLogger("ruyi.rl")

CURVE_KEYS = ("reward", "accuracy", "length", "kl", "budget", "tokens_generated", "trained_tokens",
              "loss", "clip_ratio", "pairs", "skipped_groups", "has_gradient", "truncated", "rollout_s", "train_s",
              "time_s")


# --- checkpoints -----------------------------------------------------------------------------------


def fingerprint(params: Params, rl_path: Path, sft_dir: Path) -> str:
    """Hash of what a checkpoint depends on: params.rl, the seed, rl.jsonl, the SFT checkpoint and the
    code of every module this stage imports (`tasks.core.codedeps`)."""
    h = hashlib.sha256()
    # `steps` and `checkpoint_every` are left out: extending a run resumes it (the lr is constant, so
    # nothing before step n depends on the total).
    rl = params.rl.model_dump(exclude={"steps", "checkpoint_every"})
    h.update(json.dumps({"rl": rl, "seed": params.seed}, sort_keys=True).encode())
    h.update(json.dumps(code_fingerprint("rl"), sort_keys=True).encode())
    for path in [rl_path, *sorted(sft_dir.glob("*.json")), *sorted(sft_dir.glob("*.safetensors"))]:
        h.update(path.name.encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def save_checkpoint(root: Path, trainer: RLTrainer, extra: dict[str, Any], keep: int = 2) -> Path:
    """Writes `root/step_<n>/` atomically (weights, optimizer, trainer state) and keeps the last `keep`."""
    import torch
    from safetensors.torch import save_file

    from tasks.core.files import atomic_dir

    final = root / f"step_{trainer.step_index:06d}"
    with atomic_dir(final) as tmp:
        state = {k: v.detach().contiguous() for k, v in trainer.model.state_dict().items()}
        save_file(state, tmp / "model.safetensors")
        torch.save(trainer.optimizer.state_dict(), tmp / "optimizer.pt")
        write_json(tmp / "state.json", {**trainer.state_dict(), **extra})
    for old in sorted(root.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def try_resume(root: Path, trainer: RLTrainer, fp: str) -> dict[str, Any] | None:
    """Loads the latest checkpoint with fingerprint `fp` into `trainer`; a stale one is moved aside."""
    import torch
    from safetensors.torch import load_file

    ckpts = sorted(root.glob("step_*")) if root.is_dir() else []
    if not ckpts:
        return None
    latest = ckpts[-1]
    state = json.loads((latest / "state.json").read_text())
    if state.get("fingerprint") != fp:
        # Time for the reader, a random suffix for uniqueness (two set-asides within one second).
        stale = root.with_name(f"{root.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}")
        log.warning("checkpoint %s was made from different params, data, SFT model or code; moving %s aside to %s and "
                    "starting from scratch", latest, root, stale)
        root.rename(stale)
        return None
    weights = load_file(latest / "model.safetensors")
    missing, unexpected = trainer.model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise StageError(f"checkpoint {latest} does not match the model: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    trainer.optimizer.load_state_dict(torch.load(latest / "optimizer.pt", weights_only=True))
    trainer.load_state_dict(state)
    log.info("resumed rl from %s (step %d)", latest, trainer.step_index)
    return state


# --- plots -----------------------------------------------------------------------------------------


def write_curves(history: dict[int, list[dict[str, float]]], out_dir: Path, algorithm: str) -> None:
    """`curves.csv` (step, member and every curve) and `curves.png` (reward, accuracy, length, KL)."""
    import csv
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tasks.core.files import atomic_file

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["step", "member", *CURVE_KEYS])
    for d, rows in history.items():
        for r in rows:
            writer.writerow([int(r["step"]), f"exit_{d}", *[round(float(r.get(k, 0.0)), 6) for k in CURVE_KEYS]])
    with atomic_file(out_dir / "curves.csv") as f:
        f.write(buf.getvalue())
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for d, rows in history.items():
        steps = [r["step"] for r in rows]
        axes[0, 0].plot(steps, [r["reward"] for r in rows], label=f"exit {d}")
        axes[0, 1].plot(steps, [r["accuracy"] for r in rows], label=f"exit {d}")
        axes[1, 0].plot(steps, [r["length"] for r in rows], label=f"exit {d} mean length")
        if any(r["budget"] for r in rows):
            axes[1, 0].plot(steps, [r["budget"] for r in rows], "--", label=f"exit {d} budget")
        axes[1, 1].plot(steps, [r["kl"] for r in rows], label=f"exit {d}")
    for ax, title in zip(axes.flat, ["reward (sampled)", "accuracy (sampled)", "response length (tokens)", "KL"]):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.suptitle(f"rl ({algorithm})")
    fig.tight_layout()
    save_figure(fig, out_dir / "curves.png")


# --- the stage -------------------------------------------------------------------------------------


def run(params: Params) -> dict[str, Any]:
    """Runs the rl stage (see the module docstring); returns its metrics."""
    from tqdm.auto import tqdm

    from tasks.training.rl_algos import encode_chat_prompts

    t_start = time.perf_counter()
    cfg = params.rl
    rl_path = Path(params.paths.data_dir) / "validated" / "rl.jsonl"
    sft_dir = stage_dir(params, "sft")
    rows = load_rl_rows(rl_path)
    train_rows, eval_rows = split_rows(rows, cfg.eval_prompts, rl_path)
    model, tokenizer = load_family(sft_dir)
    seed_everything(params.seed)
    members = resolve_members(model.config, cfg.members)
    limit = model.config.max_position_embeddings
    for i, row in enumerate(rows, 1):
        n_tok = encode_chat_prompts(tokenizer, [row["question"]])[0].shape[1]
        if n_tok + cfg.max_new_tokens > limit:
            raise StageError(f"{rl_path}: row {i} (id={row['id']!r}) has {n_tok} prompt tokens; with "
                             f"rl.max_new_tokens={cfg.max_new_tokens} it exceeds max_position_embeddings={limit}")
    trainable = trainable_parameters(model, cfg.members, members)
    n_train = sum(p.numel() for _, p in trainable)
    log.info("rl: %s on members %s, %d trainable parameters of %d, %d train / %d eval prompts", cfg.algorithm,
             members, n_train, sum(p.numel() for p in model.parameters()), len(train_rows), len(eval_rows))
    trainer = RLTrainer(model, tokenizer, train_rows, cfg, members=members, trainable=trainable, seed=params.seed)
    ckpt_root = checkpoint_dir(params, "rl")
    fp = fingerprint(params, rl_path, sft_dir)
    state = try_resume(ckpt_root, trainer, fp)
    resumed_from = trainer.step_index if state is not None else None
    # Wall time of the earlier processes up to the checkpoint resumed from (work after it was redone).
    prior_wall_s = float(state.get("wall_time_s", 0.0)) if state is not None else 0.0
    if state is not None:
        before = {int(d): v for d, v in state["eval_before"].items()}
    else:
        before = evaluate_members(model, tokenizer, eval_rows, members, cfg.max_new_tokens, cfg.format_reward)
    bar = tqdm(range(trainer.step_index, cfg.steps), desc=f"rl {cfg.algorithm}", initial=trainer.step_index,
               total=cfg.steps)
    for _ in bar:
        stats = trainer.step()
        first = stats[members[0]]
        bar.set_postfix(reward=f"{first['reward']:.3f}", len=f"{first['length']:.1f}", kl=f"{first['kl']:.4f}")
        if cfg.checkpoint_every and trainer.step_index % cfg.checkpoint_every == 0 and trainer.step_index < cfg.steps:
            save_checkpoint(ckpt_root, trainer, {"fingerprint": fp,
                                                 "eval_before": {str(d): v for d, v in before.items()},
                                                 "wall_time_s": prior_wall_s + time.perf_counter() - t_start})
    # DVC declares the checkpoint directory as an output: it exists even when no checkpoint was due.
    ckpt_root.mkdir(parents=True, exist_ok=True)
    after = evaluate_members(model, tokenizer, eval_rows, members, cfg.max_new_tokens, cfg.format_reward)
    save_family(model, tokenizer, stage_dir(params, "rl"))
    write_curves(trainer.history, plots_dir(params, "rl"), cfg.algorithm)

    def mean(vals):
        return float(sum(vals) / len(vals))

    per_member = {}
    for d in members:
        hist = trainer.history[d]
        per_member[f"exit_{d}"] = {
            "reward_start": before[d]["reward"], "reward_end": after[d]["reward"],
            "accuracy_start": before[d]["accuracy"], "accuracy_end": after[d]["accuracy"],
            "train_reward_first": hist[0]["reward"] if hist else None,
            "train_reward_last": hist[-1]["reward"] if hist else None,
            "mean_response_length": mean([h["length"] for h in hist]) if hist else None,
            "tokens_generated": sum(h["tokens_generated"] for h in hist),
            "steps_with_gradient": int(sum(h["has_gradient"] for h in hist)),
            "skipped_steps": int(sum(1 - h["has_gradient"] for h in hist)),
            "curves": {k: [h[k] for h in hist] for k in ("step", *CURVE_KEYS)},
        }
    this_run_s = time.perf_counter() - t_start
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
        "eval_prompts": len(eval_rows),
        "train_time_s": trainer.elapsed_s,
        "resumed_from_step": resumed_from,
        "wall_time_s": prior_wall_s + this_run_s,
        "wall_time_this_run_s": this_run_s,
        **per_member,
    }
    write_metrics(params, "rl", metrics)
    return metrics


def main(argv: list[str] | None = None) -> int:
    return stage_main("rl", __doc__, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
