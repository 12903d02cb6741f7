"""Stage `tokenizer`: trains the family's byte-level BPE tokenizer, or adopts the one of `model.init_from`.

    python -m tasks.tokenizer [--params params.yaml] [--set tokenizer.vocab_size=4096 ...]

Reads `data/validated/corpus_train.jsonl`, `corpus_val.jsonl` and `sft.jsonl`. Writes `artifacts/tokenizer/`
(checked by reloading with `AutoTokenizer` before publishing), `metrics/tokenizer.json` (vocabulary, merges,
characters per token, SFT chat lengths, fingerprint, source) and `plots/tokenizer/`.
Choices: docs/choices.md#tokenizer.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tasks.core.files import atomic_dir, atomic_file, pyplot, read_jsonl, save_figure, write_metrics
from tasks.core.params import Params
from tasks.core.paths import Workspace
from tasks.core.stage import StageError, log, stage_main

#: Share of texts an adopted tokenizer may fail to reproduce exactly (normalization) before it is an error.
MAX_ROUND_TRIP_FAILURES = 0.1


def _validated(params: Params, name: str) -> Path:
    path = Workspace.from_params(params).validated_file(name)
    if not path.is_file():
        raise StageError(f"{path} not found: run prepare_data and validate_data first")
    return path


def _chat_lengths(tokenizer, sft: list[dict[str, Any]]) -> list[int]:
    """Token count of each SFT pair rendered with the chat template (what SFT trains on)."""
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}],
            tokenize=False,
        )
        for row in sft
    ]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _check_chat_contract(tokenizer, row: dict[str, Any], where: str) -> None:
    """What SFT needs of the chat template (tasks/training/ build_sft_examples): the generation prompt
    is a prefix of the rendered conversation and `<|im_end|>` closes the assistant turn."""
    from ruyi_model.tokenizer import IM_END

    user = {"role": "user", "content": row["prompt"]}
    prompt = tokenizer.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(
        [user, {"role": "assistant", "content": row["response"]}], tokenize=False
    )
    if not full.startswith(prompt) or IM_END not in full[len(prompt) :]:
        raise StageError(
            f"the chat template of {where} does not render the generation prompt as a prefix of the "
            f"conversation followed by the response and {IM_END}; SFT cannot mask the prompt "
            f"(rendered: {full[:200]!r})"
        )


def _percentile(values: list[int], q: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _compression(tokenizer, texts: list[str]) -> dict[str, float]:
    counts = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    chars = sum(len(t) for t in texts)
    return {
        "docs": len(texts),
        "mean_tokens_per_doc": round(sum(counts) / len(counts), 2),
        "chars_per_token": round(chars / max(1, sum(counts)), 4),
        "tokens": sum(counts),
    }


def _check_round_trip(tokenizer, texts: list[str], where: str, strict: bool = True) -> int:
    """Encodes and decodes `texts`; a difference is an error (`strict`) or counted and warned (adopted
    tokenizers, which may normalize). Returns the number of texts that did not round-trip."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    decoded = tokenizer.batch_decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    failures = [(i, t, b) for i, (t, b) in enumerate(zip(texts, decoded)) if b != t]
    if failures and strict:
        index, text, back = failures[0]
        raise StageError(
            f"tokenizer does not round-trip {where} item {index}: {text[:80]!r} -> {back[:80]!r}"
        )
    if len(failures) > MAX_ROUND_TRIP_FAILURES * len(texts):
        index, text, back = failures[0]
        raise StageError(
            f"the adopted tokenizer does not reproduce {len(failures)} of {len(texts)} {where} items "
            f"(more than {MAX_ROUND_TRIP_FAILURES:.0%}: more than normalization): first item {index} "
            f"{text[:80]!r} -> {back[:80]!r}"
        )
    if failures:
        index, text, back = failures[0]
        log.warning(
            "the adopted tokenizer does not reproduce %d of %d %s items exactly (it normalizes text); "
            "first: item %d %r -> %r",
            len(failures),
            len(texts),
            where,
            index,
            text[:80],
            back[:80],
        )
    return len(failures)


def _plot(params: Params, lengths: list[int]) -> None:
    plt = pyplot()

    out = Workspace.from_params(params).plots("tokenizer")
    width = max(8, (max(lengths) // 30 + 7) // 8 * 8)
    edges = list(range(0, max(lengths) + width, width))
    counts = [sum(1 for n in lengths if lo <= n < lo + width) for lo in edges]
    with atomic_file(out / "sft_chat_tokens.csv") as f:
        f.write("tokens,sequences\n" + "".join(f"{lo},{c}\n" for lo, c in zip(edges, counts)))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(edges, counts, width=width * 0.9, align="edge")
    ax.axvline(params.sft.seq_len, color="red", linestyle="--", label=f"sft.seq_len = {params.sft.seq_len}")
    ax.set(xlabel="tokens per SFT chat sequence", ylabel="sequences", title="SFT chat sequence lengths")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, out / "sft_chat_tokens.png", dpi=80)


def run(params: Params) -> dict[str, Any]:
    corpus = read_jsonl(_validated(params, "corpus_train.jsonl"), required=("text",))
    val = read_jsonl(_validated(params, "corpus_val.jsonl"), required=("text",))
    sft = read_jsonl(_validated(params, "sft.jsonl"), required=("prompt", "response"))
    texts = [r["text"] for r in corpus] + [t for r in sft for t in (r["prompt"], r["response"])]
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise StageError(
            f"training text {bad} is not a string ({type(texts[bad]).__name__}): check the validated data"
        )
    from ruyi_model.tokenizer import (  # heavy (transformers): after input checks
        adopt_tokenizer,
        load_tokenizer,
        tokenizer_fingerprint,
        train_tokenizer,
    )

    source: dict[str, Any]
    if params.model.init_from:
        log.info(
            "model.init_from=%s: adopting that checkpoint's tokenizer (tokenizer.vocab_size and "
            "min_frequency are not used)",
            params.model.init_from,
        )
        try:
            tokenizer, source = adopt_tokenizer(params.model.init_from)
        except ValueError as e:
            raise StageError(str(e)) from None
        source = {"kind": "init_from", **source}
    else:
        log.info(
            "training a byte-level BPE of %d tokens on %d texts (%d characters)",
            params.tokenizer.vocab_size,
            len(texts),
            sum(map(len, texts)),
        )
        try:
            tokenizer = train_tokenizer(texts, params.tokenizer.vocab_size, params.tokenizer.min_frequency)
        except ValueError as e:
            raise StageError(f"tokenizer training failed: {e}") from None
        source = {"kind": "trained"}
    strict = source["kind"] == "trained"

    out = Workspace.from_params(params).tokenizer
    with atomic_dir(out) as tmp:
        tokenizer.save_pretrained(tmp)
        try:
            loaded = load_tokenizer(tmp)  # what every later stage will get from AutoTokenizer
        except ValueError as e:
            raise StageError(f"the saved tokenizer does not load correctly: {e}") from None
        fingerprint = tokenizer_fingerprint(loaded)
        if fingerprint != tokenizer_fingerprint(tokenizer):
            raise StageError(
                f"the tokenizer saved to {out} reloads as a different tokenizer (fingerprint "
                f"{tokenizer_fingerprint(tokenizer)} -> {fingerprint})"
            )
        failures = _check_round_trip(loaded, [r["text"] for r in val], "corpus_val.jsonl", strict)
        failures += _check_round_trip(
            loaded, [t for r in sft for t in (r["prompt"], r["response"])], "sft.jsonl", strict
        )
        _check_chat_contract(loaded, sft[0], params.model.init_from or "the trained tokenizer")
        vocab = json.loads((tmp / "tokenizer.json").read_text())["model"]
        lengths = _chat_lengths(loaded, sft)

    metrics = {
        "vocab_size": len(loaded),
        "merges": len(vocab.get("merges") or []),
        "fingerprint": fingerprint,
        "source": source,
        "round_trip_failures": failures,
        "train": _compression(loaded, [r["text"] for r in corpus]),
        "val": _compression(loaded, [r["text"] for r in val]),
        "sft_chat_tokens": {
            "mean": round(sum(lengths) / len(lengths), 2),
            "p95": _percentile(lengths, 0.95),
            "max": max(lengths),
            "over_seq_len": sum(1 for n in lengths if n > params.sft.seq_len),
        },
    }
    if strict and metrics["vocab_size"] < params.tokenizer.vocab_size:
        log.warning(
            "the tokenizer has %d tokens, fewer than tokenizer.vocab_size=%d: the text has too few "
            "pairs occurring >= %d times",
            metrics["vocab_size"],
            params.tokenizer.vocab_size,
            params.tokenizer.min_frequency,
        )
    _plot(params, lengths)
    write_metrics(params, "tokenizer", metrics)
    log.info("tokenizer: %s", metrics)
    return metrics


def main(argv: list[str] | None = None) -> int:
    return stage_main("tokenizer", __doc__, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
