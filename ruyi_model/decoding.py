"""Batched greedy decoding and decoding-speed measurement at a fixed member of a family.

    texts = greedy_generate(model, tokenizer, ["What is 2 + 3?"], exit_layer=2, max_new_tokens=64)
    speed = measure_tokens_per_s(model, exit_layer=2, prompt_ids=[1, 2, 3], new_tokens=32)

Used by `tasks.evaluate` (accuracy and tokens/s per exit) and the RL evaluation. Left padding, fresh
generation configs and interleaved timing: docs/choices.md#decoding.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

from ruyi_model.tokenizer import EOS_TOKEN, IM_END

#: The tokens that end a completion: the end of an assistant turn, then end of text.
STOP_TOKENS = (IM_END, EOS_TOKEN)


def stop_token_ids(tokenizer) -> list[int]:
    """Ids of the tokens that end a completion (`<|im_end|>`, `<|endoftext|>`) known to `tokenizer`."""
    ids = []
    for tok in STOP_TOKENS:
        tid = tokenizer.convert_tokens_to_ids(tok)
        if tid is not None and tid != tokenizer.unk_token_id:
            ids.append(int(tid))
    if not ids:
        raise ValueError(f"the tokenizer knows none of the stop tokens {STOP_TOKENS}")
    return ids


def encode_prompts(tokenizer, prompts: Sequence[str], chat: bool = True) -> list[list[int]]:
    """Token ids of each prompt: the chat template with the generation prompt, or the raw text.

    Args:
        tokenizer: a tokenizer with a chat template (when `chat`).
        prompts: user messages (or, with `chat=False`, complete prompt texts).
        chat: wrap each prompt as a user turn and append `<|im_start|>assistant\\n`.

    Returns:
        One list of token ids per prompt (no padding).
    """
    out = []
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"prompt {i} is empty or not a string: {prompt!r}")
        text = (
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
            )
            if chat
            else prompt
        )
        out.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return out


def pad_left(batch: Sequence[Sequence[int]], pad_id: int):
    """Left-pads token-id rows into one batch (decoding appends on the right, so every row's last
    prompt token sits in the last column): `(input_ids, attention_mask)`, both N x P LongTensors, the
    mask 1 on real tokens."""
    import torch

    if not batch:
        raise ValueError("pad_left: no rows to pad")

    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    return input_ids, attention_mask


def greedy_generate_ids(
    model,
    prompt_ids: Sequence[Sequence[int]],
    exit_layer: int,
    max_new_tokens: int,
    batch_size: int = 8,
    stop_ids: Sequence[int] = (),
    pad_id: int = 0,
    progress: str | None = None,
) -> list[list[int]]:
    """Greedy completions of already-encoded prompts at member `exit_layer`, batched with left padding.

    Args:
        model: a `FamilialForCausalLM` (any model whose `generate` accepts `exit_layer`).
        prompt_ids: one list of token ids per prompt.
        exit_layer: the member that decodes.
        max_new_tokens: upper bound of new tokens per prompt.
        batch_size: prompts decoded together (B x T_max left-padded batches).
        stop_ids: token ids that end a completion (not included in the result).
        pad_id: id used for left padding (and after a stop in finished rows).
        progress: tqdm description, or None for no bar.

    Returns:
        The new token ids of each prompt, in the input order, cut before the first stop token.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) and batch_size ({batch_size}) must be >= 1")
    limit = model.config.max_position_embeddings
    for i, ids in enumerate(prompt_ids):
        if not ids:
            raise ValueError(f"prompt {i} encodes to no tokens")
        if len(ids) + max_new_tokens > limit:
            raise ValueError(
                f"prompt {i} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} it exceeds "
                f"the model's max_position_embeddings={limit}"
            )
    stops = set(int(s) for s in stop_ids)
    gen_config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=sorted(stops) or None,
        pad_token_id=pad_id,
    )
    order = sorted(range(len(prompt_ids)), key=lambda i: (-len(prompt_ids[i]), i))
    results: list[list[int] | None] = [None] * len(prompt_ids)
    batches = [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in tqdm(batches, desc=progress, disable=progress is None, leave=False):
                input_ids, attention_mask = pad_left([list(prompt_ids[i]) for i in batch], pad_id)
                out = model.generate(
                    input_ids=input_ids.to(model.device),
                    attention_mask=attention_mask.to(model.device),
                    generation_config=gen_config,
                    exit_layer=exit_layer,
                )
                for row, i in enumerate(batch):
                    new = out[row, input_ids.shape[1] :].tolist()
                    cut = next((k for k, t in enumerate(new) if t in stops), len(new))
                    results[i] = new[:cut]
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


def greedy_generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    exit_layer: int,
    max_new_tokens: int,
    batch_size: int = 8,
    chat: bool = True,
    progress: str | None = None,
) -> list[str]:
    """Greedy completions of `prompts` at member `exit_layer` (batched, left-padded, KV cache).

    Args:
        model: a `FamilialForCausalLM`.
        tokenizer: its tokenizer (chat template, `<|pad|>`, `<|im_end|>`).
        prompts: user messages (see `encode_prompts` for `chat`).
        exit_layer: the member that decodes.
        max_new_tokens: upper bound of new tokens per prompt.
        batch_size: prompts decoded together.
        chat: apply the chat template with the generation prompt.
        progress: tqdm description, or None for no bar.

    Returns:
        The completion text of each prompt (up to the first stop token, special tokens removed).
    """
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token (<|pad|>); left-padded batches need one")
    ids = greedy_generate_ids(
        model,
        encode_prompts(tokenizer, prompts, chat=chat),
        exit_layer,
        max_new_tokens,
        batch_size=batch_size,
        stop_ids=stop_token_ids(tokenizer),
        pad_id=tokenizer.pad_token_id,
        progress=progress,
    )
    return [tokenizer.decode(new, skip_special_tokens=True) for new in ids]


def _time_decode(model, exit_layer: int, input_ids, gen_config) -> float:
    import torch

    sync = torch.cuda.synchronize if input_ids.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, generation_config=gen_config, exit_layer=exit_layer)
    sync()
    elapsed = time.perf_counter() - start
    produced = out.shape[1] - input_ids.shape[1]
    if produced != gen_config.max_new_tokens:
        raise RuntimeError(
            f"speed run at exit {exit_layer} produced {produced} tokens, expected {gen_config.max_new_tokens}"
        )
    return elapsed


def measure_family_tokens_per_s(
    model,
    exit_layers: Sequence[int],
    prompt_ids: Sequence[int],
    new_tokens: int = 32,
    warmup: int = 1,
    repeats: int = 3,
    pad_id: int = 0,
) -> dict[int, dict[str, Any]]:
    """Greedy decoding speed of several members, measured side by side (interleaved runs).

    Args:
        model: a `FamilialForCausalLM`.
        exit_layers: the members to time.
        prompt_ids: the prompt (one sequence of token ids; batch 1).
        new_tokens: tokens decoded per run (exactly; no early stop).
        warmup: untimed runs per member before timing.
        repeats: timed runs per member (round-robin over members).
        pad_id: pad token id passed to `generate` (silences its warning; no padding at batch 1).

    Returns:
        `{exit_layer: {"tokens_per_s": median, "ms_per_token": 1000/median, "runs_s": [seconds...],
        "new_tokens": n, "prompt_tokens": T}}`.
    """
    import torch
    from transformers import GenerationConfig

    if new_tokens < 1 or repeats < 1 or warmup < 0:
        raise ValueError(
            f"need new_tokens >= 1, repeats >= 1, warmup >= 0 (got {new_tokens}, {repeats}, {warmup})"
        )
    if not prompt_ids:
        raise ValueError("the speed prompt has no tokens")
    input_ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=model.device)
    gen_config = GenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=None,
        pad_token_id=pad_id,
    )
    was_training = model.training
    model.eval()
    runs: dict[int, list[float]] = {int(d): [] for d in exit_layers}
    try:
        for d in runs:
            for _ in range(warmup):
                _time_decode(model, d, input_ids, gen_config)
        for _ in range(repeats):
            for d in runs:
                runs[d].append(_time_decode(model, d, input_ids, gen_config))
    finally:
        model.train(was_training)
    out = {}
    for d, seconds in runs.items():
        median_s = statistics.median(seconds)
        tps = new_tokens / median_s
        out[d] = {
            "tokens_per_s": tps,
            "ms_per_token": 1000.0 / tps,
            "runs_s": seconds,
            "new_tokens": new_tokens,
            "prompt_tokens": len(prompt_ids),
        }
    return out


def measure_tokens_per_s(
    model,
    exit_layer: int,
    prompt_ids: Sequence[int],
    new_tokens: int = 32,
    warmup: int = 1,
    repeats: int = 3,
    pad_id: int = 0,
) -> float:
    """Greedy decoding speed (tokens/s, median of `repeats`) of one member; docs/choices.md#decoding."""
    return measure_family_tokens_per_s(model, [exit_layer], prompt_ids, new_tokens, warmup, repeats, pad_id)[
        int(exit_layer)
    ]["tokens_per_s"]
