"""Stage `sft`: supervised fine-tuning on chat-formatted math problems (Ruyi2 sections 3.2 and 4.4).

    python -m tasks.sft [--params params.yaml] [--set sft.scope=family ...]

Reads `artifacts/expand/` and `data/validated/sft.jsonl`. Writes `artifacts/sft/`, checkpoints in
`artifacts/checkpoints/sft/`, `metrics/sft.json` (per exit held-out loss before/after, train loss,
scope, parameter and example counts) and `plots/sft/`. Loss on assistant tokens only;
`sft.scope: dae | family` decides what trains. Choices: docs/choices.md#sft.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.core.artifacts import load_family, save_family
from tasks.core.files import sha256_file, write_metrics
from tasks.core.params import Params
from tasks.core.paths import Workspace
from tasks.core.stage import StageError, log, stage_main
from tasks.training import distributed
from tasks.training.batches import (
    BlockStream,
    build_sft_examples,
    check_tokenizer,
    fixed_batches,
    read_sft,
    sft_holdout_split,
)
from tasks.training.checkpoint import Checkpointer, dir_sha256, fingerprint_info
from tasks.training.curves import write_loss_curves
from tasks.training.loop import (
    exit_weights_at,
    member_loss_fn,
    multi_exit_eval,
    multi_exit_loss_fn,
    train_loop,
)
from tasks.training.members import count_params, device_for_training, members_unchanged, snapshot_members

STAGE = "sft"


def run(params: Params, callbacks: Sequence[Callable[[int], None]] = ()) -> dict[str, Any]:
    """Fine-tunes the family (or the DaE member) on the SFT chats; writes artifacts/sft, metrics, plots."""
    if params.distributed.backend == "ray" and not distributed.in_worker():
        return distributed.launch(STAGE, params, callbacks)  # this same function on every worker
    from tasks.training.batches import check_seq_len

    cfg, ws = params.sft, Workspace.from_params(params)
    src = ws.artifacts("expand")
    model, tokenizer = load_family(src)
    check_tokenizer(tokenizer, src)
    check_seq_len(params, STAGE, cfg.seq_len, model.config.max_position_embeddings)
    path = ws.sft_data
    rows = read_sft(path)
    train_rows, held_rows = sft_holdout_split(rows, cfg.holdout_fraction)
    train_ex, train_stats = build_sft_examples(tokenizer, train_rows, cfg.seq_len, str(path))
    held_ex, held_stats = build_sft_examples(tokenizer, held_rows, cfg.seq_len, f"{path} (held-out rows)")
    scope = _training_scope(params, model, src, held_ex)

    device = device_for_training()
    model.to(device)
    stream = BlockStream(train_ex, params.seed, "sft/train")
    held_batches = fixed_batches(held_ex, cfg.batch_size, cfg.eval_batches)
    info = fingerprint_info(
        STAGE,
        cfg,
        seed=params.seed,
        model=params.model,
        inputs={"sft": sha256_file(path), "expand": dir_sha256(src)},
        extra={"dae_exit": params.dae_exit},
    )
    checkpointer = Checkpointer(ws.checkpoints(STAGE), info)
    result = train_loop(
        stage=STAGE,
        model=model,
        cfg=cfg,
        named_params=scope.named,
        stream=stream,
        loss_fn=scope.loss_fn,
        val_batches=held_batches,
        eval_fn=multi_exit_eval,
        checkpointer=checkpointer,
        callbacks=callbacks,
    )
    model.to("cpu")

    _check_other_members(model, scope)
    metrics = _metrics(
        params,
        model,
        scope,
        result,
        examples=(train_stats, held_stats),
        heldout_rows=len(held_rows),
        held_batches=held_batches,
    )
    if distributed.is_main():  # a data-parallel run writes from rank 0 alone
        write_loss_curves(
            result.history, ws.plots(STAGE), title=f"sft (scope={cfg.scope}): assistant-token loss per member"
        )
    for p in model.parameters():
        p.requires_grad_(True)
    if distributed.is_main():
        save_family(model, tokenizer, ws.artifacts(STAGE))
        write_metrics(params, STAGE, metrics)
    log.info(
        "sft: held-out loss per member %s -> %s",
        {e: round(v, 3) for e, v in result.val_losses(0).items()},
        {e: round(v, 3) for e, v in result.val_losses().items()},
    )
    return metrics


@dataclass
class _Scope:
    """What `sft.scope` trains: the parameters, the loss, the members, and (scope dae) the snapshot of
    the other members that must come out bit-identical."""

    named: list[tuple[str, Any]]
    loss_fn: Callable
    trained_members: list[int]
    snapshot: Any = None  # `snapshot_members(...)` of the other members (scope dae)
    probe: Any = None  # the token ids the snapshot's logits were computed on


def _training_scope(params: Params, model, src: Path, held_ex: dict) -> _Scope:
    """scope dae: the DaE member alone (everything else frozen and snapshotted); scope family: every
    member with the multi-exit loss."""
    from ruyi_model.dae import freeze_for_dae

    cfg = params.sft
    exits = list(model.config.exit_layers)
    if cfg.scope == "dae":
        d = params.dae_exit
        if d not in exits or model.config.num_dae_blocks(d) == 0:
            raise StageError(
                f"sft.scope=dae: the model at {src} has no DaE blocks on member {d} "
                f"(exit_layers {exits}, dae_blocks {model.config.dae_blocks}); run the expand "
                f"stage first or set sft.scope=family"
            )
        named = freeze_for_dae(model, d)
        others = [e for e in exits if e != d]
        probe = held_ex["input_ids"][:2, :32]
        snapshot = snapshot_members(model, others, probe, exclude=[n for n, _ in named])
        return _Scope(named, member_loss_fn(d), [d], snapshot, probe)
    for p in model.parameters():
        p.requires_grad_(True)
    named = list(model.named_parameters())

    def weights(step: int) -> list[float]:
        return exit_weights_at(cfg.exit_weights, exits, step, cfg.max_steps)

    return _Scope(named, multi_exit_loss_fn(weights), exits)


def _check_other_members(model, scope: _Scope) -> None:
    """scope dae: every member but the DaE one must be bit-identical to its snapshot."""
    if scope.snapshot is None:
        return
    unchanged, changed = members_unchanged(model, scope.snapshot, scope.probe)
    if not unchanged:
        raise StageError(
            f"sft: training changed tensors outside the DaE member's trainable set: "
            f"{changed[:8]} (nothing was written)"
        )


def _metrics(
    params: Params,
    model,
    scope: _Scope,
    result,
    *,
    examples: tuple,
    heldout_rows: int,
    held_batches: list[dict],
) -> dict[str, Any]:
    """Held-out and train loss per member, the scope, parameter counts, example statistics and the
    loop's summary."""
    import torch

    cfg = params.sft
    train_stats, held_stats = examples
    metrics: dict[str, Any] = {}
    if scope.snapshot is not None:
        metrics["other_members_unchanged"] = True
    before, after, train = result.val_losses(0), result.val_losses(), result.final_train_losses()
    for e in model.config.exit_layers:
        entry = {"heldout_loss_before": round(before[e], 6), "heldout_loss_after": round(after[e], 6)}
        if e in train:
            entry["train_loss"] = round(train[e], 6)
        metrics[f"exit_{e}"] = entry
    metrics.update(
        {
            "scope": cfg.scope,
            "trained_members": scope.trained_members,
            "trainable_params": count_params(p for _, p in scope.named),
            "total_params": count_params(model.parameters()),
            "examples": train_stats.to_dict(),
            "heldout_examples": held_stats.to_dict(),
            "heldout_rows": heldout_rows,
            "heldout_evaluated": sum(int(b["input_ids"].shape[0]) for b in held_batches),
            **result.summary(),
            "seq_len": cfg.seq_len,
            "torch_threads": torch.get_num_threads(),
            "ln_vocab": round(math.log(model.config.vocab_size), 4),
        }
    )
    return metrics


def main(argv: list[str] | None = None) -> int:
    return stage_main(STAGE, __doc__, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
