"""Stage `expand`: DaE expansion of one member and its continued pre-training (Ruyi2 section 4.4, stage 1).

    python -m tasks.expand [--params params.yaml] [--set expand.num_blocks=3 --set expand.init=clone ...]

Reads `artifacts/family_sft/` (the jointly trained and tuned family) and the validated corpus. Writes
`artifacts/expand/`, checkpoints in
`artifacts/checkpoints/expand/`, `metrics/expand.json` (STEM/general losses before and after, trainable
parameters, `other_members_unchanged`, replay share) and `plots/expand/`. Only the new blocks and the
member's norm and head train; the other members are checked bit-identical.
Choices: docs/choices.md#expand.
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
from tasks.core.stage import StageError, log, seed_everything, stage_main
from tasks.training import distributed
from tasks.training.batches import (
    BlockStream,
    MixedStream,
    check_tokenizer,
    fixed_batches,
    pack_corpus,
    read_corpus,
)
from tasks.training.checkpoint import Checkpointer, dir_sha256, fingerprint_info
from tasks.training.curves import write_loss_curves
from tasks.training.loop import TrainResult, evaluate, member_eval, member_loss_fn, train_loop
from tasks.training.members import count_params, device_for_training, members_unchanged, snapshot_members

STAGE = "expand"
STEM_SOURCE = "math"


@dataclass
class DaEData:
    """The DaE CPT stream and its validation sets (see docs/choices.md#expand)."""

    stream: Any
    stem_val: list[dict]
    general_val: list[dict]
    counts: dict[str, int]
    inputs: dict[str, str]


def load_dae_data(params: Params, tokenizer) -> DaEData:
    """Reads and packs the STEM and replay streams from the validated corpus files.

    Raises:
        StageError: a missing/malformed file, or a stream that the parameters need is empty.
    """
    cfg, ws = params.expand, Workspace.from_params(params)
    train_path, val_path = ws.corpus_train, ws.corpus_val
    train_rows, val_rows = read_corpus(train_path), read_corpus(val_path)

    def split(rows):
        stem = [r["text"] for r in rows if r["source"] == STEM_SOURCE]
        return stem, [r["text"] for r in rows if r["source"] != STEM_SOURCE]

    stem_train, general_train = split(train_rows)
    stem_val, general_val = split(val_rows)
    if cfg.replay_fraction < 1 and not stem_train:
        raise StageError(
            f"{train_path}: no documents with source == {STEM_SOURCE!r}; DaE CPT needs the STEM stream"
        )
    if cfg.replay_fraction > 0 and not general_train:
        raise StageError(
            f"{train_path}: no general documents (source != {STEM_SOURCE!r}) for "
            f"expand.replay_fraction={cfg.replay_fraction}"
        )
    if not stem_val:
        raise StageError(
            f"{val_path}: no documents with source == {STEM_SOURCE!r} to validate the DaE member on"
        )
    seq = cfg.seq_len
    main = replay = None
    counts = {}
    if cfg.replay_fraction < 1:
        blocks = pack_corpus(tokenizer, stem_train, seq, f"{train_path} (source={STEM_SOURCE})", "pack stem")
        main = BlockStream({"input_ids": blocks}, params.seed, "expand/stem")
        counts["stem_blocks"] = int(blocks.shape[0])
    if cfg.replay_fraction > 0:
        blocks = pack_corpus(tokenizer, general_train, seq, f"{train_path} (general)", "pack replay")
        replay = BlockStream({"input_ids": blocks}, params.seed, "expand/replay")
        counts["replay_blocks"] = int(blocks.shape[0])
    stem_val_blocks = pack_corpus(tokenizer, stem_val, seq, f"{val_path} (source={STEM_SOURCE})", "pack val")
    general_val_batches: list[dict] = []
    if general_val:
        general_blocks = pack_corpus(tokenizer, general_val, seq, f"{val_path} (general)", "pack val")
        general_val_batches = fixed_batches({"input_ids": general_blocks}, cfg.batch_size, cfg.eval_batches)
    counts["stem_val_blocks"] = int(stem_val_blocks.shape[0])
    return DaEData(
        stream=MixedStream(main, replay, cfg.replay_fraction),
        stem_val=fixed_batches({"input_ids": stem_val_blocks}, cfg.batch_size, cfg.eval_batches),
        general_val=general_val_batches,
        counts=counts,
        inputs={"corpus_train": sha256_file(train_path), "corpus_val": sha256_file(val_path)},
    )


def resolve_dae_exit(params: Params, model, where: str | Path) -> int:
    d = params.dae_exit
    if d not in model.config.exit_layers:
        raise StageError(
            f"expand.exit_layer={d} is not a member of the family at {where} "
            f"(exit_layers {model.config.exit_layers})"
        )
    return d


def train_dae(
    base,
    params: Params,
    data: DaEData,
    *,
    init: str | None = None,
    checkpointer: Checkpointer | None = None,
    callbacks: Sequence[Callable[[int], None]] = (),
) -> tuple[Any, TrainResult, dict[str, Any]]:
    """Expands member `params.dae_exit` of `base` and trains what DaE trains (see docs/choices.md#expand).

    Args:
        base: the family (left unchanged; `expand` returns a new model).
        params: validated parameters (`params.expand` for the optimisation).
        data: `load_dae_data(...)`.
        init: overrides `params.expand.init` ("random" | "clone"; the ablation uses both).
        checkpointer: resume/save (None: no checkpoints).

    Returns:
        (expanded trained model, TrainResult, info: trainable/total/added parameter counts and the
        general-text loss of the member before/after).
    """
    from ruyi_model.dae import expand, freeze_for_dae

    cfg = params.expand
    d = params.dae_exit
    seed_everything(params.seed)  # expand(init="random") draws the new blocks from torch's global RNG
    try:
        model = expand(base, d, cfg.num_blocks, init or cfg.init)
        trainable = freeze_for_dae(model, d)
    except ValueError as e:
        raise StageError(f"expand: {e}") from None
    device = device_for_training()
    model.to(device)
    info: dict[str, Any] = {
        "trainable_params": count_params(p for _, p in trainable),
        "total_params": count_params(model.parameters()),
        "added_params": count_params(model.parameters()) - count_params(base.parameters()),
    }
    if data.general_val:
        info["general_val_loss_before"] = evaluate(model, data.general_val, member_eval(d), cfg.bf16)[d]
    result = train_loop(
        stage=STAGE,
        model=model,
        cfg=cfg,
        named_params=trainable,
        stream=data.stream,
        loss_fn=member_loss_fn(d),
        val_batches=data.stem_val,
        eval_fn=member_eval(d),
        checkpointer=checkpointer,
        callbacks=callbacks,
    )
    if data.general_val:
        info["general_val_loss_after"] = evaluate(model, data.general_val, member_eval(d), cfg.bf16)[d]
    return model, result, info


def run(params: Params, callbacks: Sequence[Callable[[int], None]] = ()) -> dict[str, Any]:
    """Expands and trains the DaE member; writes artifacts/expand, metrics and plots."""
    if params.distributed.backend == "ray" and not distributed.in_worker():
        return distributed.launch(STAGE, params, callbacks)  # this same function on every worker
    import torch

    from tasks.training.batches import check_seq_len

    cfg, ws = params.expand, Workspace.from_params(params)
    src = ws.artifacts("family_sft")
    base, tokenizer = load_family(src)
    check_tokenizer(tokenizer, src)
    d = resolve_dae_exit(params, base, src)
    check_seq_len(params, STAGE, cfg.seq_len, base.config.max_position_embeddings)
    data = load_dae_data(params, tokenizer)

    others = [e for e in base.config.exit_layers if e != d]
    probe = data.stem_val[0]["input_ids"][:2]
    # Digests are taken on the input family: the frozen tensors and the other members must leave
    # this stage exactly as they came from family_sft.
    snapshot = snapshot_members(base, others, probe)

    info = fingerprint_info(
        STAGE,
        cfg,
        seed=params.seed,
        model=params.model,
        inputs={**data.inputs, "family_sft": dir_sha256(src)},
        extra={"dae_exit": d},
    )
    checkpointer = Checkpointer(ws.checkpoints(STAGE), info)
    model, result, dae_info = train_dae(base, params, data, checkpointer=checkpointer, callbacks=callbacks)

    model.to("cpu")
    trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]
    unchanged, changed = members_unchanged(model, snapshot, probe, exclude=trainable_names)
    if not unchanged:
        raise StageError(
            f"expand: training changed tensors outside the DaE member's trainable set: {changed[:8]} "
            f"(nothing was written)"
        )
    before, after = result.val_losses(0), result.val_losses()
    entry = {
        "stem_val_loss_before": round(before[d], 6),
        "stem_val_loss_after": round(after[d], 6),
        "train_loss": round(result.final_train_losses()[d], 6),
    }
    for key in ("general_val_loss_before", "general_val_loss_after"):
        if key in dae_info:
            entry[key] = round(dae_info[key], 6)
    replay_drawn = data.stream.replay_count(0, result.samples)
    metrics: dict[str, Any] = {
        f"exit_{d}": entry,
        "dae_exit": d,
        "init": cfg.init,
        "num_blocks": cfg.num_blocks,
        "dae_blocks": list(model.config.dae_blocks),
        "trainable_params": dae_info["trainable_params"],
        "total_params": dae_info["total_params"],
        "added_params": dae_info["added_params"],
        "trainable_fraction": round(dae_info["trainable_params"] / dae_info["total_params"], 4),
        "other_members": others,
        "other_members_unchanged": True,
        "replay_fraction": cfg.replay_fraction,
        "replay_share_drawn": round(replay_drawn / max(result.samples, 1), 4),
        **data.counts,
        **result.summary(),
        "seq_len": cfg.seq_len,
        "torch_threads": torch.get_num_threads(),
        "ln_vocab": round(math.log(model.config.vocab_size), 4),
    }
    if distributed.is_main():  # a data-parallel run writes from rank 0 alone
        write_loss_curves(
            result.history,
            ws.plots(STAGE),
            exits=[d],
            title=f"expand: DaE member {d} (+{cfg.num_blocks} {cfg.init} blocks), STEM loss",
        )
    for p in model.parameters():
        p.requires_grad_(True)
    if distributed.is_main():
        save_family(model, tokenizer, ws.artifacts(STAGE))
        write_metrics(params, STAGE, metrics)
    log.info(
        "expand: member %d STEM val loss %.3f -> %.3f; %d of %d parameters trained; other members unchanged",
        d,
        before[d],
        after[d],
        dae_info["trainable_params"],
        dae_info["total_params"],
    )
    return metrics


def main(argv: list[str] | None = None) -> int:
    return stage_main(STAGE, __doc__, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
