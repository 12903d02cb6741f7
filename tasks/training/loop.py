"""The training loop shared by the `cpt`, `expand` and `sft` stages (`train_loop`, `exit_weights_at`).

Library module. AdamW with warmup + cosine decay, token-normalised gradient accumulation, optional bf16,
clipping, evaluation every `eval_every` steps, fingerprinted checkpoints with exact resume
(tasks.training.checkpoint), loss curves, and data parallelism inside Ray Train workers
(tasks.training.distributed). Choices (packing, exit-weight schedule, accumulation, threads):
docs/choices.md#training.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tasks.core.stage import StageError
from tasks.training import distributed
from tasks.training.batches import IGNORE_INDEX
from tasks.training.checkpoint import Checkpointer

if TYPE_CHECKING:  # heavy imports stay inside the functions (the `ruyi` CLI must start instantly)
    import torch

    from tasks.core.params import ExitWeightSchedule, TrainParams

log = logging.getLogger("ruyi")
#: Train-loss rows averaged for the "final" train loss reported in the metrics.
FINAL_TRAIN_WINDOW = 10


# --- optimisation ----------------------------------------------------------------------------------
def lr_factor(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup, cosine to the floor."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_scale_of(name: str, lr_scales: Mapping[str, float]) -> float:
    """The multiplier of parameter `name`: that of the longest prefix in `lr_scales` it has, else 1."""
    prefixes = [p for p in lr_scales if name.startswith(p)]
    return lr_scales[max(prefixes, key=len)] if prefixes else 1.0


def param_groups(
    named_params: Sequence[tuple[str, torch.nn.Parameter]],
    lr: float,
    weight_decay: float,
    lr_scales: Mapping[str, float] | None = None,
) -> list[dict]:
    """AdamW parameter groups of the parameters that require grad: `weight_decay` on matrices only, and
    `lr_scales` mapping parameter-name prefixes to multipliers of `lr` (the longest matching prefix wins;
    one group per weight-decay class and multiplier).

    Raises:
        StageError: nothing requires grad; a multiplier not > 0; a prefix that names no trained parameter.
    """
    lr_scales = dict(lr_scales or {})
    params = [(n, p) for n, p in named_params if p.requires_grad]
    if not params:
        raise StageError("nothing to train: no parameter requires grad")
    bad = {k: v for k, v in lr_scales.items() if not v > 0}
    unused = [k for k in lr_scales if not any(n.startswith(k) for n, _ in params)]
    if bad or unused:
        raise StageError(
            f"lr scales: multipliers must be > 0 (got {bad}); prefixes must name trained parameters "
            f"(none starts with {unused})"
        )
    scale_of = {n: lr_scale_of(n, lr_scales) for n, _ in params}
    groups = []
    for matrices, decay in ((True, weight_decay), (False, 0.0)):
        of_class = [(n, p) for n, p in params if (p.dim() >= 2) == matrices]
        for scale in sorted({scale_of[n] for n, _ in of_class}, reverse=True):
            chosen = [p for n, p in of_class if scale_of[n] == scale]
            groups.append({"params": chosen, "weight_decay": decay, "lr": lr * scale})
    return groups


def build_optimizer(
    named_params: Sequence[tuple[str, torch.nn.Parameter]],
    cfg: TrainParams,
    lr_scales: Mapping[str, float] | None = None,
):
    """AdamW over :func:`param_groups` (`cfg.lr`, `cfg.weight_decay`, `lr_scales`), and its warmup + cosine
    LambdaLR scheduler (every group on the same schedule).

    Raises:
        StageError: as :func:`param_groups`.
    """
    import functools

    import torch

    groups = param_groups(named_params, cfg.lr, cfg.weight_decay, lr_scales)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
    schedule = functools.partial(
        lr_factor, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps, min_lr_ratio=cfg.min_lr_ratio
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return optimizer, scheduler


def exit_weights_at(
    schedule: ExitWeightSchedule, exit_layers: Sequence[int], step: int, max_steps: int
) -> list[float]:
    """w_k(t) of Ruyi2 Eq. 1 at 0-based step `step` of `max_steps` (see docs/choices.md#training).

    Returns:
        One weight per exit, in `exit_layers` order; the last (deepest) is `schedule.deepest`.
    """
    t = min(1.0, step / (max_steps - 1)) if max_steps > 1 else 0.0
    if schedule.kind == "constant":
        shallow = schedule.start
    elif schedule.kind == "linear":
        shallow = schedule.start + (schedule.floor - schedule.start) * t
    else:
        shallow = schedule.floor + (schedule.start - schedule.floor) * 0.5 * (1.0 + math.cos(math.pi * t))
    return [float(shallow)] * (len(exit_layers) - 1) + [float(schedule.deepest)]


# --- loss and evaluation functions -------------------------------------------------------------------
LossFn = Callable[[Any, dict, int], tuple["torch.Tensor", dict[int, float]]]
EvalFn = Callable[[Any, dict], dict[int, tuple[float, int]]]


def _targets(batch: dict) -> int:
    labels = batch.get("labels", batch["input_ids"])
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def multi_exit_loss_fn(weights: Callable[[int], Sequence[float]]) -> LossFn:
    """Joint training of every member: `sum_k w_k(step) CE_k` (the model's multi-exit loss)."""

    def fn(model, batch: dict, step: int):
        out = model(
            batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            labels=batch.get("labels", batch["input_ids"]),
            exit_loss_weights=list(weights(step)),
        )
        return out.loss, {d: float(v) for d, v in out.exit_losses.items()}

    return fn


def member_loss_fn(exit_layer: int) -> LossFn:
    """Training of one member alone (`exit_layer=d`)."""

    def fn(model, batch: dict, step: int):
        out = model(
            batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            labels=batch.get("labels", batch["input_ids"]),
            exit_layer=exit_layer,
            use_cache=False,
        )
        return out.loss, {exit_layer: float(out.loss.detach())}

    return fn


def multi_exit_eval(model, batch: dict) -> dict[int, tuple[float, int]]:
    """Per-member (sum of token losses, tokens) of one batch, every member from one backbone pass."""
    out = model(
        batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        labels=batch.get("labels", batch["input_ids"]),
    )
    n = _targets(batch)
    return {d: (float(v) * n, n) for d, v in out.exit_losses.items()}


def row_losses(logits: torch.Tensor, labels: torch.Tensor) -> list[tuple[float, int]]:
    """Per row of a batch: the summed next-token cross-entropy (nats, float32 as the model's loss) and
    the targets it covers (`labels` unshifted, IGNORE_INDEX masked). The per-item results of evaluate."""
    import torch

    targets = labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )
    counts = (targets != IGNORE_INDEX).sum(dim=1)
    return [(float(s), int(n)) for s, n in zip(ce.double().sum(dim=1).tolist(), counts.tolist())]


def member_eval(exit_layer: int, rows: list[tuple[float, int]] | None = None) -> EvalFn:
    """One member's loss on a batch (`exit_layer=d`); with `rows`, also each row's `row_losses`
    appended to it, from the same forward."""

    def fn(model, batch: dict) -> dict[int, tuple[float, int]]:
        labels = batch.get("labels", batch["input_ids"])
        out = model(
            batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            labels=labels,
            exit_layer=exit_layer,
            use_cache=False,
        )
        if rows is not None:
            rows.extend(row_losses(out.logits, labels))
        n = _targets(batch)
        return {exit_layer: (float(out.loss) * n, n)}

    return fn


def evaluate(
    model, batches: Sequence[dict], eval_fn: EvalFn = multi_exit_eval, bf16: bool = False
) -> dict[int, float]:
    """Mean loss per member over `batches` (token-weighted), in eval mode, without gradients."""
    import torch

    was_training = model.training
    model.eval()
    sums: dict[int, list[float]] = {}
    device = next(model.parameters()).device
    with torch.no_grad(), _autocast(device, bf16):
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            for d, (s, n) in eval_fn(model, batch).items():
                acc = sums.setdefault(d, [0.0, 0])
                acc[0] += s
                acc[1] += n
    model.train(was_training)
    return {d: s / max(n, 1) for d, (s, n) in sorted(sums.items())}


def _autocast(device, enabled: bool):
    import torch

    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


# --- the loop --------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """What `train_loop` did. `history` rows: {"step", "exit", "split" ("train"|"val"), "loss"}."""

    history: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 0
    resumed_from_step: int | None = None
    samples: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    wall_seconds: float = 0.0
    stale_checkpoint: dict[str, Any] | None = None
    skipped_checkpoints: list[dict[str, Any]] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.train_seconds if self.train_seconds > 0 else 0.0

    def val_losses(self, step: int | None = None) -> dict[int, float]:
        """Validation loss per member at `step` (default: the last evaluation)."""
        rows = [r for r in self.history if r["split"] == "val"]
        if not rows:
            return {}
        step = max(r["step"] for r in rows) if step is None else step
        return {r["exit"]: r["loss"] for r in rows if r["step"] == step}

    def final_train_losses(self, window: int = FINAL_TRAIN_WINDOW) -> dict[int, float]:
        """Mean train loss per member over the last `window` steps."""
        out: dict[int, list[float]] = {}
        for r in self.history:
            if r["split"] == "train" and r["step"] > self.steps - window:
                out.setdefault(r["exit"], []).append(r["loss"])
        return {d: sum(v) / len(v) for d, v in sorted(out.items())}

    def summary(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "resumed_from_step": self.resumed_from_step,
            "samples": self.samples,
            "tokens": self.tokens,
            "tokens_per_s": round(self.tokens_per_s, 1),
            "train_seconds": round(self.train_seconds, 2),
            "wall_s": round(self.wall_seconds, 2),
            "stale_checkpoint": self.stale_checkpoint,
            "skipped_checkpoints": self.skipped_checkpoints,
        }


@dataclass
class StepLoss:
    """The loss of one optimizer step: the weighted objective (`total`) and the loss of each member,
    both token-weighted over the step's micro-batches (`add` one micro-batch at a time)."""

    total: float = 0.0
    per_exit: dict[int, float] = field(default_factory=dict)

    def add(self, loss: float, per_exit: dict[int, float], share: float) -> None:
        self.total += loss * share
        for d, v in per_exit.items():
            self.per_exit[d] = self.per_exit.get(d, 0.0) + v * share


@dataclass
class _Run:
    """What the pieces of one `train_loop` call share (built by `_setup`)."""

    stage: str
    model: Any
    cfg: TrainParams
    optimizer: Any
    scheduler: Any
    params: list[Any]  # the parameters being optimised (clipped together)
    device: Any
    dist_ctx: Any  # None: one process (see tasks/training/distributed.py for the data-parallel run)
    result: TrainResult
    start: int = 0  # completed steps when the loop starts (> 0 after a resume)
    train_model: Any = None  # the model the steps run: `model`, or its DDP wrapper

    @property
    def main(self) -> bool:
        """Whether this process writes checkpoints and shows progress (rank 0, or the only process)."""
        return self.dist_ctx is None or self.dist_ctx.rank == 0


def train_loop(
    *,
    stage: str,
    model,
    cfg: TrainParams,
    named_params: Sequence[tuple[str, Any]],
    stream,
    loss_fn: LossFn,
    val_batches: Sequence[dict],
    eval_fn: EvalFn = multi_exit_eval,
    checkpointer: Checkpointer | None = None,
    callbacks: Sequence[Callable[[int], None]] = (),
    lr_scales: Mapping[str, float] | None = None,
) -> TrainResult:
    """Trains `model` for `cfg.max_steps` optimizer steps, resuming from `checkpointer` if possible.

    Args:
        stage: name for logs and the progress bar.
        model: the FamilialForCausalLM, on its device; only `named_params` are optimised (the caller sets
            `requires_grad`).
        cfg: a TrainParams section (steps, batch, lr schedule, accumulation, bf16, clipping, intervals).
        named_params: (name, parameter) pairs to optimise.
        stream: `.batch(position, batch_size) -> dict` (BlockStream / MixedStream); position counts samples.
        loss_fn: `(model, batch, step) -> (loss, {exit: loss})` for one micro-batch.
        val_batches: fixed validation batches, evaluated with `eval_fn` before step 1, every
            `eval_every` steps and at the end.
        checkpointer: None disables checkpoints (benchmarks); else resume + save every `checkpoint_every`.
        callbacks: called with the number of completed steps after each step (after any checkpoint).
        lr_scales: parameter-name prefix -> multiplier of `cfg.lr` (`build_optimizer`).

    Returns:
        TrainResult (the history includes the steps of earlier, resumed-from runs).
    """
    from tqdm.auto import tqdm

    t_wall = time.perf_counter()
    run = _setup(stage, model, cfg, named_params, lr_scales)
    if checkpointer is not None:
        _resume(run, checkpointer)
    if run.start > cfg.max_steps:
        raise StageError(f"{stage}: checkpoint is at step {run.start}, beyond max_steps={cfg.max_steps}")
    run.train_model = model if run.dist_ctx is None else distributed.wrap_model(model)

    if run.start == 0:
        _record_eval(run, val_batches, eval_fn, 0)
    model.train()
    bar = tqdm(
        range(run.start, cfg.max_steps),
        desc=stage,
        unit="step",
        initial=run.start,
        total=cfg.max_steps,
        mininterval=1.0,
        dynamic_ncols=True,
        disable=not run.main,
    )
    for step in bar:
        loss = _train_step(run, stream, loss_fn, step)
        done = step + 1
        run.result.history.extend(
            {"step": done, "exit": d, "split": "train", "loss": v} for d, v in sorted(loss.per_exit.items())
        )
        postfix = {"loss": f"{loss.total:.3f}", "lr": f"{run.scheduler.get_last_lr()[0]:.2e}"}
        if done % cfg.eval_every == 0 or done == cfg.max_steps:
            val = _record_eval(run, val_batches, eval_fn, done)
            postfix["val"] = "/".join(f"{v:.2f}" for v in val.values())
        bar.set_postfix(postfix, refresh=False)
        due = done % cfg.checkpoint_every == 0 or done == cfg.max_steps
        if checkpointer is not None and run.main and due:
            _save_checkpoint(run, checkpointer, done)
        for callback in callbacks:
            callback(done)
    bar.close()
    return _finish(run, checkpointer, t_wall)


# --- setup, resume, checkpoints and finishing ---------------------------------------------------------
def _setup(
    stage: str,
    model,
    cfg: TrainParams,
    named_params: Sequence[tuple[str, Any]],
    lr_scales: Mapping[str, float] | None = None,
) -> _Run:
    device = next(model.parameters()).device
    optimizer, scheduler = build_optimizer(named_params, cfg, lr_scales)
    params = [p for _, p in named_params if p.requires_grad]
    return _Run(
        stage=stage,
        model=model,
        cfg=cfg,
        optimizer=optimizer,
        scheduler=scheduler,
        params=params,
        device=device,
        dist_ctx=distributed.context(),
        result=TrainResult(),
    )


def _resume(run: _Run, checkpointer: Checkpointer) -> None:
    """Loads the latest resumable checkpoint (if any) into the model, optimizer, scheduler and result."""
    cfg, result = run.cfg, run.result
    latest = _find_resumable(run, checkpointer)
    result.stale_checkpoint, result.skipped_checkpoints = checkpointer.stale, checkpointer.skipped
    if latest is None:
        return
    state = _load_checkpoint(run, checkpointer, latest)
    start = int(state["step"])
    expected = start * cfg.grad_accum * cfg.batch_size
    if int(state["samples"]) != expected:
        raise StageError(
            f"{latest / 'trainer_state.json'}: data position {state['samples']} does not "
            f"match step {start} x {cfg.grad_accum} x {cfg.batch_size}"
        )
    result.history = list(state["history"])
    result.samples, result.tokens = int(state["samples"]), int(state["tokens"])
    result.train_seconds = float(state["train_seconds"])
    result.resumed_from_step = run.start = start


def _find_resumable(run: _Run, checkpointer: Checkpointer):
    if run.dist_ctx is None:
        return checkpointer.find_resumable()
    # Rank 0 alone looks (it may set a stale or corrupt checkpoint aside); every rank loads what it found.
    latest, checkpointer.stale, checkpointer.skipped = distributed.broadcast_object(
        (checkpointer.find_resumable(), checkpointer.stale, checkpointer.skipped) if run.main else None
    )
    return latest


def _load_checkpoint(run: _Run, checkpointer: Checkpointer, latest) -> dict[str, Any]:
    return checkpointer.load(latest, run.model, run.optimizer, run.scheduler)


def _save_checkpoint(run: _Run, checkpointer: Checkpointer, done: int) -> None:
    result = run.result
    checkpointer.save(
        done,
        run.model,
        run.optimizer,
        run.scheduler,
        {
            "samples": result.samples,
            "tokens": result.tokens,
            "history": result.history,
            "train_seconds": result.train_seconds,
        },
    )


def _finish(run: _Run, checkpointer: Checkpointer | None, t_wall: float) -> TrainResult:
    result = run.result
    result.steps = run.cfg.max_steps
    result.wall_seconds = time.perf_counter() - t_wall
    run.model.eval()
    return result


# --- one optimizer step and evaluation ----------------------------------------------------------------
def _train_step(run: _Run, stream, loss_fn: LossFn, step: int) -> StepLoss:
    """Step `step` (0-based): the next `grad_accum` micro-batches, their backward (this process's
    share of them when data-parallel), clipping, the optimizer and scheduler steps."""
    import torch

    cfg = run.cfg
    t0 = time.perf_counter()
    run.optimizer.zero_grad(set_to_none=True)
    micro = _next_micro_batches(run, stream)
    # Each micro-batch loss is a mean over its supervised tokens: weighting it by its share of the
    # step's supervised tokens makes the accumulated gradient that of the token mean over the whole
    # effective batch (as one big batch would give), also when SFT micro-batches supervise
    # different numbers of tokens (1 / grad_accum each when they are equal, as packed blocks are).
    targets = [_targets(b) for b in micro]
    if run.dist_ctx is not None:  # this rank's shard of the same global batch (tasks/training/distributed.py)
        first = run.result.samples - cfg.grad_accum * cfg.batch_size
        loss = _data_parallel_backward(
            run.train_model,
            stream,
            first,
            cfg,
            sum(targets),
            loss_fn,
            step,
            run.stage,
            run.device,
            run.dist_ctx,
        )
    else:
        loss = _local_backward(run, micro, targets, loss_fn, step)
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.params, cfg.grad_clip)
    run.optimizer.step()
    run.scheduler.step()
    run.result.train_seconds += time.perf_counter() - t0
    return loss


def _next_micro_batches(run: _Run, stream) -> list[dict]:
    """The step's `grad_accum` micro-batches, on the device; advances the data position and token count."""
    cfg, result = run.cfg, run.result
    micro = []
    for _ in range(cfg.grad_accum):
        batch = {k: v.to(run.device) for k, v in stream.batch(result.samples, cfg.batch_size).items()}
        result.samples += cfg.batch_size
        mask = batch.get("attention_mask")
        result.tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        micro.append(batch)
    return micro


def _local_backward(run: _Run, micro: list[dict], targets: list[int], loss_fn: LossFn, step: int) -> StepLoss:
    """Forward and backward of every micro-batch in one process, each weighted by its token share."""
    import torch

    all_targets = sum(targets)
    out = StepLoss()
    for batch, n in zip(micro, targets):
        if all_targets and not n:
            continue  # nothing supervised: no loss, no gradient
        share = n / all_targets if all_targets else 1.0 / run.cfg.grad_accum
        with _autocast(run.device, run.cfg.bf16):
            loss, per_exit = loss_fn(run.model, batch, step)
        if not torch.isfinite(loss):
            raise StageError(_non_finite_message(run.stage, loss, step))
        (loss * share).backward()
        out.add(float(loss.detach()), per_exit, share)
    return out


def _record_eval(run: _Run, val_batches: Sequence[dict], eval_fn: EvalFn, step: int) -> dict[int, float]:
    """Validation loss per member after `step` steps, appended to the history."""
    if run.dist_ctx is None:
        losses = evaluate(run.model, val_batches, eval_fn, run.cfg.bf16)
    else:
        losses = _sharded_evaluate(run.model, val_batches, eval_fn, run.cfg.bf16, run.dist_ctx)
    run.result.history.extend({"step": step, "exit": d, "split": "val", "loss": v} for d, v in losses.items())
    return losses


def _non_finite_message(stage: str, loss, step: int) -> str:
    return (
        f"{stage}: the loss is {float(loss.detach())} at step {step + 1}; lower {stage}.lr or "
        f"check the data (nothing was saved for this run)"
    )


def _data_parallel_backward(
    model,
    stream,
    start: int,
    cfg: TrainParams,
    all_targets: int,
    loss_fn: LossFn,
    step: int,
    stage: str,
    device,
    ctx,
) -> StepLoss:
    """One step's forwards/backwards of rank `ctx.rank` (see tasks/training/distributed.py): rows [lo, hi) of
    the global batch that starts at stream position `start`, in forwards of at most `batch_size` rows, each
    weighted by (its supervised tokens / the global batch's `all_targets`) * world_size, DDP's gradient
    all-reduce (a mean) on the last one. Returns the step's loss and per-member losses (all ranks summed)."""
    import contextlib

    import torch

    rows = cfg.grad_accum * cfg.batch_size
    lo, hi = distributed.shard_bounds(rows, ctx.rank, ctx.world_size)
    pieces = []
    for s in range(lo, hi, cfg.batch_size):
        batch = {k: v.to(device) for k, v in stream.batch(start + s, min(cfg.batch_size, hi - s)).items()}
        pieces.append((batch, _targets(batch)))
    # Forwards without a supervised token are skipped (as the local loop skips such micro-batches), except
    # the last: its backward carries the all-reduce that every rank must join.
    run = [i for i, (_, n) in enumerate(pieces) if n or not all_targets or i == len(pieces) - 1]
    mine = StepLoss()
    for i in run:
        batch, n = pieces[i]
        share = n / all_targets if all_targets else int(batch["input_ids"].shape[0]) / rows
        if share == 0:
            batch = _one_target(batch)  # a finite loss with weight 0: an exactly zero gradient
        with contextlib.nullcontext() if i == run[-1] else model.no_sync():
            with _autocast(device, cfg.bf16):
                loss, per_exit = loss_fn(model, batch, step)
            if not torch.isfinite(loss):
                raise StageError(_non_finite_message(stage, loss, step))
            (loss * (share * ctx.world_size)).backward()
        mine.add(float(loss.detach()), per_exit, share)
    keys = sorted(mine.per_exit)
    sums = distributed.all_reduce_sum([mine.total] + [mine.per_exit[d] for d in keys])
    return StepLoss(sums[0], dict(zip(keys, sums[1:])))


def _one_target(batch: dict) -> dict:
    labels = batch.get("labels", batch["input_ids"]).clone()
    if labels.shape[1] < 2:
        raise StageError(
            "data-parallel step: a shard without any supervised token is too short to stand in "
            "for the gradient all-reduce"
        )
    labels[0, 1] = batch["input_ids"][0, 1]
    return {**batch, "labels": labels}


def _sharded_evaluate(model, batches: Sequence[dict], eval_fn: EvalFn, bf16: bool, ctx) -> dict[int, float]:
    """`evaluate` with the batches dealt round-robin to the ranks; the per-batch sums are gathered and
    added in batch order (the local order)."""
    import torch

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    mine: dict[int, dict[int, tuple[float, int]]] = {}
    with torch.no_grad(), _autocast(device, bf16):
        for i in range(ctx.rank, len(batches), ctx.world_size):
            mine[i] = eval_fn(model, {k: v.to(device) for k, v in batches[i].items()})
    model.train(was_training)
    parts: dict[int, dict[int, tuple[float, int]]] = {}
    for part in distributed.all_gather_object(mine):
        parts.update(part)
    sums: dict[int, list[float]] = {}
    for i in sorted(parts):
        for d, (s, n) in parts[i].items():
            acc = sums.setdefault(d, [0.0, 0])
            acc[0] += s
            acc[1] += n
    return {d: s / max(n, 1) for d, (s, n) in sorted(sums.items())}
