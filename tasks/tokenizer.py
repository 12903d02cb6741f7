"""tokenizer: trains the family's byte-level BPE tokenizer on the validated data.

    python -m tasks.tokenizer [--params params.yaml] [--set tokenizer.vocab_size=4096 ...]
    ruyi stage tokenizer ...

Reads `data/validated/corpus_train.jsonl` (text) and `data/validated/sft.jsonl` (prompt, response),
trains `ruyi_model.tokenizer.train_tokenizer` with `tokenizer.vocab_size` / `tokenizer.min_frequency`
(byte-level BPE, Qwen2 split regex with single digits, special tokens <|endoftext|> <|pad|>
<|im_start|> <|im_end|> at ids 0..3, Qwen-style chat template; see that module for the design), and
writes `artifacts/tokenizer/` atomically (tokenizer.json, tokenizer_config.json, chat_template.jinja).

Before publishing, the saved directory is reloaded with `AutoTokenizer` (offline) and checked:
special-token ids, eos/pad, chat template, and exact round-trip of every validation document and
SFT pair (byte-level BPE must reproduce any text; a mismatch is a StageError).

Metrics (`metrics/tokenizer.json`): vocabulary size, merges, tokens per document and characters per
token on the training corpus and on the held-out `corpus_val.jsonl`, and the token length of the
SFT chat sequences (mean, p95, max; the sequence length of SFT should cover them).
Plot: `plots/tokenizer/sft_chat_tokens.png` + `.csv` (histogram of SFT chat sequence lengths).

Training text: the corpus documents first, then each SFT prompt and response as separate texts
(the chat special tokens are added as whole tokens, never learnt). The validation corpus is not
trained on, so its compression is an honest held-out figure.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tasks.common import (
    StageError,
    atomic_dir,
    atomic_file,
    log,
    plots_dir,
    read_jsonl,
    stage_dir,
    stage_main,
    write_metrics,
)
from tasks.params import Params


def _validated(params: Params, name: str) -> Path:
    path = Path(params.paths.data_dir) / "validated" / name
    if not path.is_file():
        raise StageError(f"{path} not found: run prepare_data and validate_data first")
    return path


def _chat_lengths(tokenizer, sft: list[dict[str, Any]]) -> list[int]:
    """Token count of each SFT pair rendered with the chat template (what SFT trains on)."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]},
                                            {"role": "assistant", "content": row["response"]}], tokenize=False)
             for row in sft]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _percentile(values: list[int], q: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _compression(tokenizer, texts: list[str]) -> dict[str, float]:
    counts = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    chars = sum(len(t) for t in texts)
    return {"docs": len(texts), "mean_tokens_per_doc": round(sum(counts) / len(counts), 2),
            "chars_per_token": round(chars / max(1, sum(counts)), 4), "tokens": sum(counts)}


def _check_round_trip(tokenizer, texts: list[str], where: str) -> None:
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    decoded = tokenizer.batch_decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    for index, (text, back) in enumerate(zip(texts, decoded)):
        if back != text:
            raise StageError(f"tokenizer does not round-trip {where} item {index}: {text[:80]!r} -> {back[:80]!r}")


def _plot(params: Params, lengths: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = plots_dir(params, "tokenizer")
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
    fig.savefig(out / "sft_chat_tokens.png", dpi=80)
    plt.close(fig)


def run(params: Params) -> dict[str, Any]:
    corpus = read_jsonl(_validated(params, "corpus_train.jsonl"), required=("text",))
    val = read_jsonl(_validated(params, "corpus_val.jsonl"), required=("text",))
    sft = read_jsonl(_validated(params, "sft.jsonl"), required=("prompt", "response"))
    texts = [r["text"] for r in corpus] + [t for r in sft for t in (r["prompt"], r["response"])]
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise StageError(f"training text {bad} is not a string ({type(texts[bad]).__name__}): check the validated data")
    from ruyi_model.tokenizer import (  # heavy (transformers): after input checks
        load_tokenizer,
        train_tokenizer,
    )

    log.info("training a byte-level BPE of %d tokens on %d texts (%d characters)",
             params.tokenizer.vocab_size, len(texts), sum(map(len, texts)))
    try:
        tokenizer = train_tokenizer(texts, params.tokenizer.vocab_size, params.tokenizer.min_frequency)
    except ValueError as e:
        raise StageError(f"tokenizer training failed: {e}") from None

    out = stage_dir(params, "tokenizer")
    with atomic_dir(out) as tmp:
        tokenizer.save_pretrained(tmp)
        try:
            loaded = load_tokenizer(tmp)  # what every later stage will get from AutoTokenizer
        except ValueError as e:
            raise StageError(f"the saved tokenizer does not load correctly: {e}") from None
        _check_round_trip(loaded, [r["text"] for r in val], "corpus_val.jsonl")
        _check_round_trip(loaded, [t for r in sft for t in (r["prompt"], r["response"])], "sft.jsonl")
        vocab = json.loads((tmp / "tokenizer.json").read_text())["model"]
        lengths = _chat_lengths(loaded, sft)

    metrics = {
        "vocab_size": len(loaded),
        "merges": len(vocab["merges"]),
        "train": _compression(loaded, [r["text"] for r in corpus]),
        "val": _compression(loaded, [r["text"] for r in val]),
        "sft_chat_tokens": {"mean": round(sum(lengths) / len(lengths), 2), "p95": _percentile(lengths, 0.95),
                            "max": max(lengths), "over_seq_len": sum(1 for n in lengths if n > params.sft.seq_len)},
    }
    if metrics["vocab_size"] < params.tokenizer.vocab_size:
        log.warning("the tokenizer has %d tokens, fewer than tokenizer.vocab_size=%d: the text has too few "
                    "pairs occurring >= %d times", metrics["vocab_size"], params.tokenizer.vocab_size,
                    params.tokenizer.min_frequency)
    _plot(params, lengths)
    write_metrics(params, "tokenizer", metrics)
    log.info("tokenizer: %s", metrics)
    return metrics


def main(argv: list[str] | None = None) -> int:
    return stage_main("tokenizer", __doc__, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
