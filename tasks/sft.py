"""sft: supervised fine-tuning on chat-formatted math problems (Ruyi2 sections 3.2 and 4.4, stage 2).

    python -m tasks.sft [--params params.yaml] [--set sft.scope=family ...]
    ruyi stage sft ...

Reads   artifacts/expand/ (the expanded family), data/validated/sft.jsonl
        ({"id", "prompt", "response", "answer", "level"})
Writes  artifacts/sft/, checkpoints in artifacts/checkpoints/sft/, metrics/sft.json,
        plots/sft/loss.png + loss.csv

Data: each row becomes the chat `<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n
{response}<|im_end|>\\n` (the tokenizer's chat template); the loss is on the assistant's tokens only
(the response and its `<|im_end|>`; the prompt, the trailing newline and the padding are -100), see
`tasks.training.build_sft_examples`. Rows are right-padded to `sft.seq_len`, longer ones cut (counted
in the metrics); each batch is trimmed to its longest row. `sft.holdout_fraction` of the rows
(chosen by a hash of the id) are held out for the before/after loss of every member. Note: prepare_data
also puts every SFT problem with its solution into the CPT corpus as plain text (so the `####` format
is seen in pre-training), so the held-out loss measures learning the chat format and the assistant
turn, not generalisation to unseen problems; that is evaluate's job on eval.jsonl.

Scope (`sft.scope`):
- `dae` (default): only what DaE trains on member `params.dae_exit` (its added blocks, norm and
  head), with that member's loss alone; every other member stays bit-identical (checked, as in
  expand). This is the paper's order for the small member: our chain runs sft after expand, and
  the paper tunes the whole family before the expansion and the DaE member after it. A model
  without DaE blocks on that member is an error (run expand, or use scope=family).
- `family`: every parameter of the family (embedding, backbone, all branch layers, DaE blocks,
  norms, heads) with the joint multi-exit loss `sum_k w_k CE_k` over all members (weights
  `sft.exit_weights`, constant 1.0 by default). With a DaE model the DaE member takes part through
  its blocks like any other member, so the backbone changes under every member, the DaE one
  included; this is the paper's family SFT, run after expansion instead of before it.

Deviations from the paper: Ruyi2's SFT uses ~4M instruction examples in two curriculum stages, batch
128, seq 8192, 3 epochs, lr 1e-4 with 1000 warmup steps; here a few hundred steps on generated
GSM8K-style problems with the tiny model's settings from params.yaml (one process, or data-parallel
Ray Train workers with `distributed.backend: ray`, tasks/training/distributed.py).

Metrics (`metrics/sft.json`): `exit_<d>` -> {heldout_loss_before, heldout_loss_after, train_loss}
(train_loss only for the trained members), scope, trained/total parameters, example counts
(truncated/dropped), steps, tokens, tokens/s, resumed_from_step, wall time, and with scope=dae
other_members_unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from tasks.core.artifacts import load_family, save_family
from tasks.core.files import write_metrics
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
from tasks.training.checkpoint import Checkpointer, dir_sha256, file_sha256, fingerprint_info
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
    import torch

    from ruyi_model.dae import freeze_for_dae
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
    exits = list(model.config.exit_layers)

    snapshot = None
    if cfg.scope == "dae":
        d = params.dae_exit
        if d not in exits or model.config.num_dae_blocks(d) == 0:
            raise StageError(f"sft.scope=dae: the model at {src} has no DaE blocks on member {d} "
                             f"(exit_layers {exits}, dae_blocks {model.config.dae_blocks}); run the expand "
                             f"stage first or set sft.scope=family")
        named = freeze_for_dae(model, d)
        others = [e for e in exits if e != d]
        probe = held_ex["input_ids"][:2, :32]
        snapshot = snapshot_members(model, others, probe, exclude=[n for n, _ in named])
        loss_fn = member_loss_fn(d)
        trained_members = [d]
    else:
        for p in model.parameters():
            p.requires_grad_(True)
        named = list(model.named_parameters())

        def weights(step: int) -> list[float]:
            return exit_weights_at(cfg.exit_weights, exits, step, cfg.max_steps)

        loss_fn = multi_exit_loss_fn(weights)
        trained_members = exits

    device = device_for_training()
    model.to(device)
    stream = BlockStream(train_ex, params.seed, "sft/train")
    held_batches = fixed_batches(held_ex, cfg.batch_size, cfg.eval_batches)
    info = fingerprint_info(STAGE, cfg, seed=params.seed, model=params.model,
                                     inputs={"sft": file_sha256(path), "expand": dir_sha256(src)},
                                     extra={"dae_exit": params.dae_exit})
    checkpointer = Checkpointer(ws.checkpoints(STAGE), info)
    result = train_loop(stage=STAGE, model=model, cfg=cfg, named_params=named, stream=stream,
                                 loss_fn=loss_fn, val_batches=held_batches, eval_fn=multi_exit_eval,
                                 checkpointer=checkpointer, callbacks=callbacks)
    model.to("cpu")

    metrics: dict[str, Any] = {}
    if snapshot is not None:
        unchanged, changed = members_unchanged(model, snapshot, probe)
        if not unchanged:
            raise StageError(f"sft: training changed tensors outside the DaE member's trainable set: {changed[:8]} "
                             f"(nothing was written)")
        metrics["other_members_unchanged"] = True
    before, after, train = result.val_losses(0), result.val_losses(), result.final_train_losses()
    for e in exits:
        entry = {"heldout_loss_before": round(before[e], 6), "heldout_loss_after": round(after[e], 6)}
        if e in train:
            entry["train_loss"] = round(train[e], 6)
        metrics[f"exit_{e}"] = entry
    metrics.update({
        "scope": cfg.scope, "trained_members": trained_members,
        "trainable_params": count_params(p for _, p in named),
        "total_params": count_params(model.parameters()),
        "examples": train_stats.to_dict(), "heldout_examples": held_stats.to_dict(),
        "heldout_rows": len(held_rows), "heldout_evaluated": sum(int(b["input_ids"].shape[0]) for b in held_batches),
        **result.summary(), "seq_len": cfg.seq_len, "torch_threads": torch.get_num_threads(),
        "ln_vocab": round(math.log(model.config.vocab_size), 4),
    })
    if distributed.is_main():  # a data-parallel run writes from rank 0 alone
        write_loss_curves(result.history, ws.plots(STAGE),
                                   title=f"sft (scope={cfg.scope}): assistant-token loss per member")
    for p in model.parameters():
        p.requires_grad_(True)
    if distributed.is_main():
        save_family(model, tokenizer, ws.artifacts(STAGE))
        write_metrics(params, STAGE, metrics)
    log.info("sft: held-out loss per member %s -> %s", {e: round(v, 3) for e, v in before.items()},
             {e: round(v, 3) for e, v in after.items()})
    return metrics


def main(argv: list[str] | None = None) -> int:
    return stage_main(STAGE, __doc__, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
