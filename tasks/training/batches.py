"""Tokenized training data: packing, SFT examples with masked prompts, seeded streams, batches.

Library module: `pack_documents` / `pack_corpus`, `build_sft_examples` (labels -100 outside the assistant
turn), `sft_holdout_split` (by id hash), `BlockStream` / `MixedStream` (the batch of a step is a pure
function of the step), `fixed_batches`, `check_seq_len`. Why: docs/choices.md#training.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.core.files import read_jsonl
from tasks.core.params import Params, ParamsError
from tasks.core.stage import StageError

if TYPE_CHECKING:  # heavy imports stay inside the functions (the `ruyi` CLI must start instantly)
    import torch


log = logging.getLogger("ruyi")


IGNORE_INDEX = -100


def load_tokenizer(path: str | Path):
    """Loads the pipeline tokenizer (the tokenizer stage's output) with `ruyi_model.tokenizer.load_tokenizer`.

    Raises:
        StageError: the directory is missing or its special tokens / chat template are not the contract's.
    """
    from ruyi_model.tokenizer import load_tokenizer as load

    try:
        tokenizer = load(path)
    except (ValueError, OSError) as e:
        raise StageError(f"tokenizer: {e}") from None
    check_tokenizer(tokenizer, path)
    return tokenizer


def check_tokenizer(tokenizer, where: str | Path) -> None:
    """The special tokens of the data contract must exist (tokenizers stored with a model directory)."""
    from ruyi_model.tokenizer import EOS_TOKEN, IM_END, PAD_TOKEN

    if tokenizer.eos_token != EOS_TOKEN or tokenizer.pad_token != PAD_TOKEN:
        raise StageError(
            f"tokenizer at {where}: eos/pad must be {EOS_TOKEN!r}/{PAD_TOKEN!r}, got "
            f"{tokenizer.eos_token!r}/{tokenizer.pad_token!r}"
        )
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    if im_end is None or im_end == tokenizer.unk_token_id:
        raise StageError(f"tokenizer at {where}: no {IM_END!r} token")


def read_corpus(path: str | Path) -> list[dict[str, Any]]:
    """Reads `corpus_*.jsonl` ({"id", "text", "source"}); a bad row is an error naming file and row."""
    rows = read_jsonl(path, required=("id", "text", "source"))
    for i, row in enumerate(rows, 1):
        if not isinstance(row["text"], str) or not row["text"].strip():
            raise StageError(f"{path}: row {i} (id={row.get('id')!r}): 'text' must be a non-empty string")
        if not isinstance(row["source"], str):
            raise StageError(f"{path}: row {i} (id={row.get('id')!r}): 'source' must be a string")
    return rows


def read_sft(path: str | Path) -> list[dict[str, Any]]:
    """Reads `sft.jsonl` ({"id", "prompt", "response", "answer", "level"}), checking the text fields."""
    rows = read_jsonl(path, required=("id", "prompt", "response", "answer", "level"))
    for i, row in enumerate(rows, 1):
        for key in ("id", "prompt", "response"):
            if not isinstance(row[key], str) or not row[key].strip():
                raise StageError(
                    f"{path}: row {i} (id={row.get('id')!r}): {key!r} must be a non-empty string"
                )
    return rows


def tokenize_texts(
    tokenizer, texts: Sequence[str], batch: int = 512, desc: str = "tokenize"
) -> list[list[int]]:
    """Token ids of each text, without special tokens (batched through the fast tokenizer)."""
    from tqdm.auto import tqdm

    out: list[list[int]] = []
    for start in tqdm(range(0, len(texts), batch), desc=desc, unit="batch", leave=False, mininterval=1.0):
        out.extend(tokenizer(list(texts[start : start + batch]), add_special_tokens=False)["input_ids"])
    return out


def pack_documents(token_lists: Iterable[Sequence[int]], eos_id: int, seq_len: int) -> torch.Tensor:
    """Joins documents, each followed by `eos_id`, and cuts the stream into full blocks.

    Args:
        token_lists: token ids of each document (no special tokens), in order.
        eos_id: the document separator.
        seq_len: block length T.

    Returns:
        LongTensor N x T (the trailing partial block is dropped; N may be 0).
    """
    import torch

    stream: list[int] = []
    for ids in token_lists:
        stream.extend(ids)
        stream.append(eos_id)
    n = len(stream) // seq_len
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def pack_corpus(
    tokenizer, texts: Sequence[str], seq_len: int, where: str, desc: str = "pack"
) -> torch.Tensor:
    """`pack_documents` of `texts`; an input too small for one block is an error naming it."""
    blocks = pack_documents(tokenize_texts(tokenizer, texts, desc=desc), tokenizer.eos_token_id, seq_len)
    if blocks.shape[0] == 0:
        raise StageError(
            f"{where}: too little text for one block of seq_len={seq_len} tokens ({len(texts)} documents)"
        )
    return blocks


def sft_holdout_split(rows: Sequence[dict[str, Any]], fraction: float) -> tuple[list[dict], list[dict]]:
    """Splits SFT rows into (train, held-out) by a hash of their `id` (stable, order-independent).

    At least one row is held out when `fraction` > 0 (and at least one is kept for training).
    """

    def key(row: dict) -> float:
        return int(hashlib.sha256(str(row["id"]).encode()).hexdigest()[:12], 16) / 16**12

    if fraction <= 0:
        return list(rows), []
    held = [r for r in rows if key(r) < fraction]
    if not held:
        held = [min(rows, key=key)]
    held_ids = {id(r) for r in held}
    train = [r for r in rows if id(r) not in held_ids]
    return train, held


@dataclass
class SFTStats:
    examples: int = 0
    truncated: int = 0
    dropped_no_target: int = 0
    supervised_tokens: int = 0
    total_tokens: int = 0

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def padded_blocks(blocks: torch.Tensor, seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Packed N x T text blocks as LM rows of width `seq_len` >= T: every block token attended and a
    label, right padding (pad id, attention 0, label -100) as `build_sft_examples` pads, so the rows
    batch with SFT rows and `trim_batch` cuts the padding."""
    import torch

    n, t = blocks.shape
    if t > seq_len:
        raise ValueError(f"blocks of {t} tokens do not fit rows of seq_len={seq_len}")
    input_ids = torch.full((n, seq_len), pad_id, dtype=torch.long)
    attention = torch.zeros((n, seq_len), dtype=torch.long)
    labels = torch.full((n, seq_len), IGNORE_INDEX, dtype=torch.long)
    input_ids[:, :t], attention[:, :t], labels[:, :t] = blocks, 1, blocks
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def build_sft_examples(
    tokenizer, rows: Sequence[dict[str, Any]], seq_len: int, where: str
) -> tuple[dict[str, torch.Tensor], SFTStats]:
    """Chat-formats SFT pairs and masks everything but the assistant's answer.

    Args:
        tokenizer: with the Qwen-style chat template and `<|im_end|>`.
        rows: {"prompt", "response", ...} rows.
        seq_len: T; longer examples are cut on the right.
        where: the source file, named in errors.

    Returns:
        ({"input_ids": N x T, "attention_mask": N x T, "labels": N x T} right-padded with the pad id,
        attention 0 and label -100), and counts (truncated, dropped without any supervised token).
    """
    import torch

    from ruyi_model.tokenizer import IM_END

    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    pad = tokenizer.pad_token_id
    prompts, fulls = [], []
    for i, row in enumerate(rows, 1):
        user = {"role": "user", "content": row["prompt"]}
        prompt_text = tokenizer.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(
            [user, {"role": "assistant", "content": row["response"]}], tokenize=False
        )
        if not full_text.startswith(prompt_text):
            raise StageError(
                f"{where}: row {i} (id={row.get('id')!r}): the chat template does not render the "
                f"prompt as a prefix of the conversation; cannot mask the prompt"
            )
        prompts.append(prompt_text)
        fulls.append(full_text)
    prompt_ids = tokenize_texts(tokenizer, prompts, desc="sft prompts")
    full_ids = tokenize_texts(tokenizer, fulls, desc="sft chats")
    stats = SFTStats()
    ids_rows, label_rows = [], []
    for i, (p, f) in enumerate(zip(prompt_ids, full_ids), 1):
        if f[: len(p)] != p:
            raise StageError(
                f"{where}: row {i} (id={rows[i - 1].get('id')!r}): the prompt tokenizes differently "
                f"inside the conversation; cannot mask the prompt"
            )
        try:
            end = f.index(im_end, len(p)) + 1  # supervise up to and including the closing <|im_end|>
        except ValueError:
            raise StageError(
                f"{where}: row {i} (id={rows[i - 1].get('id')!r}): no {IM_END} after the "
                f"response; the chat template must close the assistant turn"
            ) from None
        labels = [IGNORE_INDEX] * len(p) + f[len(p) : end] + [IGNORE_INDEX] * (len(f) - end)
        if len(f) > seq_len:
            stats.truncated += 1
            f, labels = f[:seq_len], labels[:seq_len]
        # Position t predicts t+1: only labels[1:] are ever targets.
        if all(lab == IGNORE_INDEX for lab in labels[1:]):
            stats.dropped_no_target += 1
            continue
        ids_rows.append(f)
        label_rows.append(labels)
    if not ids_rows:
        raise StageError(f"{where}: no SFT example has a supervised token within seq_len={seq_len}")
    n = len(ids_rows)
    input_ids = torch.full((n, seq_len), pad, dtype=torch.long)
    attention = torch.zeros((n, seq_len), dtype=torch.long)
    labels_t = torch.full((n, seq_len), IGNORE_INDEX, dtype=torch.long)
    for k, (f, lab) in enumerate(zip(ids_rows, label_rows)):
        input_ids[k, : len(f)] = torch.tensor(f)
        attention[k, : len(f)] = 1
        labels_t[k, : len(f)] = torch.tensor(lab)
    stats.examples = n
    stats.total_tokens = int(attention.sum())
    stats.supervised_tokens = int((labels_t[:, 1:] != IGNORE_INDEX).sum())
    if stats.truncated or stats.dropped_no_target:
        log.warning(
            "%s: %d of %d SFT examples cut to seq_len=%d, %d dropped (no supervised token left)",
            where,
            stats.truncated,
            len(rows),
            seq_len,
            stats.dropped_no_target,
        )
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels_t}, stats


# --- data streams ------------------------------------------------------------------------------
def _derived_seed(*parts: Any) -> int:
    return int(hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:15], 16)


def trim_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cuts right padding common to the whole batch (SFT rows are stored padded to seq_len)."""
    mask = batch.get("attention_mask")
    if mask is None:
        return batch
    length = int(mask.sum(dim=1).max())
    return {k: v[:, :length] for k, v in batch.items()}


class BlockStream:
    """An endless, epoch-shuffled stream over the rows of equal-length tensors (see docs/choices.md#training).

    Args:
        tensors: name -> N x T tensors (e.g. {"input_ids": blocks}).
        seed: base seed; `name` separates the orders of different streams.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], seed: int, name: str):
        sizes = {int(t.shape[0]) for t in tensors.values()}
        if len(sizes) != 1 or 0 in sizes:
            raise ValueError(
                f"stream {name!r}: tensors must have the same non-zero number of rows, got {sizes}"
            )
        self.tensors, self.seed, self.name = tensors, seed, name
        self.num_rows = sizes.pop()
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        import torch

        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.clear()
            g = torch.Generator().manual_seed(_derived_seed(self.seed, self.name, epoch))
            self._perms[epoch] = torch.randperm(self.num_rows, generator=g)
        return self._perms[epoch]

    def row_indices(self, positions: Iterable[int]) -> list[int]:
        return [int(self._perm(p // self.num_rows)[p % self.num_rows]) for p in positions]

    def rows(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        import torch

        idx = torch.tensor(list(indices), dtype=torch.long)
        return {k: v.index_select(0, idx) for k, v in self.tensors.items()}

    def rows_at(self, positions: Iterable[int]) -> dict[str, torch.Tensor]:
        """The rows at these stream positions, untrimmed."""
        return self.rows(self.row_indices(positions))

    def batch(self, position: int, batch_size: int) -> dict[str, torch.Tensor]:
        """Rows at stream positions `position .. position+batch_size-1`."""
        return trim_batch(self.rows_at(range(position, position + batch_size)))


class MixedStream:
    """A main stream with a replay stream interleaved at the exact long-run share `replay_fraction`.
    Either may itself be a MixedStream (a three-way mixture: the inner shares are of the outer main)."""

    RESOLUTION = 1_000_000

    def __init__(
        self,
        main: BlockStream | MixedStream | None,
        replay: BlockStream | MixedStream | None,
        replay_fraction: float,
    ):
        self.num = round(replay_fraction * self.RESOLUTION)
        if (main is None and self.num < self.RESOLUTION) or (replay is None and self.num > 0):
            raise ValueError("MixedStream: a stream with a non-zero share is missing")
        self.main, self.replay = main, replay

    def _replays_before(self, p: int) -> int:
        return p * self.num // self.RESOLUTION

    def rows_at(self, positions: Iterable[int]) -> dict[str, torch.Tensor]:
        """The rows at these stream positions, untrimmed (both streams' rows have one width)."""
        import torch

        parts: list[dict[str, torch.Tensor]] = []
        for p in positions:
            r = self._replays_before(p)
            if self._replays_before(p + 1) > r:
                parts.append(self.replay.rows_at([r]))
            else:
                parts.append(self.main.rows_at([p - r]))
        return {k: torch.cat([part[k] for part in parts]) for k in parts[0]}

    def batch(self, position: int, batch_size: int) -> dict[str, torch.Tensor]:
        return trim_batch(self.rows_at(range(position, position + batch_size)))

    def replay_count(self, position: int, batch_size: int) -> int:
        return self._replays_before(position + batch_size) - self._replays_before(position)


def fixed_batches(
    tensors: dict[str, torch.Tensor], batch_size: int, max_batches: int
) -> list[dict[str, torch.Tensor]]:
    """The first `max_batches * batch_size` rows, in order, as batches (validation sets)."""
    n = int(next(iter(tensors.values())).shape[0])
    n = min(n, batch_size * max_batches)
    return [
        trim_batch({k: v[s : s + batch_size] for k, v in tensors.items()}) for s in range(0, n, batch_size)
    ]


def check_seq_len(params: Params, section: str, seq_len: int, max_positions: int) -> None:
    if seq_len > max_positions:
        raise ParamsError(
            f"{section}.seq_len={seq_len} exceeds the model's max_position_embeddings={max_positions}"
        )
