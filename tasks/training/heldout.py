"""Held-out losses and sizes of family members, shared by evaluate and compress.

Library module: `first_blocks` (packed corpus blocks in file order), `solution_examples` (eval solutions
encoded as SFT encodes them), `member_losses`, `member_row_losses`, `member_params`, `check_family_inputs`.
Definitions: docs/choices.md#evaluate.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tasks.core.stage import StageError

log = logging.getLogger("ruyi.evaluate")


def first_blocks(tokenizer, texts: Sequence[str], seq_len: int, max_blocks: int, where: str | Path):
    """The first `max_blocks` packed blocks of `texts` (`tasks.training.pack_documents`), tokenizing
    only as many documents as needed (calibration draws a few blocks from a large corpus).

    Returns:
        LongTensor N x seq_len, 1 <= N <= max_blocks (fewer is logged); none is an error naming `where`.
    """
    from tasks.training.batches import pack_documents, tokenize_texts

    token_lists: list[list[int]] = []
    tokens, chunk = 0, 256
    for start in range(0, len(texts), chunk):
        new = tokenize_texts(tokenizer, texts[start : start + chunk], desc=f"tokenize {Path(where).name}")
        token_lists.extend(new)
        tokens += sum(len(ids) + 1 for ids in new)
        if tokens >= seq_len * max_blocks:
            break
    blocks = pack_documents(token_lists, tokenizer.eos_token_id, seq_len)[:max_blocks]
    if blocks.shape[0] == 0:
        raise StageError(f"{where}: too little text for one {seq_len}-token block")
    if blocks.shape[0] < max_blocks:
        log.warning(
            "%s: only %d of the %d requested %d-token blocks", where, blocks.shape[0], max_blocks, seq_len
        )
    return blocks


def solution_examples(tokenizer, rows: Sequence[dict[str, Any]], seq_len: int, where: str | Path) -> dict:
    """Eval rows as SFT chat examples (question -> user, solution -> assistant), masked and padded by
    `tasks.training.build_sft_examples` (the loss covers the solution and its closing `<|im_end|>`)."""
    from tasks.training.batches import build_sft_examples

    pairs = [{"id": r.get("id"), "prompt": str(r["question"]), "response": str(r["solution"])} for r in rows]
    return build_sft_examples(tokenizer, pairs, seq_len, str(where))[0]


def target_tokens(batches) -> int:
    """Supervised (next-token) targets in `batches` (dicts with input_ids and optional labels)."""
    from tasks.training.batches import IGNORE_INDEX

    return sum(int((b.get("labels", b["input_ids"])[:, 1:] != IGNORE_INDEX).sum()) for b in batches)


def member_losses(model, exits: Sequence[int], batches) -> dict[int, float]:
    """Token-mean next-token cross-entropy of each member (run alone, `exit_layer=d`) over `batches`."""
    from tasks.training.loop import evaluate, member_eval

    return {d: evaluate(model, batches, member_eval(d))[d] for d in exits}


def member_row_losses(
    model, exits: Sequence[int], batches
) -> tuple[dict[int, float], dict[int, list[tuple[float, int]]]]:
    """`member_losses` (the same figures) and, from the same forwards, each member's per-row
    (summed loss, targets) over the rows of `batches` in order (`tasks.training.loop.row_losses`)."""
    from tasks.training.loop import evaluate, member_eval

    rows: dict[int, list[tuple[float, int]]] = {d: [] for d in exits}
    means = {d: evaluate(model, batches, member_eval(d, rows[d]))[d] for d in exits}
    return means, rows


def member_params(model, exit_layer: int) -> int:
    """Parameters of member `exit_layer` as a standalone model (embedding + layers + norm + head, low-rank
    factors as factors): `ruyi_model.export.member_num_parameters`, the count its served tier runs."""
    from ruyi_model.export import member_num_parameters

    return member_num_parameters(model, exit_layer)


def check_family_inputs(model, tokenizer, where: str | Path, seq_len: int, seq_len_key: str) -> None:
    """The tokenizer has the contract's special tokens and a chat template; seq_len fits the model."""
    from tasks.training.batches import check_tokenizer

    check_tokenizer(tokenizer, where)
    if not getattr(tokenizer, "chat_template", None):
        raise StageError(f"tokenizer at {where}: no chat template (build it with the tokenizer stage)")
    if seq_len > model.config.max_position_embeddings:
        raise StageError(
            f"{seq_len_key}={seq_len} exceeds the max_position_embeddings="
            f"{model.config.max_position_embeddings} of the model at {where}"
        )
