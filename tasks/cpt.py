"""Stage `cpt`: joint multi-exit continued pre-training of the whole family (Ruyi2 section 3.1, Eq. 1).

    python -m tasks.cpt [--params params.yaml] [--set cpt.max_steps=100 ...]

Reads `data/validated/corpus_train.jsonl`, `corpus_val.jsonl` and `artifacts/tokenizer/` (and
`model.init_from` if set). Writes `artifacts/cpt/` (`tasks.core.artifacts.save_family`), resumable
checkpoints in `artifacts/checkpoints/cpt/`, `metrics/cpt.json` (per exit train/val loss, steps, tokens,
exit weights, parameter counts) and `plots/cpt/`. The loss is `sum_k w_k(t) CE_k`; the training machinery
is tasks/training (`family.train_family`: `training.backend` hf = train_loop, megatron = megatron-core
TP x PP x DP ranks). Choices: docs/choices.md#cpt and #training.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tasks.core.artifacts import check_tokenizer_size, save_family, tokenizer_fingerprint
from tasks.core.files import require_dir, sha256_file, write_metrics
from tasks.core.params import ModelParams, Params
from tasks.core.paths import Workspace
from tasks.core.stage import StageError, log, seed_everything, stage_main
from tasks.training import distributed, family
from tasks.training.batches import (
    BlockStream,
    check_seq_len,
    fixed_batches,
    load_tokenizer,
    pack_corpus,
    read_corpus,
)
from tasks.training.checkpoint import dir_sha256
from tasks.training.curves import write_loss_curves
from tasks.training.loop import exit_weights_at
from tasks.training.members import count_params, device_for_training

STAGE = "cpt"
VOCAB_MULTIPLE = 64


def set_generation_tokens(model, tokenizer) -> None:
    """Generation stops at `<|im_end|>` (end of an assistant turn) or `<|endoftext|>`."""
    from ruyi_model.decoding import stop_token_ids

    model.generation_config.eos_token_id = stop_token_ids(tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None


def check_source_tokenizer(tokenizer, src: Path, tok_dir: Path) -> None:
    """With `model.init_from`, the pipeline tokenizer must be the checkpoint's own (as the tokenizer stage
    adopts it), or its embeddings and heads would be read under other token ids.

    Raises:
        StageError: no loadable tokenizer at `src`, or `tokenizer` (from `tok_dir`) is another one; the
            message names both directories and both fingerprints.
    """
    from ruyi_model.tokenizer import adopt_tokenizer

    try:
        expected, info = adopt_tokenizer(src)
    except ValueError as e:
        raise StageError(str(e)) from None
    want, got = tokenizer_fingerprint(expected), tokenizer_fingerprint(tokenizer)
    if want != got:
        raise StageError(
            f"{tok_dir} is not the tokenizer of model.init_from={src} (fingerprint {got}, expected "
            f"{want} = the checkpoint's tokenizer, {info['source_size']} tokens, as the tokenizer stage "
            f"adopts it): rerun the tokenizer stage with the same model.init_from so the token ids "
            f"match the checkpoint's embeddings"
        )


def family_config(m: ModelParams, vocab_size: int, pad_token_id: int, eos_token_id: int):
    """The `FamilialConfig` of a fresh family of shape `m` (`params.model`): Qwen3 fields, no BOS, untied
    embeddings, default RoPE, and the family's exits, branches, head sharing and loss kernel."""
    from ruyi_model import FamilialConfig

    return FamilialConfig(
        vocab_size=vocab_size,
        **m.qwen3_text_fields(),
        rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
        exit_layers=list(m.exit_layers),
        exit_branch_layers=m.exit_branch_layers,
        shared_heads=m.shared_heads,
        loss_impl=m.loss_impl,
    )


def build_family(params: Params, tokenizer):
    """A fresh FamilialForCausalLM from `params.model` (or `from_qwen3` with `model.init_from`).

    Call `seed_everything` first: the random initialisation uses torch's global RNG.
    """
    from ruyi_model import FamilialForCausalLM

    m = params.model
    if m.init_from:
        src = require_dir(
            m.init_from, "model.init_from (a stock Qwen3 checkpoint directory)", marker="config.json"
        )
        try:
            model = FamilialForCausalLM.from_qwen3(
                src,
                m.exit_layers,
                exit_branch_layers=m.exit_branch_layers,
                shared_heads=m.shared_heads,
                loss_impl=m.loss_impl,
            )
        except (ValueError, OSError) as e:
            raise StageError(f"model.init_from={src}: cannot build the family from it: {e}") from None
        check_source_tokenizer(tokenizer, src, Workspace.from_params(params).tokenizer)
        check_tokenizer_size(model, tokenizer, src)
        model.config.pad_token_id = tokenizer.pad_token_id
        model.config.eos_token_id = tokenizer.eos_token_id
    else:
        vocab = math.ceil(len(tokenizer) / VOCAB_MULTIPLE) * VOCAB_MULTIPLE
        config = family_config(m, vocab, tokenizer.pad_token_id, tokenizer.eos_token_id)
        model = FamilialForCausalLM(config)
    set_generation_tokens(model, tokenizer)
    return model


def run(params: Params, callbacks: Sequence[Callable[[int], None]] = ()) -> dict[str, Any]:
    """Trains the family jointly and writes artifacts/cpt, metrics and plots.

    Args:
        params: validated parameters.
        callbacks: called with the completed step count after each step (tests use one to stop a run
            mid-way, as a kill would).
    """
    if family.launch_on_workers(params):
        return distributed.launch(STAGE, params, callbacks)  # this same function on every worker
    import torch

    cfg, ws = params.cpt, Workspace.from_params(params)
    seed_everything(params.seed)
    train_path, val_path = ws.corpus_train, ws.corpus_val
    tok_dir = ws.tokenizer
    tokenizer = load_tokenizer(tok_dir)
    train_rows = read_corpus(train_path)
    val_rows = read_corpus(val_path)

    model = build_family(params, tokenizer)
    check_seq_len(params, STAGE, cfg.seq_len, model.config.max_position_embeddings)
    device = device_for_training()
    model.to(device)
    train_blocks = pack_corpus(
        tokenizer, [r["text"] for r in train_rows], cfg.seq_len, str(train_path), desc="pack train"
    )
    val_blocks = pack_corpus(
        tokenizer, [r["text"] for r in val_rows], cfg.seq_len, str(val_path), desc="pack val"
    )
    log.info(
        "cpt: %d train blocks, %d val blocks of %d tokens; %d parameters; members %s",
        train_blocks.shape[0],
        val_blocks.shape[0],
        cfg.seq_len,
        count_params(model.parameters()),
        model.config.exit_layers,
    )

    stream = BlockStream({"input_ids": train_blocks}, params.seed, "cpt/train")
    val_batches = fixed_batches({"input_ids": val_blocks}, cfg.batch_size, cfg.eval_batches)
    exits = list(model.config.exit_layers)

    def weights(step: int) -> list[float]:
        return exit_weights_at(cfg.exit_weights, exits, step, cfg.max_steps)

    inputs = {
        "corpus_train": sha256_file(train_path),
        "corpus_val": sha256_file(val_path),
        "tokenizer": dir_sha256(tok_dir),
    }
    if params.model.init_from:
        inputs["init_from"] = dir_sha256(params.model.init_from)
    result = family.train_family(
        stage=STAGE,
        params=params,
        cfg=cfg,
        model=model,
        stream=stream,
        val_batches=val_batches,
        inputs=inputs,
        callbacks=callbacks,
    )

    initial, final, train = result.val_losses(0), result.val_losses(), result.final_train_losses()
    metrics: dict[str, Any] = {
        f"exit_{d}": {
            "train_loss": round(train.get(d, float("nan")), 6),
            "val_loss": round(final[d], 6),
            "val_loss_initial": round(initial[d], 6),
        }
        for d in exits
    }
    metrics.update(result.summary())
    metrics.update(
        {
            "exit_weights_final": weights(cfg.max_steps - 1),
            "exit_weight_schedule": cfg.exit_weights.model_dump(),
            "params_total": count_params(model.parameters()),
            "vocab_size": model.config.vocab_size,
            "ln_vocab": round(math.log(model.config.vocab_size), 4),
            "train_blocks": int(train_blocks.shape[0]),
            "val_blocks": int(val_blocks.shape[0]),
            "seq_len": cfg.seq_len,
            "device": str(device),
            "torch_threads": torch.get_num_threads(),
        }
    )
    metrics.update(family.backend_metrics(params))
    if distributed.is_main():  # a data-parallel run writes from rank 0 alone
        write_loss_curves(
            result.history, ws.plots(STAGE), title="cpt: joint multi-exit training, loss per member"
        )
        save_family(model.to("cpu"), tokenizer, ws.artifacts(STAGE))
        write_metrics(params, STAGE, metrics)
    log.info(
        "cpt: val loss per member %s (ln V = %.2f)",
        {d: round(v, 3) for d, v in final.items()},
        math.log(model.config.vocab_size),
    )
    return metrics


def main(argv: list[str] | None = None) -> int:
    return stage_main(STAGE, __doc__, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
