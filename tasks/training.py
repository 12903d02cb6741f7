"""The training library shared by the `cpt`, `expand` and `sft` stages (one home for the loop).

Not a stage itself; the stages are `python -m tasks.cpt`, `python -m tasks.expand`,
`python -m tasks.sft`. What lives here, and the design choices:

Data
- `pack_documents`: documents are tokenized without special tokens, each followed by `<|endoftext|>`
  (the document separator), concatenated in file order and cut into `seq_len` blocks; the last
  partial block is dropped (fewer than `seq_len` tokens). Attention runs across document
  boundaries inside a block (as GPT-2/nanoGPT packing does; no per-document mask): cheap, standard,
  and the eos token marks the boundary for the model.
- `build_sft_examples`: Qwen-style chat (`apply_chat_template` of [user: prompt, assistant:
  response]); labels are -100 on the prompt (everything up to and including
  `<|im_start|>assistant\\n`), supervised on the response and its closing `<|im_end|>`, -100 on the
  `\\n` after it and on padding. Examples longer than `seq_len` are cut on the right; an example with
  no supervised token left is dropped. Both are counted, logged and reported in the metrics.
- `sft_holdout_split`: the held-out SFT slice is chosen by a hash of each row's `id` (stable under
  re-ordering and additions), so reruns and other stages agree on it without a shared file.
- `BlockStream` / `MixedStream`: the sample at global position p of a stream of N rows is row
  `perm_e[p mod N]` of epoch `e = p // N`, where `perm_e` is a permutation drawn from a generator
  seeded by (seed, stream name, epoch). The batch of any step is therefore a pure function of the
  step, which makes resume exact without saving any iterator state (the checkpoint still records the
  data position, checked on resume). `MixedStream` interleaves a replay stream at an exact long-run
  share: position p is a replay sample iff floor((p+1) f) > floor(p f) (integer arithmetic).

Optimisation
- AdamW (torch) over the trainable parameters only; weight decay on matrices (dim >= 2), none on
  norms, as in nanoGPT/HF. Linear warmup over `warmup_steps`, then cosine decay to
  `min_lr_ratio * lr` at `max_steps` (`lr_factor`, driven by `torch.optim.lr_scheduler.LambdaLR`).
  Gradient accumulation over `grad_accum` micro-batches: each micro-batch's loss (a mean over its
  supervised tokens) is weighted by its share of the step's supervised tokens, so the step's gradient
  is that of the token mean over the whole effective batch, as one batch of `grad_accum * batch_size`
  rows gives (packed blocks: 1 / grad_accum each; SFT micro-batches differ; tested). Optional bf16
  autocast (CUDA or CPU; the weights, gradients and optimizer state stay fp32; tested),
  gradient-norm clipping (0 = off). A non-finite loss stops the stage with
  an error naming the step (never a silent skip).
- `exit_weights_at`: the time-dependent weights w_k(t) of Ruyi2 Eq. 1. The paper gives no formula;
  ours (`params.cpt.exit_weights`): the deepest member has the constant weight `deepest`; every
  shallower member goes from `start` at the first step to `floor` at the last step, along
  `kind` = constant (stays at `start`), linear, or cosine (half cosine). Default cosine 1.0 -> 0.3:
  strong deep supervision early, then the backbone is left mostly to the deepest member, with a
  floor above 0 so the shallow members keep training (Ruyi2 section 3.1's description).

Checkpoints (`Checkpointer`), in `artifacts/checkpoints/<stage>/step_<n>/`, each written atomically
(`tasks.common.atomic_dir`), the last `keep` (2) kept, always one at the final step:
  model.safetensors    every tensor of the model (the frozen ones too: simple, and exact)
  optimizer.pt         AdamW state (torch.save; loaded with weights_only=True)
  scheduler.pt         LambdaLR state (weights_only=True)
  rng.pt               python / numpy / torch (and CUDA) RNG states (weights_only=True)
  trainer_state.json   step, data position (samples), tokens, loss history, train time, fingerprint
- Resume is automatic: a stage starts from the latest complete checkpoint whose fingerprint matches
  and logs it (`resumed_from_step` in the metrics). A run killed and resumed ends with bitwise the
  same weights on CPU as an uninterrupted one (tested).
- The fingerprint hashes the stage's parameters (except `checkpoint_every`, `eval_every` and
  `eval_batches`, which do not change the weights), the model section, the seed, the sha256 of
  every input file (data, tokenizer, input model) and of the code that trains (the stage module,
  this file, the model and the loss kernels' entry point). Our call on a mismatch: the stale checkpoint
  directory is set aside to `artifacts/checkpoints/<stage>.stale/` (replacing an older one) with a
  warning that names every differing key, and training starts from scratch; the metrics record it
  (`stale_checkpoint`). An error would block every `dvc repro` after a parameter change, while
  resuming would silently mix two configurations.
- A checkpoint directory that is incomplete or unreadable is an error naming the file, never a
  silent restart.

Loop (`train_loop`): evaluation before the first step and every `eval_every` steps (held-out loss per
member, each batch weighted by its supervised tokens), a tqdm bar with the loss in the postfix,
per-step train loss per member, per-eval validation loss per member, `loss.png` + `loss.csv`
(step, exit, split, loss) for `dvc plots` (`write_loss_curves`). Deterministic given `params.seed`
(no dropout in the model; data order seeded). The per-step train loss of a mixed stream has a
visible period (a batch with or without its replay sample); the validation curve is the smooth one.

Data parallelism (`distributed.backend: ray`, tasks/distributed.py): inside a Ray Train worker
`train_loop` wraps the model in DistributedDataParallel, trains this rank's rows of the same global
batch with the same token normalisation (`_data_parallel_backward`), shards the evaluation, and
writes checkpoints from rank 0 alone; every rank resumes from the checkpoint rank 0 chose. The local
path (no context) is unchanged.

Threads: `torch.set_num_threads` is left to the caller (`OMP_NUM_THREADS`). Measured on the
project's 2-core machine while ~7 other jobs ran: one thread trained the tiny family at about
700 tokens/s, while two threads made no visible progress in 10 minutes (OpenMP threads spinning
against the other jobs); on a shared machine run the stages with OMP_NUM_THREADS=1.
Tiny defaults (params.yaml) on the embedded data, one thread: cpt 150 steps 101 CPU-s (val loss
5.4 per member against ln V = 7.6), expand 80 steps 25 CPU-s (DaE member STEM loss 3.46 -> 2.38),
sft 80 steps 34 CPU-s (DaE member held-out assistant loss 2.64 -> 1.84).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import re
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks import distributed
from tasks.common import StageError, atomic_dir, read_jsonl, write_json

if TYPE_CHECKING:  # heavy imports stay inside the functions (the `ruyi` CLI must start instantly)
    import torch

    from tasks.params import ExitWeightSchedule, TrainParams

log = logging.getLogger("ruyi")

IGNORE_INDEX = -100
#: The end-of-turn token (as `ruyi_model.tokenizer.IM_END`; repeated here so importers stay light).
IM_END_TOKEN = "<|im_end|>"
#: Train-loss rows averaged for the "final" train loss reported in the metrics.
FINAL_TRAIN_WINDOW = 10
#: Parameters that do not change the trained weights (excluded from the checkpoint fingerprint).
NON_FINGERPRINT_KEYS = ("checkpoint_every", "eval_every", "eval_batches")


# --- inputs ----------------------------------------------------------------------------------
def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dir_sha256(path: str | Path) -> dict[str, str]:
    """sha256 of every regular file directly inside `path` (model or tokenizer directories)."""
    path = Path(path)
    return {p.name: file_sha256(p) for p in sorted(path.iterdir()) if p.is_file()}


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
        raise StageError(f"tokenizer at {where}: eos/pad must be {EOS_TOKEN!r}/{PAD_TOKEN!r}, got "
                         f"{tokenizer.eos_token!r}/{tokenizer.pad_token!r}")
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
                raise StageError(f"{path}: row {i} (id={row.get('id')!r}): {key!r} must be a non-empty string")
    return rows


def tokenize_texts(tokenizer, texts: Sequence[str], batch: int = 512, desc: str = "tokenize") -> list[list[int]]:
    """Token ids of each text, without special tokens (batched through the fast tokenizer)."""
    from tqdm.auto import tqdm

    out: list[list[int]] = []
    for start in tqdm(range(0, len(texts), batch), desc=desc, unit="batch", leave=False, mininterval=1.0):
        out.extend(tokenizer(list(texts[start:start + batch]), add_special_tokens=False)["input_ids"])
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


def pack_corpus(tokenizer, texts: Sequence[str], seq_len: int, where: str, desc: str = "pack") -> torch.Tensor:
    """`pack_documents` of `texts`; an input too small for one block is an error naming it."""
    blocks = pack_documents(tokenize_texts(tokenizer, texts, desc=desc), tokenizer.eos_token_id, seq_len)
    if blocks.shape[0] == 0:
        raise StageError(f"{where}: too little text for one block of seq_len={seq_len} tokens "
                         f"({len(texts)} documents)")
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


def build_sft_examples(tokenizer, rows: Sequence[dict[str, Any]], seq_len: int,
                       where: str) -> tuple[dict[str, torch.Tensor], SFTStats]:
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
        full_text = tokenizer.apply_chat_template([user, {"role": "assistant", "content": row["response"]}],
                                                  tokenize=False)
        if not full_text.startswith(prompt_text):
            raise StageError(f"{where}: row {i} (id={row.get('id')!r}): the chat template does not render the "
                             f"prompt as a prefix of the conversation; cannot mask the prompt")
        prompts.append(prompt_text)
        fulls.append(full_text)
    prompt_ids = tokenize_texts(tokenizer, prompts, desc="sft prompts")
    full_ids = tokenize_texts(tokenizer, fulls, desc="sft chats")
    stats = SFTStats()
    ids_rows, label_rows = [], []
    for i, (p, f) in enumerate(zip(prompt_ids, full_ids), 1):
        if f[: len(p)] != p:
            raise StageError(f"{where}: row {i} (id={rows[i - 1].get('id')!r}): the prompt tokenizes differently "
                             f"inside the conversation; cannot mask the prompt")
        try:
            end = f.index(im_end, len(p)) + 1  # supervise up to and including the closing <|im_end|>
        except ValueError:
            raise StageError(f"{where}: row {i} (id={rows[i - 1].get('id')!r}): no {IM_END} after the "
                             f"response; the chat template must close the assistant turn") from None
        labels = [IGNORE_INDEX] * len(p) + f[len(p):end] + [IGNORE_INDEX] * (len(f) - end)
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
        log.warning("%s: %d of %d SFT examples cut to seq_len=%d, %d dropped (no supervised token left)",
                    where, stats.truncated, len(rows), seq_len, stats.dropped_no_target)
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
    """An endless, epoch-shuffled stream over the rows of equal-length tensors (see module docstring).

    Args:
        tensors: name -> N x T tensors (e.g. {"input_ids": blocks}).
        seed: base seed; `name` separates the orders of different streams.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], seed: int, name: str):
        sizes = {int(t.shape[0]) for t in tensors.values()}
        if len(sizes) != 1 or 0 in sizes:
            raise ValueError(f"stream {name!r}: tensors must have the same non-zero number of rows, got {sizes}")
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

    def batch(self, position: int, batch_size: int) -> dict[str, torch.Tensor]:
        """Rows at stream positions `position .. position+batch_size-1`."""
        return trim_batch(self.rows(self.row_indices(range(position, position + batch_size))))


class MixedStream:
    """A main stream with a replay stream interleaved at the exact long-run share `replay_fraction`."""

    RESOLUTION = 1_000_000

    def __init__(self, main: BlockStream | None, replay: BlockStream | None, replay_fraction: float):
        self.num = round(replay_fraction * self.RESOLUTION)
        if (main is None and self.num < self.RESOLUTION) or (replay is None and self.num > 0):
            raise ValueError("MixedStream: a stream with a non-zero share is missing")
        self.main, self.replay = main, replay

    def _replays_before(self, p: int) -> int:
        return p * self.num // self.RESOLUTION

    def batch(self, position: int, batch_size: int) -> dict[str, torch.Tensor]:
        import torch

        parts: list[dict[str, torch.Tensor]] = []
        for p in range(position, position + batch_size):
            r = self._replays_before(p)
            if self._replays_before(p + 1) > r:
                parts.append(self.replay.rows(self.replay.row_indices([r])))
            else:
                parts.append(self.main.rows(self.main.row_indices([p - r])))
        return trim_batch({k: torch.cat([part[k] for part in parts]) for k in parts[0]})

    def replay_count(self, position: int, batch_size: int) -> int:
        return self._replays_before(position + batch_size) - self._replays_before(position)


def fixed_batches(tensors: dict[str, torch.Tensor], batch_size: int, max_batches: int) -> list[dict[str, torch.Tensor]]:
    """The first `max_batches * batch_size` rows, in order, as batches (validation sets)."""
    n = int(next(iter(tensors.values())).shape[0])
    n = min(n, batch_size * max_batches)
    return [trim_batch({k: v[s:s + batch_size] for k, v in tensors.items()}) for s in range(0, n, batch_size)]


# --- optimisation ----------------------------------------------------------------------------------
def lr_factor(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup, cosine to the floor."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(named_params: Sequence[tuple[str, torch.nn.Parameter]], cfg: TrainParams):
    """AdamW with weight decay on matrices only, and its warmup + cosine LambdaLR scheduler."""
    import functools

    import torch

    params = [(n, p) for n, p in named_params if p.requires_grad]
    if not params:
        raise StageError("nothing to train: no parameter requires grad")
    decay = [p for n, p in params if p.dim() >= 2]
    no_decay = [p for n, p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
    schedule = functools.partial(lr_factor, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps,
                                 min_lr_ratio=cfg.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return optimizer, scheduler


def exit_weights_at(schedule: ExitWeightSchedule, exit_layers: Sequence[int], step: int, max_steps: int) -> list[float]:
    """w_k(t) of Ruyi2 Eq. 1 at 0-based step `step` of `max_steps` (see module docstring).

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
        out = model(batch["input_ids"], attention_mask=batch.get("attention_mask"),
                    labels=batch.get("labels", batch["input_ids"]), exit_loss_weights=list(weights(step)))
        return out.loss, {d: float(v) for d, v in out.exit_losses.items()}
    return fn


def member_loss_fn(exit_layer: int) -> LossFn:
    """Training of one member alone (`exit_layer=d`)."""
    def fn(model, batch: dict, step: int):
        out = model(batch["input_ids"], attention_mask=batch.get("attention_mask"),
                    labels=batch.get("labels", batch["input_ids"]), exit_layer=exit_layer, use_cache=False)
        return out.loss, {exit_layer: float(out.loss.detach())}
    return fn


def multi_exit_eval(model, batch: dict) -> dict[int, tuple[float, int]]:
    """Per-member (sum of token losses, tokens) of one batch, every member from one backbone pass."""
    out = model(batch["input_ids"], attention_mask=batch.get("attention_mask"),
                labels=batch.get("labels", batch["input_ids"]))
    n = _targets(batch)
    return {d: (float(v) * n, n) for d, v in out.exit_losses.items()}


def member_eval(exit_layer: int) -> EvalFn:
    def fn(model, batch: dict) -> dict[int, tuple[float, int]]:
        out = model(batch["input_ids"], attention_mask=batch.get("attention_mask"),
                    labels=batch.get("labels", batch["input_ids"]), exit_layer=exit_layer, use_cache=False)
        n = _targets(batch)
        return {exit_layer: (float(out.loss) * n, n)}
    return fn


def evaluate(model, batches: Sequence[dict], eval_fn: EvalFn = multi_exit_eval, bf16: bool = False) -> dict[int, float]:
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


# --- checkpoints ---------------------------------------------------------------------------------
def _code_fingerprint(stage: str) -> dict[str, str]:
    """sha256 of the code a stage's training depends on: a checkpoint written by other code is stale
    (DVC reruns a stage when its code changes; resuming the old code's checkpoint would mix the two)."""
    from tasks.common import sha256_file

    root = Path(__file__).resolve().parents[1]
    files = [f"tasks/{stage}.py", "tasks/training.py", "tasks/distributed.py", "ruyi_model/config.py", "ruyi_model/modeling.py",
             "ruyi_model/dae.py", "triton_kernels/ops/exit_head_loss.py"]
    return {f: sha256_file(root / f) for f in files if (root / f).is_file()}


def fingerprint_info(stage: str, section: Any, *, seed: int, model: Any = None, inputs: dict[str, Any],
                     extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed (see module docstring)."""
    params = section.model_dump() if hasattr(section, "model_dump") else dict(section)
    for key in NON_FINGERPRINT_KEYS:
        params.pop(key, None)
    info: dict[str, Any] = {"stage": stage, "seed": seed, "params": params, "inputs": inputs,
                            "code": _code_fingerprint(stage)}
    if model is not None:
        info["model"] = model.model_dump() if hasattr(model, "model_dump") else model
    if extra:
        info["extra"] = extra
    return json.loads(json.dumps(info, sort_keys=True, default=str))


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def fingerprint_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable 'key: old -> new' lines for every dotted key that differs."""
    a, b = _flatten(old), _flatten(new)
    lines = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            lines.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
    return lines


CHECKPOINT_FILES = ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json")
_STEP_DIR = re.compile(r"^step_(\d+)$")


def _rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """Resumable checkpoints of one stage under `root` (see module docstring).

    Args:
        root: `artifacts/checkpoints/<stage>`.
        info: `fingerprint_info(...)` of this run.
        keep: how many step directories to keep.
    """

    def __init__(self, root: str | Path, info: dict[str, Any], keep: int = 2):
        self.root = Path(root)
        self.info = info
        self.digest = hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()
        self.keep = keep
        self.stale: dict[str, Any] | None = None

    def step_dirs(self) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
        return sorted(found)

    def find_resumable(self) -> Path | None:
        """The latest checkpoint of this configuration, or None.

        A checkpoint from different parameters/inputs is set aside (see module docstring); a broken one
        is an error.
        """
        if self.root.is_dir():  # leftovers of a save interrupted by SIGKILL (atomic_dir's temporaries)
            for p in self.root.glob(".step_*.tmp-*"):
                shutil.rmtree(p, ignore_errors=True)
        dirs = self.step_dirs()
        if not dirs:
            return None
        step, latest = dirs[-1]
        state = self._read_state(latest)
        if state.get("fingerprint") != self.digest:
            diffs = fingerprint_differences(state.get("fingerprint_info", {}), self.info) or ["(fingerprint format)"]
            stale = self.root.with_name(self.root.name + ".stale")
            if stale.exists():
                shutil.rmtree(stale)
            self.root.rename(stale)
            self.stale = {"set_aside_to": str(stale), "step": step, "differences": diffs}
            log.warning("checkpoint %s was made with different parameters or inputs; set aside to %s and "
                        "training starts from scratch. Differences:\n  %s", latest, stale, "\n  ".join(diffs))
            return None
        return latest

    @staticmethod
    def _read_state(path: Path) -> dict[str, Any]:
        for name in CHECKPOINT_FILES:
            if not (path / name).is_file():
                raise StageError(f"checkpoint {path} is incomplete: {path / name} is missing "
                                 f"(delete the directory to start over from the previous checkpoint)")
        try:
            return json.loads((path / "trainer_state.json").read_text())
        except json.JSONDecodeError as e:
            raise StageError(f"checkpoint {path / 'trainer_state.json'}: not valid JSON ({e.msg})") from None

    def save(self, step: int, model, optimizer, scheduler, state: dict[str, Any]) -> Path:
        import torch
        from safetensors.torch import save_file

        final = self.root / f"step_{step}"
        with atomic_dir(final) as tmp:
            tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            save_file(tensors, str(tmp / "model.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(_rng_state(), tmp / "rng.pt")
            write_json(tmp / "trainer_state.json",
                       {**state, "step": step, "fingerprint": self.digest, "fingerprint_info": self.info})
        for _, old in self.step_dirs()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def load(self, path: Path, model, optimizer, scheduler) -> dict[str, Any]:
        """Restores model, optimizer, scheduler and RNG states; returns the trainer state."""
        import torch
        from safetensors.torch import load_file

        state = self._read_state(path)
        try:
            tensors = load_file(str(path / "model.safetensors"))
            missing, unexpected = model.load_state_dict(tensors, strict=False)
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise StageError(f"cannot load {path / 'model.safetensors'}: {e}") from None
        if missing or unexpected:
            raise StageError(f"{path / 'model.safetensors'} does not match the model: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        for name, obj in (("optimizer.pt", optimizer), ("scheduler.pt", scheduler)):
            try:
                obj.load_state_dict(torch.load(path / name, weights_only=True))
            except Exception as e:
                raise StageError(f"cannot load {path / name}: {e}") from None
        try:
            _set_rng_state(torch.load(path / "rng.pt", weights_only=True))
        except Exception as e:
            raise StageError(f"cannot load {path / 'rng.pt'}: {e}") from None
        return state


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
        return {"steps": self.steps, "resumed_from_step": self.resumed_from_step, "samples": self.samples,
                "tokens": self.tokens, "tokens_per_s": round(self.tokens_per_s, 1),
                "train_seconds": round(self.train_seconds, 2), "wall_s": round(self.wall_seconds, 2),
                "stale_checkpoint": self.stale_checkpoint}


def train_loop(*, stage: str, model, cfg: TrainParams, named_params: Sequence[tuple[str, Any]], stream,
               loss_fn: LossFn, val_batches: Sequence[dict], eval_fn: EvalFn = multi_exit_eval,
               checkpointer: Checkpointer | None = None,
               callbacks: Sequence[Callable[[int], None]] = ()) -> TrainResult:
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

    Returns:
        TrainResult (the history includes the steps of earlier, resumed-from runs).
    """
    import torch
    from tqdm.auto import tqdm

    t_wall = time.perf_counter()
    device = next(model.parameters()).device
    optimizer, scheduler = build_optimizer(named_params, cfg)
    params = [p for _, p in named_params if p.requires_grad]
    result = TrainResult()
    start = 0
    dist_ctx = distributed.context()  # None: one process (see tasks/distributed.py for the data-parallel run)
    main = dist_ctx is None or dist_ctx.rank == 0
    if checkpointer is not None:
        if dist_ctx is None:
            latest = checkpointer.find_resumable()
        else:  # rank 0 alone looks (it may set a stale directory aside); every rank loads what it found
            latest, checkpointer.stale = distributed.broadcast_object(
                (checkpointer.find_resumable(), checkpointer.stale) if main else None)
        result.stale_checkpoint = checkpointer.stale
        if latest is not None:
            state = checkpointer.load(latest, model, optimizer, scheduler)
            start = int(state["step"])
            expected = start * cfg.grad_accum * cfg.batch_size
            if int(state["samples"]) != expected:
                raise StageError(f"{latest / 'trainer_state.json'}: data position {state['samples']} does not "
                                 f"match step {start} x {cfg.grad_accum} x {cfg.batch_size}")
            result.history = list(state["history"])
            result.samples, result.tokens = int(state["samples"]), int(state["tokens"])
            result.train_seconds = float(state["train_seconds"])
            result.resumed_from_step = start
            log.info("%s: resumed from %s (step %d of %d)", stage, latest, start, cfg.max_steps)
    if start > cfg.max_steps:
        raise StageError(f"{stage}: checkpoint is at step {start}, beyond max_steps={cfg.max_steps}")

    train_model = model if dist_ctx is None else distributed.wrap_model(model)

    def record_eval(step: int) -> dict[int, float]:
        if dist_ctx is None:
            losses = evaluate(model, val_batches, eval_fn, cfg.bf16)
        else:
            losses = _sharded_evaluate(model, val_batches, eval_fn, cfg.bf16, dist_ctx)
        result.history.extend({"step": step, "exit": d, "split": "val", "loss": v} for d, v in losses.items())
        return losses

    if start == 0:
        record_eval(0)
    model.train()
    bar = tqdm(range(start, cfg.max_steps), desc=stage, unit="step", initial=start, total=cfg.max_steps,
               mininterval=1.0, dynamic_ncols=True, disable=not main)
    for step in bar:
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        step_losses: dict[int, float] = {}
        total = 0.0
        micro = []
        for _ in range(cfg.grad_accum):
            batch = {k: v.to(device) for k, v in stream.batch(result.samples, cfg.batch_size).items()}
            result.samples += cfg.batch_size
            mask = batch.get("attention_mask")
            result.tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
            micro.append(batch)
        # Each micro-batch loss is a mean over its supervised tokens: weighting it by its share of the
        # step's supervised tokens makes the accumulated gradient that of the token mean over the whole
        # effective batch (as one big batch would give), also when SFT micro-batches supervise
        # different numbers of tokens (1 / grad_accum each when they are equal, as packed blocks are).
        targets = [_targets(b) for b in micro]
        all_targets = sum(targets)
        if dist_ctx is not None:  # this rank's shard of the same global batch (tasks/distributed.py)
            total, step_losses = _data_parallel_backward(
                train_model, stream, result.samples - cfg.grad_accum * cfg.batch_size, cfg, all_targets, loss_fn,
                step, stage, device, dist_ctx)
        else:
            for batch, n in zip(micro, targets):
                if all_targets and not n:
                    continue  # nothing supervised: no loss, no gradient
                share = n / all_targets if all_targets else 1.0 / cfg.grad_accum
                with _autocast(device, cfg.bf16):
                    loss, per_exit = loss_fn(model, batch, step)
                if not torch.isfinite(loss):
                    raise StageError(_non_finite_message(stage, loss, step))
                (loss * share).backward()
                total += float(loss.detach()) * share
                for d, v in per_exit.items():
                    step_losses[d] = step_losses.get(d, 0.0) + v * share
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        result.train_seconds += time.perf_counter() - t0
        done = step + 1
        result.history.extend({"step": done, "exit": d, "split": "train", "loss": v}
                              for d, v in sorted(step_losses.items()))
        postfix = {"loss": f"{total:.3f}", "lr": f"{scheduler.get_last_lr()[0]:.2e}"}
        if done % cfg.eval_every == 0 or done == cfg.max_steps:
            val = record_eval(done)
            postfix["val"] = "/".join(f"{v:.2f}" for v in val.values())
        bar.set_postfix(postfix, refresh=False)
        if checkpointer is not None and main and (done % cfg.checkpoint_every == 0 or done == cfg.max_steps):
            checkpointer.save(done, model, optimizer, scheduler,
                              {"samples": result.samples, "tokens": result.tokens, "history": result.history,
                               "train_seconds": result.train_seconds})
        for callback in callbacks:
            callback(done)
    bar.close()
    result.steps = cfg.max_steps
    result.wall_seconds = time.perf_counter() - t_wall
    model.eval()
    if checkpointer is not None and main:
        # DVC declares the checkpoint directory as an output: it must exist even when no
        # checkpoint was due (checkpoint_every > max_steps) or a stale one was set aside.
        checkpointer.root.mkdir(parents=True, exist_ok=True)
    return result


def _non_finite_message(stage: str, loss, step: int) -> str:
    return (f"{stage}: the loss is {float(loss.detach())} at step {step + 1}; lower {stage}.lr or "
            f"check the data (nothing was saved for this run)")


def _data_parallel_backward(model, stream, start: int, cfg: TrainParams, all_targets: int, loss_fn: LossFn,
                            step: int, stage: str, device, ctx) -> tuple[float, dict[int, float]]:
    """One step's forwards/backwards of rank `ctx.rank` (see tasks/distributed.py): rows [lo, hi) of the
    global batch that starts at stream position `start`, in forwards of at most `batch_size` rows, each
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
    total, step_losses = 0.0, {}
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
        total += float(loss.detach()) * share
        for d, v in per_exit.items():
            step_losses[d] = step_losses.get(d, 0.0) + v * share
    keys = sorted(step_losses)
    sums = distributed.all_reduce_sum([total] + [step_losses[d] for d in keys])
    return sums[0], dict(zip(keys, sums[1:]))


def _one_target(batch: dict) -> dict:
    labels = batch.get("labels", batch["input_ids"]).clone()
    if labels.shape[1] < 2:
        raise StageError("data-parallel step: a shard without any supervised token is too short to stand in "
                         "for the gradient all-reduce")
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


# --- plots ----------------------------------------------------------------------------------------
def write_loss_curves(history: Sequence[dict[str, Any]], out_dir: str | Path, title: str,
                      exits: Sequence[int] | None = None, name: str = "loss") -> tuple[Path, Path]:
    """Writes `<name>.csv` (step, exit, split, loss) and `<name>.png` (one line per member and split).

    Args:
        history: TrainResult.history rows.
        out_dir: `plots/<stage>/`.
        exits: members to plot (default: all in the history).
    """
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tasks.common import atomic_file, save_figure

    out_dir = Path(out_dir)
    rows = [r for r in history if exits is None or r["exit"] in exits]
    csv_path, png_path = out_dir / f"{name}.csv", out_dir / f"{name}.png"
    with atomic_file(csv_path, "w") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "exit", "split", "loss"], lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow({"step": r["step"], "exit": r["exit"], "split": r["split"], "loss": f"{r['loss']:.6f}"})
    fig, ax = plt.subplots(figsize=(7, 4.2))
    members = sorted({r["exit"] for r in rows})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, d in enumerate(members):
        color = colors[i % len(colors)]
        for split, style in (("train", dict(lw=0.8, alpha=0.55)), ("val", dict(lw=1.8, marker="o", ms=3))):
            pts = [(r["step"], r["loss"]) for r in rows if r["exit"] == d and r["split"] == split]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, color=color, label=f"exit {d} {split}", **style)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    save_figure(fig, png_path, dpi=110)
    return png_path, csv_path


# --- small shared helpers of the three stages ------------------------------------------------------
def count_params(params: Iterable[Any]) -> int:
    return sum(int(p.numel()) for p in params)


def device_for_training():
    import torch

    ctx = distributed.context()
    if ctx is not None:  # a data-parallel worker: its own device (tasks/distributed.py)
        return torch.device(ctx.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's bytes (any dtype): compares tensors bit for bit without keeping copies."""
    import torch

    return hashlib.sha256(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def snapshot_members(model, exit_layers: Sequence[int], batch: torch.Tensor,
                     exclude: Sequence[str] = ()) -> tuple[dict[str, str], dict[int, torch.Tensor]]:
    """Digests of every parameter not named in `exclude` and the logits of `exit_layers` on `batch`
    (B x T ids), to check later that training left those members bit-identical (`members_unchanged`)."""
    import torch

    excluded = set(exclude)
    digests = {n: tensor_digest(p) for n, p in model.named_parameters() if n not in excluded}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = {d: model(batch, exit_layer=d, use_cache=False).logits.clone() for d in exit_layers}
    model.train(was_training)
    return digests, logits


def members_unchanged(model, snapshot: tuple[dict[str, str], dict[int, torch.Tensor]], batch: torch.Tensor,
                      exclude: Sequence[str] = ()) -> tuple[bool, list[str]]:
    """Compares `model` with `snapshot_members(...)`: every snapshotted parameter not in `exclude` by
    digest, the members' logits on `batch` with torch.equal. Returns (all equal, what differs)."""
    import torch

    digests, logits = snapshot
    excluded = set(exclude)
    current = dict(model.named_parameters())
    changed = [n for n, h in digests.items() if n not in excluded and (n not in current or tensor_digest(current[n]) != h)]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        changed += [f"logits of exit {d}" for d, ref in logits.items()
                    if not torch.equal(model(batch, exit_layer=d, use_cache=False).logits, ref)]
    model.train(was_training)
    return not changed, changed


def per_exit_metrics(before: dict[int, float], after: dict[int, float], prefix: str = "") -> dict[str, Any]:
    """{"exit_<d>": {"<prefix>loss_before": ..., "<prefix>loss_after": ...}} for every member."""
    out: dict[str, Any] = {}
    for d in sorted(set(before) | set(after)):
        entry = out.setdefault(f"exit_{d}", {})
        if d in before:
            entry[f"{prefix}loss_before"] = round(before[d], 6)
        if d in after:
            entry[f"{prefix}loss_after"] = round(after[d], 6)
    return out


def merge_metrics(*parts: dict[str, Any]) -> dict[str, Any]:
    """Merges nested metrics dicts (one level deep: `exit_<d>` entries are combined)."""
    out: dict[str, Any] = {}
    for part in parts:
        for k, v in part.items():
            if isinstance(v, dict) and isinstance(out.get(k), dict):
                out[k] = {**out[k], **v}
            else:
                out[k] = v
    return out
