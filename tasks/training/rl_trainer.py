"""The training step of the `rl` stage (`RLTrainer`) and its helpers: members, rows, evaluation.

Library module used by tasks/rl.py: which members and parameters train (`resolve_members`,
`trainable_parameters`), the held-out split of rl.jsonl, greedy evaluation per member, and one
sample-score-update step with seeded generators. Choices: docs/choices.md#rl.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.core.files import read_jsonl
from tasks.core.params import RLParams
from tasks.core.stage import StageError

log = logging.getLogger("ruyi.rl")


# --- members and parameters ------------------------------------------------------------------


def resolve_members(config, spec: str | list[int]) -> list[int]:
    """The exit layers RL samples and trains for `rl.members` (see docs/choices.md#rl)."""
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
                log.warning(
                    "rl.members=dae but the family has no DaE blocks: training member %d's own "
                    "parameters (branch layers, norm, head); the other members stay unchanged",
                    d,
                )
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


def _check_problems(path: Path, rows: list[dict[str, Any]], question: str) -> None:
    """An empty `question` field or a non-numeric answer is an error naming file, row and id."""
    from tasks.data.mathgen import parse_number

    for i, row in enumerate(rows, 1):
        if not isinstance(row[question], str) or not row[question].strip():
            raise StageError(f"{path}: row {i} (id={row['id']!r}): empty {question}")
        if parse_number(str(row["answer"])) is None:
            raise StageError(f"{path}: row {i} (id={row['id']!r}): answer {row['answer']!r} is not a number")


def load_rl_rows(path: Path) -> list[dict[str, Any]]:
    """Reads rl.jsonl; an empty question or a non-numeric answer is an error naming file and row."""
    rows = read_jsonl(path, required=("id", "question", "answer"))
    _check_problems(path, rows, "question")
    return rows


def load_select_rows(path: Path, n: int) -> list[dict[str, Any]]:
    """The first `n` rows of select.jsonl (`prompt`, `answer`) as rl rows (`question`, `answer`): rl's
    checkpoint selection (`rl.select_prompts`); fewer rows than `n`, an empty prompt or a non-numeric
    answer is an error naming the file (and row)."""
    rows = read_jsonl(path, required=("id", "prompt", "answer"))
    if len(rows) < n:
        raise StageError(f"{path}: {len(rows)} rows, but rl.select_prompts={n}; lower it (0 = no selection)")
    rows = rows[:n]
    _check_problems(path, rows, "prompt")
    return [{"id": row["id"], "question": row["prompt"], "answer": row["answer"]} for row in rows]


def split_rows(rows: list[dict], eval_prompts: int, path: Path) -> tuple[list[dict], list[dict]]:
    """(train, eval): the last `eval_prompts` rows are the fixed held-out evaluation slice, together with
    any earlier row that poses the same problem as one of them (`mathgen.problem_key`: the same template
    and numbers with other names or goods, i.e. the same answer), so no held-out problem is trained on."""
    from tasks.data.mathgen import problem_key

    if len(rows) <= eval_prompts:
        raise StageError(
            f"{path}: {len(rows)} rows, but rl.eval_prompts={eval_prompts} of them are held out "
            "for evaluation; need more rows (or lower rl.eval_prompts)"
        )
    held = {problem_key(r["question"]) for r in rows[-eval_prompts:]}
    twins = [r for r in rows[:-eval_prompts] if problem_key(r["question"]) in held]
    train = [r for r in rows[:-eval_prompts] if problem_key(r["question"]) not in held]
    if not train:
        raise StageError(
            f"{path}: every row poses a held-out problem; need more rows (or lower rl.eval_prompts)"
        )
    return train, twins + rows[-eval_prompts:]


def evaluate_members(
    model,
    tokenizer,
    rows: list[dict],
    members: list[int],
    max_new_tokens: int,
    format_reward: float,
    batch_size: int = 16,
) -> dict[int, dict[str, Any]]:
    """Greedy reward and accuracy of each member on `rows` (`ruyi_model.decoding.greedy_generate`), and
    its verdict on each row (`correct`: a bool per row, in order)."""
    from ruyi_model.decoding import greedy_generate
    from tasks.training.rl_algos import score_responses

    out = {}
    for d in members:
        texts = greedy_generate(
            model,
            tokenizer,
            [r["question"] for r in rows],
            exit_layer=d,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
        )
        rewards, correct = score_responses(texts, [str(r["answer"]) for r in rows], format_reward)
        out[d] = {
            "reward": float(rewards.mean()),
            "accuracy": float(correct.float().mean()),
            "correct": [bool(c) for c in correct],
        }
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


@dataclass
class Rollout:
    """One member's rollouts of one step (`RLTrainer._rollout`).

    Attributes:
        batch: what the member's loss trains on; None when nothing carries a gradient (BPPO without a pair).
        stats: the step's metrics of this member (completed by `RLTrainer.step`).
        shortest_correct: per group with a correct response, its shortest correct length (BPPO; the
            adaptive budget's input), else empty.
    """

    batch: TrainBatch | None
    stats: dict[str, float | None]  # `kl` is None on a step that does not measure it (rl.kl_every)
    shortest_correct: list[int] = field(default_factory=list)


@dataclass
class _Samples:
    """A member's sampled completions: each prompt repeated `group_size` times (rows), B x P / B x C."""

    prompt_ids: Any
    prompt_mask: Any
    completion_ids: Any
    completion_mask: Any
    truncated: Any  # B bools: stopped by the budget (or early), not by a stop token
    budget: int
    stopped: Any = None  # B bools: stopped by BPPO's early group stop (None: not used)


@dataclass
class _Scores:
    """Rewards of sampled completions (B each) and their group advantages."""

    rewards: Any
    correct: Any
    advantages: Any
    lengths: Any  # completion tokens per row


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

    def __init__(
        self,
        model,
        tokenizer,
        train_rows: list[dict],
        cfg: RLParams,
        *,
        members: list[int],
        trainable: list[tuple[str, Any]],
        seed: int,
    ):
        import torch

        from ruyi_model.decoding import stop_token_ids
        from tasks.training.rl_algos import AdaptiveBudget

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
        self.budgets = {
            d: AdaptiveBudget(
                cfg.max_new_tokens, cfg.bppo.budget_min_tokens, cfg.bppo.budget_margin, cfg.bppo.budget_ema
            )
            if use_budget
            else None
            for d in self.members
        }
        self.history: dict[int, list[dict[str, float | None]]] = {d: [] for d in self.members}
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

    # -- one member's rollouts: sampling, scoring, selection (GRPO / BPPO), reference log-probs --
    def _rollout(self, rows: list[dict], d: int, step: int) -> Rollout:
        samples = self._sample(rows, d, step)
        scores = self._score(rows, samples)
        lengths = scores.lengths
        stats = {
            "reward": float(scores.rewards.mean()),
            "accuracy": float(scores.correct.float().mean()),
            "length": float(lengths.float().mean()),
            "budget": float(samples.budget),
            "tokens_generated": float(lengths.sum()),
            "truncated": float(samples.truncated.float().mean()),
            "stopped_early": 0.0 if samples.stopped is None else float(samples.stopped.float().mean()),
        }
        if self.cfg.algorithm == "grpo":
            rollout = Rollout(self._grpo_batch(samples, scores, stats), stats)
        else:
            rollout = self._bppo_rollout(samples, scores, stats)
            if rollout.batch is None:
                return rollout
        self._add_fixed_logps(rollout.batch, d)
        return rollout

    def _sample(self, rows: list[dict], d: int, step: int) -> _Samples:
        """`group_size` completions of each prompt from member `d`, within its current budget."""
        import torch

        from tasks.training.rl_algos import GroupEarlyStop, encode_chat_prompts, sample_completions

        cfg, g = self.cfg, self.cfg.group_size
        budget = self.budgets[d].budget if self.budgets[d] is not None else cfg.max_new_tokens
        prompt_ids, prompt_mask = encode_chat_prompts(self.tokenizer, [r["question"] for r in rows])
        prompt_ids, prompt_mask = prompt_ids.repeat_interleave(g, 0), prompt_mask.repeat_interleave(g, 0)
        gen = torch.Generator().manual_seed(_seed_for(self.seed, "rollout", step, d))
        stopper = None
        if cfg.algorithm == "bppo" and cfg.bppo.early_stop:
            golds = [str(r["answer"]) for r in rows for _ in range(g)]
            stopper = GroupEarlyStop(g, lambda idx, ids, mask: self._judge(idx, ids, mask, golds))
        comp, cmask, truncated = sample_completions(
            self.model,
            prompt_ids,
            prompt_mask,
            exit_layer=d,
            max_new_tokens=budget,
            stop_ids=self.stop_ids,
            pad_id=self.tokenizer.pad_token_id,
            temperature=cfg.temperature,
            generator=gen,
            group_size=g,
            share_prefill=cfg.share_prefill,
            compact=cfg.compact_rollouts,
            early_stop=stopper,
            sampler=cfg.sampler,
            engine=cfg.rollout_engine,
        )
        stopped = stopper.stopped if stopper is not None and stopper.stopped is not None else None
        return _Samples(prompt_ids, prompt_mask, comp, cmask, truncated, budget, stopped)

    def _judge(self, idx: list[int], ids, mask, golds: list[str]):
        """Whether the given finished rows are correct (the early group stop's judge)."""
        from tasks.training.rl_algos import decode_completions, score_responses

        texts = decode_completions(self.tokenizer, ids, mask)
        return score_responses(texts, [golds[i] for i in idx], self.cfg.format_reward)[1]

    def _score(self, rows: list[dict], samples: _Samples) -> _Scores:
        from tasks.training.rl_algos import decode_completions, group_advantages, score_responses

        cfg, g = self.cfg, self.cfg.group_size
        texts = decode_completions(self.tokenizer, samples.completion_ids, samples.completion_mask)
        golds = [str(r["answer"]) for r in rows for _ in range(g)]
        rewards, correct = score_responses(texts, golds, cfg.format_reward)
        adv = group_advantages(rewards, g, scale=cfg.scale_rewards)
        return _Scores(rewards, correct, adv, samples.completion_mask.sum(1))

    def _grpo_batch(self, samples: _Samples, scores: _Scores, stats: dict[str, float]) -> TrainBatch:
        """GRPO trains every row on its whole completion."""
        cmask = samples.completion_mask
        batch = TrainBatch(
            samples.prompt_ids,
            samples.prompt_mask,
            samples.completion_ids,
            cmask,
            cmask,
            scores.advantages,
            float(cmask.sum()),
        )
        # Every group degenerate (all rewards equal): no advantage signal, the loss carries no gradient.
        r = scores.rewards.view(-1, self.cfg.group_size)
        stats["has_gradient"] = float(bool((r.max(1).values != r.min(1).values).any()))
        return batch

    def _bppo_rollout(self, samples: _Samples, scores: _Scores, stats: dict[str, float]) -> Rollout:
        """BPPO trains the (shortest correct, shortest incorrect) pair of each group on a prefix."""
        import torch

        from tasks.training.rl_algos import bppo_select, prefix_spans, span_mask, trim_left_padding

        cfg = self.cfg
        eligible = None if samples.stopped is None else ~samples.stopped
        sel = bppo_select(scores.correct, scores.lengths, cfg.group_size, eligible)
        stats.update(
            pairs=float(len(sel.pairs)),
            skipped_groups=float(sel.skipped),
            has_gradient=float(bool(sel.pairs)),
        )
        if not sel.pairs:
            return Rollout(None, stats, sel.shortest_correct)
        comp, cmask = samples.completion_ids, samples.completion_mask
        rows_idx = torch.tensor(sel.rows)
        starts, ends = prefix_spans(
            comp,
            scores.lengths,
            sel.pairs,
            cfg.bppo.prefix_rule,
            fraction=cfg.bppo.prefix_fraction,
            k=cfg.bppo.prefix_k,
        )
        width = int(ends.max())
        pm = span_mask(starts, ends, width) * cmask[rows_idx, :width]
        p_ids, p_mask = trim_left_padding(samples.prompt_ids[rows_idx], samples.prompt_mask[rows_idx])
        batch = TrainBatch(
            p_ids,
            p_mask,
            comp[rows_idx, :width],
            cmask[rows_idx, :width],
            pm,
            scores.advantages[rows_idx],
            float(pm.sum()),
        )
        return Rollout(batch, stats, sel.shortest_correct)

    def _add_fixed_logps(self, batch: TrainBatch, d: int) -> None:
        """The log-probs that stay fixed during the step: the sampling policy's (for the ratio of
        `num_iterations > 1`) and the reference model's (for the KL penalty)."""
        import torch

        from tasks.training.rl_algos import per_token_logps

        cfg = self.cfg
        with torch.no_grad():
            if cfg.num_iterations > 1:
                batch.old_logps = per_token_logps(
                    self.model,
                    batch.prompt_ids,
                    batch.prompt_mask,
                    batch.completion_ids,
                    batch.completion_mask,
                    exit_layer=d,
                    temperature=cfg.temperature,
                )
            if self.ref_model is not None:
                batch.ref_logps = per_token_logps(
                    self.ref_model,
                    batch.prompt_ids,
                    batch.prompt_mask,
                    batch.completion_ids,
                    batch.completion_mask,
                    exit_layer=d,
                    temperature=cfg.temperature,
                )

    def _loss(self, batch: TrainBatch, d: int):
        from tasks.training.rl_algos import per_token_logps, policy_loss

        cfg = self.cfg
        logps = per_token_logps(
            self.model,
            batch.prompt_ids,
            batch.prompt_mask,
            batch.completion_ids,
            batch.completion_mask,
            exit_layer=d,
            temperature=cfg.temperature,
        )
        loss, st = policy_loss(
            logps,
            batch.advantages,
            batch.loss_mask,
            old_logps=batch.old_logps,
            ref_logps=batch.ref_logps,
            beta=cfg.beta,
            epsilon=cfg.epsilon,
            epsilon_high=cfg.epsilon_high,
            loss_type=cfg.loss_type,
            max_completion_length=cfg.max_new_tokens,
            num_items_in_batch=batch.num_items,
        )
        return loss, logps, st

    # -- one step --
    def step(self) -> dict[int, dict[str, float | None]]:
        """One generation batch per member and `num_iterations` optimizer steps; returns the step's
        metrics per member (also appended to `history`; `kl` None where rl.kl_every skips it)."""
        t_step = time.perf_counter()
        step = self.step_index
        rollouts = self._collect_rollouts(self.prompts_for_step(step), step)
        self.model.train()
        for it in range(self.cfg.num_iterations):
            self._optimize(rollouts, first=it == 0)
        self.optimizer.zero_grad(set_to_none=True)
        if self.cfg.beta == 0:
            if self.cfg.kl_every and (step + 1) % self.cfg.kl_every == 0:
                self._measure_kl(rollouts)
            else:  # not measured this step (rl.kl_every): none, rather than a 0 that reads as a measure
                for rollout in rollouts.values():
                    rollout.stats["kl"] = None
        self.elapsed_s += time.perf_counter() - t_step
        stats = {d: r.stats for d, r in rollouts.items()}
        for d in self.members:
            stats[d].setdefault("pairs", 0.0)
            stats[d].setdefault("skipped_groups", 0.0)
            stats[d].update(step=float(step + 1), time_s=self.elapsed_s)
            self.history[d].append(stats[d])
        self.step_index += 1
        return stats

    def _collect_rollouts(self, rows: list[dict], step: int) -> dict[int, Rollout]:
        """Every member's rollouts of the step (in `members` order); updates the adaptive budgets."""
        rollouts: dict[int, Rollout] = {}
        for d in self.members:
            t0 = time.perf_counter()
            rollout = self._rollout(rows, d, step)
            if self.budgets[d] is not None:
                self.budgets[d].update(rollout.shortest_correct)
            batch = rollout.batch
            rollout.stats.update(
                rollout_s=time.perf_counter() - t0,
                train_s=0.0,
                loss_s=0.0,
                optim_s=0.0,
                loss=0.0,
                clip_ratio=0.0,
                kl=0.0,
                trained_tokens=0.0 if batch is None else batch.num_items,
            )
            rollouts[d] = rollout
        return rollouts

    def _optimize(self, rollouts: dict[int, Rollout], first: bool) -> None:
        """One optimizer step on the sum of the members' losses (none when no member has a batch); the
        first one records each member's loss, clip ratio and KL, and the start log-probs."""
        import torch

        cfg = self.cfg
        self.optimizer.zero_grad(set_to_none=True)
        trained = [(d, r) for d, r in rollouts.items() if r.batch is not None]
        for d, rollout in trained:
            t0 = time.perf_counter()
            loss, logps, st = self._loss(rollout.batch, d)
            loss.backward()
            dt = time.perf_counter() - t0
            rollout.stats["train_s"] += dt
            rollout.stats["loss_s"] += dt
            if first:
                rollout.batch.start_logps = logps.detach()
                rollout.stats.update(loss=float(loss.detach()), clip_ratio=st["clip_ratio"], kl=st["kl"])
        if not trained:
            return
        t0 = time.perf_counter()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.optimizer.step()
        share = (time.perf_counter() - t0) / max(1, len(trained))
        for _, rollout in trained:
            rollout.stats["train_s"] += share
            rollout.stats["optim_s"] += share

    def _measure_kl(self, rollouts: dict[int, Rollout]) -> None:
        """Without a KL penalty: the k3 KL between each member's policy before and after the step."""
        import torch

        from tasks.training.rl_algos import k3_kl, per_token_logps

        cfg = self.cfg
        with torch.no_grad():
            for d, rollout in rollouts.items():
                batch = rollout.batch
                if batch is None:
                    continue
                t0 = time.perf_counter()
                new = per_token_logps(
                    self.model,
                    batch.prompt_ids,
                    batch.prompt_mask,
                    batch.completion_ids,
                    batch.completion_mask,
                    exit_layer=d,
                    temperature=cfg.temperature,
                )
                rollout.stats["kl"] = k3_kl(batch.start_logps, new, batch.loss_mask)
                rollout.stats["train_s"] += time.perf_counter() - t0

    # -- resume --
    def state_dict(self) -> dict[str, Any]:
        """Everything but the weights and the optimizer tensors (JSON-serializable)."""
        return {
            "step": self.step_index,
            "elapsed_s": self.elapsed_s,
            "budgets": {str(d): b.state_dict() for d, b in self.budgets.items() if b is not None},
            "history": {str(d): h for d, h in self.history.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_index, self.elapsed_s = int(state["step"]), float(state["elapsed_s"])
        for d, b in self.budgets.items():
            if b is not None:
                b.load_state_dict(state["budgets"][str(d)])
        self.history = {d: list(state["history"][str(d)]) for d in self.members}
