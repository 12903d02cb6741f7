"""family_sft: joint multi-exit SFT of the whole family, Stage I (general) then Stage II (math).

    python -m tasks.family_sft [--params params.yaml] [--set family_sft.max_steps=400 ...]

Reads   artifacts/cpt/ (the pre-trained family), data/validated/corpus_train.jsonl (Stage I source),
        data/validated/sft.jsonl (Stage II: the math chats)
Writes  artifacts/family_sft/, checkpoints in artifacts/checkpoints/family_sft/, metrics/family_sft.json,
        plots/family_sft/loss.png + loss.csv

Ruyi2 (Fig. 2, section 4.3.1) tunes the whole family after CPT and before DaE, in two curriculum
stages: Stage I general behaviour, Stage II domain capability with replay of Stage I data at a fixed
(unpublished) ratio. Here every parameter trains with the joint multi-exit loss `sum_k w_k CE_k` over
all members (`family_sft.exit_weights`), on the assistant tokens of the chats:
- Stage I (the first `stage1_steps` optimizer steps): chats built from the general documents of
  corpus_train (`source != "math"`), one per document, alternating two instructions: "Continue this
  text" (prompt: the first part of the document, response: the text that follows it) and "Repeat this
  text exactly" (prompt and response: the same passage). They teach the chat turn structure and
  `<|im_end|>` on text that is not math.
- Stage II (the remaining steps): the math chats of sft.jsonl, with `text_replay_fraction` of the rows
  plain corpus_train text (packed blocks of `text_replay_seq_len` tokens, every token a label: the
  pre-training stream replayed, so the members keep modelling text) and `replay_fraction` of the
  other rows Stage I chats (experience replay). A batch is trimmed to its longest row, so replay
  blocks no longer than the math chats cost no padding.
One learning-rate schedule spans both stages. The batch of every step is a pure function of the step,
so a resumed run is exact (as in the other training stages). `training.backend: megatron` trains the
same steps on megatron-core ranks (tasks/training/family.py). `holdout_fraction` of sft.jsonl (by id
hash, the same rule as the sft stage) is held out: its loss per member is reported before and after.

Metrics (`metrics/family_sft.json`): `exit_<d>` -> {heldout_loss_before, heldout_loss_after,
train_loss}, stage step counts, example counts, steps, tokens, tokens/s, wall time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from tasks.core.artifacts import load_family, save_family
from tasks.core.files import sha256_file, write_metrics
from tasks.core.params import Params
from tasks.core.paths import Workspace
from tasks.core.stage import StageError, log, stage_main
from tasks.training import distributed, family
from tasks.training.batches import (
    BlockStream,
    MixedStream,
    build_sft_examples,
    check_seq_len,
    check_tokenizer,
    fixed_batches,
    pack_corpus,
    padded_blocks,
    read_corpus,
    read_sft,
    sft_holdout_split,
)
from tasks.training.checkpoint import dir_sha256
from tasks.training.curves import write_loss_curves
from tasks.training.loop import exit_weights_at
from tasks.training.members import count_params, device_for_training

STAGE = "family_sft"
STEM_SOURCE = "math"  # corpus rows of the SFT problems (prepare_data); Stage I uses every other row
CONTINUE = "Continue this text:\n"
REPEAT = "Repeat this text exactly:\n"
PROMPT_CHARS = 100  # prompt passage (characters, cut at a word boundary)
RESPONSE_CHARS = 80  # continuation / repeated passage


def _cut(text: str, limit: int) -> str:
    """The first `limit` characters of `text`, cut back to the last space (whole words)."""
    if len(text) <= limit:
        return text
    head = text[:limit]
    space = head.rfind(" ")
    return head[:space] if space > limit // 2 else head


def stage1_rows(corpus_rows: Sequence[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """Stage I chats from general documents: alternating "Continue this text" / "Repeat this text exactly".

    Deterministic: the first `limit` general documents in file order (prepare_data shuffles them).
    """
    rows: list[dict[str, Any]] = []
    for doc in corpus_rows:
        if doc.get("source") == STEM_SOURCE:
            continue
        text = " ".join(str(doc["text"]).split())
        head = _cut(text, PROMPT_CHARS)
        if len(rows) % 2 == 0:
            rest = text[len(head) :].strip()
            if len(rest) < 20:
                continue
            prompt, response = CONTINUE + head, _cut(rest, RESPONSE_CHARS)
        else:
            passage = _cut(text, RESPONSE_CHARS)
            prompt, response = REPEAT + passage, passage
        rows.append({"id": f"stage1-{doc['id']}", "prompt": prompt, "response": response})
        if len(rows) >= limit:
            break
    return rows


class StagedStream:
    """Stage I rows for the first `switch` samples, then Stage II (a MixedStream with replay)."""

    def __init__(self, stage1: BlockStream, stage2: MixedStream, switch: int):
        self.stage1, self.stage2, self.switch = stage1, stage2, switch

    def batch(self, position: int, batch_size: int):
        if position + batch_size <= self.switch:
            return self.stage1.batch(position, batch_size)
        if position < self.switch:  # a micro-batch straddling the switch (only with odd batch sizes)
            raise StageError(
                f"{STAGE}: a micro-batch straddles the Stage I/II switch at sample {self.switch}"
            )
        return self.stage2.batch(position - self.switch, batch_size)


def run(params: Params, callbacks: Sequence[Callable[[int], None]] = ()) -> dict[str, Any]:
    """Tunes the whole family (Stage I, then Stage II); writes artifacts/family_sft, metrics, plots."""
    if family.launch_on_workers(params):
        return distributed.launch(STAGE, params, callbacks)  # this same function on every worker
    import torch

    cfg = params.family_sft
    src = Workspace.from_params(params).artifacts("cpt")
    model, tokenizer = load_family(src)
    check_tokenizer(tokenizer, src)
    check_seq_len(params, STAGE, cfg.seq_len, model.config.max_position_embeddings)
    corpus_path = Workspace.from_params(params).corpus_train
    sft_path = Workspace.from_params(params).validated_file("sft.jsonl")
    corpus_rows = read_corpus(corpus_path)
    general = stage1_rows(corpus_rows, cfg.stage1_examples)
    if not general:
        raise StageError(
            f"{corpus_path}: no general documents (source != {STEM_SOURCE!r}) long enough for Stage I chats"
        )
    math_rows = read_sft(sft_path)
    train_rows, held_rows = sft_holdout_split(math_rows, cfg.holdout_fraction)
    g_ex, g_stats = build_sft_examples(tokenizer, general, cfg.seq_len, f"{corpus_path} (Stage I chats)")
    m_ex, m_stats = build_sft_examples(tokenizer, train_rows, cfg.seq_len, str(sft_path))
    h_ex, h_stats = build_sft_examples(tokenizer, held_rows, cfg.seq_len, f"{sft_path} (held-out rows)")
    # Both kinds are padded to seq_len, so a replay row concatenates with math rows (then trimmed).
    stage1 = BlockStream(g_ex, params.seed, f"{STAGE}/stage1")
    stage2 = MixedStream(
        BlockStream(m_ex, params.seed, f"{STAGE}/stage2"),
        BlockStream(g_ex, params.seed, f"{STAGE}/replay") if cfg.replay_fraction > 0 else None,
        cfg.replay_fraction,
    )
    if cfg.text_replay_fraction > 0:
        block_len = cfg.text_replay_seq_len or cfg.seq_len
        blocks = pack_corpus(
            tokenizer, [r["text"] for r in corpus_rows], block_len, f"{corpus_path} (text replay)"
        )
        text = padded_blocks(blocks, cfg.seq_len, tokenizer.pad_token_id)
        stage2 = MixedStream(
            stage2, BlockStream(text, params.seed, f"{STAGE}/text_replay"), cfg.text_replay_fraction
        )
    rows_per_step = cfg.batch_size * cfg.grad_accum
    stream = StagedStream(stage1, stage2, cfg.stage1_steps * rows_per_step)
    exits = list(model.config.exit_layers)
    for p in model.parameters():
        p.requires_grad_(True)
    named = list(model.named_parameters())

    def weights(step: int) -> list[float]:
        return exit_weights_at(cfg.exit_weights, exits, step, cfg.max_steps)

    device = device_for_training()
    model.to(device)
    held_batches = fixed_batches(h_ex, cfg.batch_size, cfg.eval_batches)
    inputs = {"sft": sha256_file(sft_path), "corpus_train": sha256_file(corpus_path), "cpt": dir_sha256(src)}
    log.info(
        "%s: %d Stage I chats, %d Stage II math chats (+%.0f%% chat replay, %.0f%% text replay), %d held "
        "out; %d + %d steps; members %s",
        STAGE,
        g_stats.examples,
        m_stats.examples,
        100 * cfg.replay_fraction,
        100 * cfg.text_replay_fraction,
        h_stats.examples,
        cfg.stage1_steps,
        cfg.max_steps - cfg.stage1_steps,
        exits,
    )
    result = family.train_family(
        stage=STAGE,
        params=params,
        cfg=cfg,
        model=model,
        stream=stream,
        val_batches=held_batches,
        inputs=inputs,
        callbacks=callbacks,
    )
    model.to("cpu")

    before, after, train = result.val_losses(0), result.val_losses(), result.final_train_losses()
    metrics: dict[str, Any] = {}
    for e in exits:
        entry = {"heldout_loss_before": round(before[e], 6), "heldout_loss_after": round(after[e], 6)}
        if e in train:
            entry["train_loss"] = round(train[e], 6)
        metrics[f"exit_{e}"] = entry
    metrics.update(
        {
            "stage1_steps": cfg.stage1_steps,
            "stage2_steps": cfg.max_steps - cfg.stage1_steps,
            "replay_fraction": cfg.replay_fraction,
            "text_replay_fraction": cfg.text_replay_fraction,
            "text_replay_seq_len": (cfg.text_replay_seq_len or cfg.seq_len)
            if cfg.text_replay_fraction
            else None,
            "stage1_examples": g_stats.to_dict(),
            "stage2_examples": m_stats.to_dict(),
            "heldout_examples": h_stats.to_dict(),
            "trainable_params": count_params(p for _, p in named),
            **result.summary(),
            "seq_len": cfg.seq_len,
            "exit_weights_final": weights(cfg.max_steps - 1),
            "torch_threads": torch.get_num_threads(),
            "ln_vocab": round(math.log(model.config.vocab_size), 4),
        }
    )
    metrics.update(family.backend_metrics(params))
    if distributed.is_main():  # a data-parallel run writes from rank 0 alone
        write_loss_curves(
            result.history,
            Workspace.from_params(params).plots(STAGE),
            title="family_sft: joint multi-exit SFT (Stage I general, Stage II math), loss per member",
        )
        save_family(model, tokenizer, Workspace.from_params(params).artifacts(STAGE))
        write_metrics(params, STAGE, metrics)
    log.info(
        "%s: held-out math loss per member %s -> %s",
        STAGE,
        {e: round(v, 3) for e, v in before.items()},
        {e: round(v, 3) for e, v in after.items()},
    )
    return metrics


def main(argv: list[str] | None = None) -> int:
    return stage_main(STAGE, __doc__, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
