"""The `rl` stage: on-policy RL with a verifiable math reward on the family's members, GRPO or BPPO.

Command line:
    python -m tasks.rl [--params params.yaml] [--set rl.algorithm=grpo] [--set rl.members=all] ...
    ruyi stage rl ...

Reads `artifacts/sft/` (model + tokenizer, `tasks.common.load_family`) and
`data/validated/rl.jsonl` ({"id", "question", "answer", "level"}). Writes `artifacts/rl/`
(`save_family`), `metrics/rl.json`, `plots/rl/curves.{png,csv}` and resumable checkpoints in
`artifacts/checkpoints/rl/step_<n>/`.

What one step does (`RLTrainer.step`), for every trained member d:
1. takes `prompts_per_step` training prompts (a seeded permutation per epoch), renders them with the
   chat template (`<|im_start|>assistant\\n` generation prompt) and samples `group_size` responses
   each at member d, with its own KV cache, up to `max_new_tokens` (BPPO with the adaptive schedule:
   up to the current budget) or `<|im_end|>`/eos (`tasks.rl_algos.sample_completions`);
2. scores them: 1 for the exact final answer (`tasks.mathgen.answers_match` on `extract_answer`) plus
   `format_reward` for a well-formed final `#### <number>` line; group-normalised advantages as TRL;
3. GRPO trains on all responses; BPPO on the shortest correct and shortest incorrect response of
   every non-degenerate group, through their prefixes only (tasks/rl_algos.py has the formulas and
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
  (`tasks.decoding.greedy_generate`, `max_new_tokens`) gives reward and accuracy per member before
  and after training (`reward_start/end`, `accuracy_start/end` in metrics are their means).
- Reproducibility: prompt order and every rollout draw from generators seeded by (seed, epoch) and
  (seed, step, member); no other randomness. Resume is automatic and logged (`resumed_from_step`):
  a checkpoint holds the weights, the optimizer, the adaptive budgets, the curves and the
  evaluation before training, so a resumed run equals an uninterrupted one bitwise on CPU (tested).
  Checkpoints carry a fingerprint of `params.rl` (but `steps`, `checkpoint_every`), the seed,
  rl.jsonl, the SFT checkpoint and the stage's code (tasks/rl.py, tasks/rl_algos.py); one made
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

import copy
import hashlib
import json
import logging
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.common import (
    StageError,
    checkpoint_dir,
    load_family,
    plots_dir,
    read_jsonl,
    save_family,
    save_figure,
    seed_everything,
    stage_dir,
    stage_main,
    write_json,
    write_metrics,
)
from tasks.params import Params, RLParams

log = logging.getLogger("ruyi.rl")

CURVE_KEYS = ("reward", "accuracy", "length", "kl", "budget", "tokens_generated", "trained_tokens",
              "loss", "clip_ratio", "pairs", "skipped_groups", "has_gradient", "truncated", "rollout_s", "train_s",
              "time_s")


# --- members and parameters ------------------------------------------------------------------


def resolve_members(config, spec: str | list[int]) -> list[int]:
    """The exit layers RL samples and trains for `rl.members` (see the module docstring)."""
    exits = list(config.exit_layers)
    if spec == "all":
        return exits
    if spec == "dae":
        dae = [d for d in exits if config.num_dae_blocks(d) > 0]
        return dae or [exits[0]]
    bad = [d for d in spec if d not in exits]
    if bad:
        raise StageError(f"rl.members {bad} are not exits of the SFT checkpoint (exits: {exits})")
    return sorted(set(spec))


def trainable_parameters(model, spec: str | list[int], members: list[int]) -> list[tuple[str, Any]]:
    """`(name, parameter)` pairs RL trains; sets `requires_grad` True on them and False elsewhere."""
    if spec == "dae":
        from ruyi_model.dae import dae_trainable_parameters

        pairs: list[tuple[str, Any]] = []
        for d in members:
            if model.config.num_dae_blocks(d) > 0:
                try:
                    pairs += dae_trainable_parameters(model, d)
                except ValueError as e:
                    raise StageError(f"rl.members=dae: {e}") from None
            else:
                log.warning("rl.members=dae but the family has no DaE blocks: training member %d's own "
                            "parameters (branch layers, norm, head); the other members stay unchanged", d)
                pairs += [(f"exits.{d}.{n}", p) for n, p in model.exits[str(d)].named_parameters()]
    else:
        pairs = list(model.named_parameters())
    chosen = {id(p) for _, p in pairs}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
    if not pairs:
        raise StageError(f"rl.members={spec!r}: no trainable parameters")
    return pairs


# --- data ----------------------------------------------------------------------------------------


def load_rl_rows(path: Path) -> list[dict[str, Any]]:
    """Reads rl.jsonl; an empty question or a non-numeric answer is an error naming file and row."""
    from tasks.mathgen import parse_number

    rows = read_jsonl(path, required=("id", "question", "answer"))
    for i, row in enumerate(rows, 1):
        if not isinstance(row["question"], str) or not row["question"].strip():
            raise StageError(f"{path}: row {i} (id={row['id']!r}): empty question")
        if parse_number(str(row["answer"])) is None:
            raise StageError(f"{path}: row {i} (id={row['id']!r}): answer {row['answer']!r} is not a number")
    return rows


def split_rows(rows: list[dict], eval_prompts: int, path: Path) -> tuple[list[dict], list[dict]]:
    """(train, eval): the last `eval_prompts` rows are the fixed held-out evaluation slice."""
    if len(rows) <= eval_prompts:
        raise StageError(f"{path}: {len(rows)} rows, but rl.eval_prompts={eval_prompts} of them are held out "
                         "for evaluation; need more rows (or lower rl.eval_prompts)")
    return rows[:-eval_prompts], rows[-eval_prompts:]


def evaluate_members(model, tokenizer, rows: list[dict], members: list[int], max_new_tokens: int,
                     format_reward: float, batch_size: int = 16) -> dict[int, dict[str, float]]:
    """Greedy reward and accuracy of each member on `rows` (`tasks.decoding.greedy_generate`)."""
    from tasks.decoding import greedy_generate
    from tasks.rl_algos import score_responses

    out = {}
    for d in members:
        texts = greedy_generate(model, tokenizer, [r["question"] for r in rows], exit_layer=d,
                                max_new_tokens=max_new_tokens, batch_size=batch_size)
        rewards, correct = score_responses(texts, [str(r["answer"]) for r in rows], format_reward)
        out[d] = {"reward": float(rewards.mean()), "accuracy": float(correct.float().mean())}
    return out


# --- the trainer ---------------------------------------------------------------------------------


@dataclass
class TrainBatch:
    """What one member's loss needs (rows already restricted to those carrying gradient).

    Shapes: prompt B x P, completion/mask B x C; advantages B; log-probs B x C (or None).
    """

    prompt_ids: Any
    prompt_mask: Any
    completion_ids: Any
    completion_mask: Any
    loss_mask: Any
    advantages: Any
    num_items: float
    old_logps: Any = None
    ref_logps: Any = None
    start_logps: Any = None


def _seed_for(*parts: int) -> int:
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class RLTrainer:
    """GRPO/BPPO training of a family's members, one generation batch per `step()`.

    Args:
        model: a FamilialForCausalLM (trained in place).
        tokenizer: its chat tokenizer.
        train_rows: rl.jsonl rows ({"question", "answer"}) to sample prompts from.
        cfg: the `rl` params section.
        members: exit layers to sample and train (`resolve_members`).
        trainable: `(name, parameter)` pairs to optimize (`trainable_parameters`).
        seed: base seed of the prompt order and the rollouts.
    """

    def __init__(self, model, tokenizer, train_rows: list[dict], cfg: RLParams, *, members: list[int],
                 trainable: list[tuple[str, Any]], seed: int):
        import torch

        from tasks.decoding import stop_token_ids
        from tasks.rl_algos import AdaptiveBudget

        if not train_rows:
            raise ValueError("RLTrainer needs at least one training prompt")
        self.model, self.tokenizer, self.rows, self.cfg = model, tokenizer, train_rows, cfg
        self.members, self.seed = list(members), seed
        self.params = [p for _, p in trainable]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=0.0)
        self.stop_ids = stop_token_ids(tokenizer)
        self.ref_model = None
        if cfg.beta > 0:
            self.ref_model = copy.deepcopy(model).eval()
            for p in self.ref_model.parameters():
                p.requires_grad_(False)
        use_budget = cfg.algorithm == "bppo" and cfg.bppo.adaptive_budget
        self.budgets = {d: AdaptiveBudget(cfg.max_new_tokens, cfg.bppo.budget_min_tokens, cfg.bppo.budget_margin,
                                          cfg.bppo.budget_ema) if use_budget else None for d in self.members}
        self.history: dict[int, list[dict[str, float]]] = {d: [] for d in self.members}
        self.step_index = 0
        self.elapsed_s = 0.0
        self._perms: dict[int, list[int]] = {}

    # -- prompts --
    def prompts_for_step(self, step: int) -> list[dict]:
        """The `prompts_per_step` rows of step `step`: consecutive slices of per-epoch permutations."""
        import torch

        n, per = len(self.rows), self.cfg.prompts_per_step
        out = []
        for k in range(step * per, (step + 1) * per):
            epoch = k // n
            if epoch not in self._perms:
                gen = torch.Generator().manual_seed(_seed_for(self.seed, "epoch", epoch))
                self._perms = {epoch: torch.randperm(n, generator=gen).tolist()}
            out.append(self.rows[self._perms[epoch][k % n]])
        return out

    # -- one member's rollouts --
    def _rollout(self, rows: list[dict], d: int, step: int) -> tuple[TrainBatch | None, dict[str, float], list[int]]:
        import torch

        from tasks.rl_algos import (
            bppo_select,
            decode_completions,
            encode_chat_prompts,
            group_advantages,
            per_token_logps,
            prefix_lengths,
            prefix_mask,
            sample_completions,
            score_responses,
            trim_left_padding,
        )

        cfg, g = self.cfg, self.cfg.group_size
        budget = self.budgets[d].budget if self.budgets[d] is not None else cfg.max_new_tokens
        prompt_ids, prompt_mask = encode_chat_prompts(self.tokenizer, [r["question"] for r in rows])
        prompt_ids, prompt_mask = prompt_ids.repeat_interleave(g, 0), prompt_mask.repeat_interleave(g, 0)
        gen = torch.Generator().manual_seed(_seed_for(self.seed, "rollout", step, d))
        comp, cmask, truncated = sample_completions(
            self.model, prompt_ids, prompt_mask, exit_layer=d, max_new_tokens=budget, stop_ids=self.stop_ids,
            pad_id=self.tokenizer.pad_token_id, temperature=cfg.temperature, generator=gen)
        texts = decode_completions(self.tokenizer, comp, cmask)
        golds = [str(r["answer"]) for r in rows for _ in range(g)]
        rewards, correct = score_responses(texts, golds, cfg.format_reward)
        adv = group_advantages(rewards, g, scale=cfg.scale_rewards)
        lengths = cmask.sum(1)
        stats = {"reward": float(rewards.mean()), "accuracy": float(correct.float().mean()),
                 "length": float(lengths.float().mean()), "budget": float(budget),
                 "tokens_generated": float(lengths.sum()), "truncated": float(truncated.float().mean())}
        shortest_correct: list[int] = []
        if cfg.algorithm == "grpo":
            batch = TrainBatch(prompt_ids, prompt_mask, comp, cmask, cmask, adv, float(cmask.sum()))
            # Every group degenerate (all rewards equal): no advantage signal, the loss carries no gradient.
            r = rewards.view(-1, g)
            stats["has_gradient"] = float(bool((r.max(1).values != r.min(1).values).any()))
        else:
            sel = bppo_select(correct, lengths, g)
            shortest_correct = sel.shortest_correct
            stats.update(pairs=float(len(sel.pairs)), skipped_groups=float(sel.skipped),
                         has_gradient=float(bool(sel.pairs)))
            if not sel.pairs:
                return None, stats, shortest_correct
            rows_idx = torch.tensor(sel.rows)
            plen = prefix_lengths(comp, lengths, sel.pairs, cfg.bppo.prefix_rule,
                                  fraction=cfg.bppo.prefix_fraction, k=cfg.bppo.prefix_k)
            width = int(plen.max())
            pm = prefix_mask(plen, width) * cmask[rows_idx, :width]
            p_ids, p_mask = trim_left_padding(prompt_ids[rows_idx], prompt_mask[rows_idx])
            batch = TrainBatch(p_ids, p_mask, comp[rows_idx, :width], cmask[rows_idx, :width], pm, adv[rows_idx],
                               float(pm.sum()))
        with torch.no_grad():
            if cfg.num_iterations > 1:
                batch.old_logps = per_token_logps(self.model, batch.prompt_ids, batch.prompt_mask,
                                                  batch.completion_ids, batch.completion_mask, exit_layer=d,
                                                  temperature=cfg.temperature)
            if self.ref_model is not None:
                batch.ref_logps = per_token_logps(self.ref_model, batch.prompt_ids, batch.prompt_mask,
                                                  batch.completion_ids, batch.completion_mask, exit_layer=d,
                                                  temperature=cfg.temperature)
        return batch, stats, shortest_correct

    def _loss(self, batch: TrainBatch, d: int):
        from tasks.rl_algos import per_token_logps, policy_loss

        cfg = self.cfg
        logps = per_token_logps(self.model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                batch.completion_mask, exit_layer=d, temperature=cfg.temperature)
        loss, st = policy_loss(logps, batch.advantages, batch.loss_mask, old_logps=batch.old_logps,
                               ref_logps=batch.ref_logps, beta=cfg.beta, epsilon=cfg.epsilon,
                               epsilon_high=cfg.epsilon_high, loss_type=cfg.loss_type,
                               max_completion_length=cfg.max_new_tokens, num_items_in_batch=batch.num_items)
        return loss, logps, st

    def step(self) -> dict[int, dict[str, float]]:
        """One generation batch per member and `num_iterations` optimizer steps; returns the step's
        metrics per member (also appended to `history`)."""
        import torch

        from tasks.rl_algos import k3_kl, per_token_logps

        t_step = time.perf_counter()
        step, cfg = self.step_index, self.cfg
        rows = self.prompts_for_step(step)
        batches: dict[int, TrainBatch | None] = {}
        stats: dict[int, dict[str, float]] = {}
        for d in self.members:
            t0 = time.perf_counter()
            batch, st, shortest_correct = self._rollout(rows, d, step)
            if self.budgets[d] is not None:
                self.budgets[d].update(shortest_correct)
            st.update(rollout_s=time.perf_counter() - t0, train_s=0.0, loss=0.0, clip_ratio=0.0, kl=0.0,
                      trained_tokens=0.0 if batch is None else batch.num_items)
            batches[d], stats[d] = batch, st
        self.model.train()
        for it in range(cfg.num_iterations):
            self.optimizer.zero_grad(set_to_none=True)
            stepped = False
            for d, batch in batches.items():
                if batch is None:
                    continue
                t0 = time.perf_counter()
                loss, logps, st = self._loss(batch, d)
                loss.backward()
                stepped = True
                stats[d]["train_s"] += time.perf_counter() - t0
                if it == 0:
                    batch.start_logps = logps.detach()
                    stats[d].update(loss=float(loss.detach()), clip_ratio=st["clip_ratio"], kl=st["kl"])
            if stepped:
                t0 = time.perf_counter()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
                self.optimizer.step()
                share = (time.perf_counter() - t0) / max(1, sum(b is not None for b in batches.values()))
                for d, batch in batches.items():
                    if batch is not None:
                        stats[d]["train_s"] += share
        self.optimizer.zero_grad(set_to_none=True)
        if cfg.beta == 0:
            with torch.no_grad():
                for d, batch in batches.items():
                    if batch is None:
                        continue
                    t0 = time.perf_counter()
                    new = per_token_logps(self.model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                          batch.completion_mask, exit_layer=d, temperature=cfg.temperature)
                    stats[d]["kl"] = k3_kl(batch.start_logps, new, batch.loss_mask)
                    stats[d]["train_s"] += time.perf_counter() - t0
        self.elapsed_s += time.perf_counter() - t_step
        for d in self.members:
            stats[d].setdefault("pairs", 0.0)
            stats[d].setdefault("skipped_groups", 0.0)
            stats[d].update(step=float(step + 1), time_s=self.elapsed_s)
            self.history[d].append(stats[d])
        self.step_index += 1
        return stats

    # -- resume --
    def state_dict(self) -> dict[str, Any]:
        """Everything but the weights and the optimizer tensors (JSON-serializable)."""
        return {"step": self.step_index, "elapsed_s": self.elapsed_s,
                "budgets": {str(d): b.state_dict() for d, b in self.budgets.items() if b is not None},
                "history": {str(d): h for d, h in self.history.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_index, self.elapsed_s = int(state["step"]), float(state["elapsed_s"])
        for d, b in self.budgets.items():
            if b is not None:
                b.load_state_dict(state["budgets"][str(d)])
        self.history = {d: list(state["history"][str(d)]) for d in self.members}


# --- checkpoints -----------------------------------------------------------------------------------


def fingerprint(params: Params, rl_path: Path, sft_dir: Path) -> str:
    """Hash of what a checkpoint depends on: params.rl, the seed, rl.jsonl, the SFT checkpoint and the
    code of this stage (tasks/rl.py, tasks/rl_algos.py)."""
    h = hashlib.sha256()
    # `steps` and `checkpoint_every` are left out: extending a run resumes it (the lr is constant, so
    # nothing before step n depends on the total).
    rl = params.rl.model_dump(exclude={"steps", "checkpoint_every"})
    h.update(json.dumps({"rl": rl, "seed": params.seed}, sort_keys=True).encode())
    code = [Path(__file__), Path(__file__).with_name("rl_algos.py")]
    for path in [*code, rl_path, *sorted(sft_dir.glob("*.json")), *sorted(sft_dir.glob("*.safetensors"))]:
        h.update(path.name.encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def save_checkpoint(root: Path, trainer: RLTrainer, extra: dict[str, Any], keep: int = 2) -> Path:
    """Writes `root/step_<n>/` atomically (weights, optimizer, trainer state) and keeps the last `keep`."""
    import torch
    from safetensors.torch import save_file

    from tasks.common import atomic_dir

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

    from tasks.common import atomic_file

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

    from tasks.rl_algos import encode_chat_prompts

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
