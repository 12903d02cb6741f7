"""Stage `evaluate`: quality, speed and size of every member of one family checkpoint.

Command line:
    python -m tasks.evaluate [--params params.yaml] [--set evaluate.checkpoint=artifacts/sft] [--set ...]
    (or `ruyi stage evaluate ...`)

Reads:
    <checkpoint>                      a family (save_family) directory; `evaluate.checkpoint`, default
                                      <artifacts_dir>/compress
    data/validated/corpus_val.jsonl   held-out text ({"text"})
    data/validated/eval.jsonl         held-out math problems ({"question", "solution", "answer", "level"})
Writes:
    metrics/eval.json          per exit `exit_<d>`: loss, perplexity, solution_loss, solution_perplexity,
                               accuracy, answered, accuracy_by_level, params, layers, tokens_per_s,
                               ms_per_token (what the issue asks for in one file)
    metrics/eval_quality.json  the same without the timings: bitwise reproducible on CPU, the file
                               `dvc repro` audits compare
    metrics/eval_speed.json    the timings alone (runs, median, threads): measured, not reproducible
    reports/evaluate/generations.jsonl  every greedy completion with its extracted and gold answer
    plots/evaluate/tradeoff.png + tradeoff.csv  accuracy and loss against ms/token per exit

Definitions and design choices:
- Held-out loss: token-mean next-token cross-entropy of member d on `loss_batches` x `batch_size`
  blocks of `seq_len` tokens, packed in file order from corpus_val (each document followed by
  `<|endoftext|>`, the remainder dropped; no randomness, so the numbers are reproducible). perplexity =
  exp(loss). Fewer blocks than asked is logged and reported (`loss_tokens`), zero is an error.
- Solution loss: the same cross-entropy on the assistant turn only (solution + `<|im_end|>\\n`) of the
  first `num_problems` eval rows under the chat template (prompt tokens masked, truncated to `seq_len`).
- Accuracy: greedy decoding (tasks/decoding.py: left-padded batches of `batch_size`, stop at
  `<|im_end|>`, at most `max_new_tokens`) of the first `num_problems` questions, scored with
  `tasks.mathgen.extract_answer` + `answers_match` (exact numeric match of the `#### <answer>` line).
  `answered` is the share of completions with an extractable answer.
- Speed: tokens/s of greedy decoding at batch 1 with the KV cache, exactly `speed_new_tokens` new
  tokens after `speed_warmup` untimed runs, median of `speed_repeats` runs interleaved across the exits
  (side by side in one process; see tasks/decoding.py). ms_per_token = 1000 / tokens_per_s.
- Params: member d as a standalone model: token embedding + its decoder layers (backbone part, branch,
  DaE blocks) + its norm + its head; low-rank matrices count their two factors.
- Timings appear in eval.json (the issue's contract) and in eval_speed.json; eval_quality.json holds
  everything else so that a reproduction can be compared bit for bit.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tasks.common import (
    StageError,
    atomic_file,
    load_family,
    plots_dir,
    read_jsonl,
    seed_everything,
    stage_dir,
    stage_main,
    write_jsonl,
    write_metrics,
)
from tasks.params import Params

log = logging.getLogger("ruyi.evaluate")

IGNORE_INDEX = -100


# --- data helpers (also used by tasks.compress) -------------------------------------------------
def validated_path(params: Params, name: str) -> Path:
    """A file of the validated data set (`<data_dir>/validated/<name>`)."""
    return Path(params.paths.data_dir) / "validated" / name


def pack_blocks(tokenizer, texts: Sequence[str], seq_len: int, max_blocks: int):
    """Packs documents into consecutive fixed-length blocks (no padding), in order.

    Each document's tokens are followed by the eos token (`<|endoftext|>`, the document separator); the
    stream is cut into `seq_len`-token blocks and the incomplete remainder is dropped.

    Args:
        tokenizer: the family's tokenizer.
        texts: documents, in the order they are packed.
        seq_len: tokens per block.
        max_blocks: stop after this many blocks.

    Returns:
        LongTensor N x seq_len with N <= max_blocks (N = 0 when the text is too short).
    """
    import torch

    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token (<|endoftext|>) to separate packed documents")
    stream: list[int] = []
    need = seq_len * max_blocks
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        stream.append(tokenizer.eos_token_id)
        if len(stream) >= need:
            break
    n = min(len(stream) // seq_len, max_blocks)
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def chat_example(tokenizer, prompt: str, response: str, max_len: int) -> tuple[list[int], list[int]]:
    """Token ids and labels of one user/assistant exchange under the chat template.

    The prompt part (`<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n`) is masked with
    -100; the assistant part (`{response}<|im_end|>\\n`) is the target. Prompt and response are
    tokenized separately so the boundary is exact. Truncated to `max_len` tokens.

    Returns:
        (input_ids, labels), two lists of equal length <= max_len.
    """
    user = {"role": "user", "content": prompt}
    prompt_text = tokenizer.apply_chat_template([user], add_generation_prompt=True, tokenize=False)
    full_text = tokenizer.apply_chat_template([user, {"role": "assistant", "content": response}], tokenize=False)
    if not full_text.startswith(prompt_text):
        raise ValueError("the tokenizer's chat template does not extend the generation prompt with the answer")
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
    ids = (prompt_ids + response_ids)[:max_len]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_len]
    return ids, labels


def chat_examples(tokenizer, rows: Sequence[dict[str, Any]], prompt_key: str, response_key: str, max_len: int,
                  path: str | Path) -> list[tuple[list[int], list[int]]]:
    """`chat_example` of every row; a row whose answer is cut off entirely by `max_len` is an error
    naming the file and row (a loss over fewer examples than asked would be silently different)."""
    out = []
    for i, row in enumerate(rows, 1):
        ids, labels = chat_example(tokenizer, str(row[prompt_key]), str(row[response_key]), max_len)
        if all(x == IGNORE_INDEX for x in labels[1:]):
            raise StageError(f"{path}: row {i}: the prompt alone fills the {max_len}-token window (seq_len); "
                             "raise seq_len")
        out.append((ids, labels))
    return out


def collate_chat(examples: Sequence[tuple[list[int], list[int]]], pad_id: int):
    """Right-pads chat examples into (input_ids, attention_mask, labels), each B x T_max."""
    import torch

    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, lab) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        labels[row, : len(lab)] = torch.tensor(lab)
    return input_ids, attention_mask, labels


def _sum_token_ce(model, exit_layer: int, input_ids, attention_mask, labels) -> tuple[float, int]:
    """Sum of next-token cross-entropy over the positions whose (shifted) label is not -100."""
    import torch

    logits = model(input_ids=input_ids, attention_mask=attention_mask, exit_layer=exit_layer,
                   use_cache=False).logits
    targets = labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                           targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    return float(ce), int((targets != IGNORE_INDEX).sum())


def member_loss(model, exit_layer: int, batches) -> tuple[float, int]:
    """Token-mean next-token cross-entropy of member `exit_layer` over `batches`.

    Args:
        model: a `FamilialForCausalLM`.
        exit_layer: the member.
        batches: iterable of (input_ids B x T, attention_mask B x T or None, labels B x T).

    Returns:
        (mean loss over all target tokens, number of target tokens).
    """
    import torch

    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for input_ids, attention_mask, labels in batches:
                s, n = _sum_token_ce(model, exit_layer, input_ids, attention_mask, labels)
                total += s
                count += n
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("no target tokens to compute a loss on")
    return total / count, count


def block_batches(blocks, batch_size: int):
    """(input_ids, None, labels=input_ids) batches of packed blocks (N x T)."""
    return [(b, None, b) for b in blocks.split(batch_size)]


def chat_batches(examples: Sequence[tuple[list[int], list[int]]], batch_size: int, pad_id: int):
    """Right-padded (input_ids, attention_mask, labels) batches of chat examples."""
    return [collate_chat(examples[k:k + batch_size], pad_id) for k in range(0, len(examples), batch_size)]


def member_params(model, exit_layer: int) -> int:
    """Parameters of member `exit_layer` as a standalone model (embedding + layers + norm + head)."""
    modules = [model.get_input_embeddings(), *model.member_layers(exit_layer),
               model.exits[str(exit_layer)].norm, model.exit_head(exit_layer)]
    return sum(p.numel() for module in modules for p in module.parameters())


def check_chat_tokenizer(tokenizer, where: str | Path) -> None:
    """The tokenizer must have a chat template, a pad token and `<|im_end|>` (errors name `where`)."""
    if not getattr(tokenizer, "chat_template", None):
        raise StageError(f"{where}: the tokenizer has no chat template (build it with the tokenizer stage)")
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise StageError(f"{where}: the tokenizer needs <|pad|> and <|endoftext|> tokens")
    if tokenizer.convert_tokens_to_ids("<|im_end|>") in (None, tokenizer.unk_token_id):
        raise StageError(f"{where}: the tokenizer has no <|im_end|> token")


def corpus_blocks(path: Path, tokenizer, seq_len: int, max_blocks: int):
    """Packed blocks of a validated corpus file; an error names the file when not one block fits."""
    rows = read_jsonl(path, required=("text",))
    blocks = pack_blocks(tokenizer, [str(r["text"]) for r in rows], seq_len, max_blocks)
    if blocks.shape[0] == 0:
        raise StageError(f"{path}: too little text for one {seq_len}-token block")
    if blocks.shape[0] < max_blocks:
        log.warning("%s: only %d of the %d requested %d-token blocks", path, blocks.shape[0],
                    max_blocks, seq_len)
    return blocks


def check_seq_len(model, seq_len: int, key: str) -> None:
    if seq_len > model.config.max_position_embeddings:
        raise StageError(f"{key}={seq_len} exceeds the model's max_position_embeddings="
                         f"{model.config.max_position_embeddings}")


# --- the stage -------------------------------------------------------------------------------
def evaluate_family(model, tokenizer, corpus, problems: list[dict[str, Any]], cfg,
                    eval_file: str | Path = "eval.jsonl") -> tuple[dict, list[dict]]:
    """Quality and size of every member (no timings).

    Args:
        model: a `FamilialForCausalLM`.
        tokenizer: its tokenizer.
        corpus: LongTensor N x T of packed held-out blocks.
        problems: eval rows ({"id", "question", "solution", "answer", "level"}).
        cfg: `EvaluateParams`.
        eval_file: where `problems` come from (named in errors).

    Returns:
        ({"exit_<d>": metrics}, generation rows).
    """
    from tasks.decoding import greedy_generate
    from tasks.mathgen import answers_match, extract_answer

    examples = chat_examples(tokenizer, problems, "question", "solution", cfg.seq_len, eval_file)
    results, generations = {}, []
    for d in model.config.exit_layers:
        loss, loss_tokens = member_loss(model, d, block_batches(corpus, cfg.batch_size))
        sol_loss, sol_tokens = member_loss(model, d, chat_batches(examples, cfg.batch_size, tokenizer.pad_token_id))
        completions = greedy_generate(model, tokenizer, [str(p["question"]) for p in problems], d,
                                      cfg.max_new_tokens, batch_size=cfg.batch_size, progress=f"decode exit {d}")
        correct, answered, by_level = 0, 0, {}
        for p, text in zip(problems, completions):
            pred = extract_answer(text)
            ok = answers_match(pred, str(p["answer"]))
            correct += ok
            answered += pred is not None
            level = by_level.setdefault(str(p.get("level", "?")), [0, 0])
            level[0] += ok
            level[1] += 1
            generations.append({"id": p["id"], "exit": d, "level": p.get("level"), "answer": str(p["answer"]),
                                "predicted": pred, "correct": ok, "completion": text})
        results[f"exit_{d}"] = {
            "loss": loss, "perplexity": math.exp(loss), "loss_tokens": loss_tokens,
            "solution_loss": sol_loss, "solution_perplexity": math.exp(sol_loss), "solution_tokens": sol_tokens,
            "accuracy": correct / len(problems), "answered": answered / len(problems),
            "accuracy_by_level": {k: c / n for k, (c, n) in sorted(by_level.items())},
            "params": member_params(model, d), "layers": len(model.member_layers(d)),
        }
        log.info("exit %d: loss %.4f, solution loss %.4f, accuracy %.3f (%d params)", d, loss, sol_loss,
                 correct / len(problems), results[f"exit_{d}"]["params"])
    return results, generations


def plot_tradeoff(rows: list[dict[str, Any]], out_dir: Path) -> None:
    """plots/evaluate/tradeoff.png (accuracy and loss vs ms/token per exit) and tradeoff.csv."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fields = ["exit", "params", "ms_per_token", "tokens_per_s", "accuracy", "loss", "solution_loss"]
    with atomic_file(out_dir / "tradeoff.csv") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in fields})

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    x = [r["ms_per_token"] for r in rows]
    for ax, key, label in ((axes[0], "accuracy", "math accuracy (exact match)"),
                           (axes[1], "loss", "held-out loss (corpus_val)")):
        ax.plot(x, [r[key] for r in rows], "o-")
        for r in rows:
            ax.annotate(f"exit {r['exit']}\n{r['params'] / 1e6:.2f}M", (r["ms_per_token"], r[key]),
                        textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set_xlabel("latency (ms/token, batch 1, greedy)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle("Family trade-off: quality vs decoding latency per exit")
    fig.tight_layout()
    png = out_dir / "tradeoff.png"
    tmp_png = out_dir / ".tradeoff.tmp.png"
    fig.savefig(tmp_png, dpi=100)
    plt.close(fig)
    tmp_png.replace(png)


def run(params: Params) -> dict:
    """Evaluates every exit of `evaluate.checkpoint`; returns the content of metrics/eval.json."""
    import torch

    from tasks.decoding import encode_prompts, measure_family_tokens_per_s

    cfg = params.evaluate
    seed_everything(params.seed)
    checkpoint = Path(cfg.checkpoint) if cfg.checkpoint else stage_dir(params, "compress")
    model, tokenizer = load_family(checkpoint)
    model.eval()
    check_chat_tokenizer(tokenizer, checkpoint)
    check_seq_len(model, cfg.seq_len, "evaluate.seq_len")

    corpus = corpus_blocks(validated_path(params, "corpus_val.jsonl"), tokenizer, cfg.seq_len,
                           cfg.loss_batches * cfg.batch_size)
    eval_file = validated_path(params, "eval.jsonl")
    problems = read_jsonl(eval_file, required=("id", "question", "solution", "answer"))[: cfg.num_problems]
    if len(problems) < cfg.num_problems:
        log.warning("%s has only %d problems (evaluate.num_problems=%d)", eval_file, len(problems), cfg.num_problems)

    quality, generations = evaluate_family(model, tokenizer, corpus, problems, cfg, eval_file)
    exits = list(model.config.exit_layers)
    common = {"checkpoint": str(checkpoint), "exits": exits, "num_problems": len(problems)}
    quality = {**common, **quality}

    speed_prompt = encode_prompts(tokenizer, [str(problems[0]["question"])])[0]
    speed = measure_family_tokens_per_s(model, exits, speed_prompt, cfg.speed_new_tokens, warmup=cfg.speed_warmup,
                                        repeats=cfg.speed_repeats, pad_id=tokenizer.pad_token_id)
    speed_metrics = {**common, "torch_threads": torch.get_num_threads(), "device": "cpu",
                     **{f"exit_{d}": speed[d] for d in exits}}
    for d in exits:
        log.info("exit %d: %.1f tokens/s (%.2f ms/token)", d, speed[d]["tokens_per_s"], speed[d]["ms_per_token"])

    metrics = {**quality, **{f"exit_{d}": {**quality[f"exit_{d}"],
                                           "tokens_per_s": speed[d]["tokens_per_s"],
                                           "ms_per_token": speed[d]["ms_per_token"]} for d in exits}}
    write_metrics(params, "eval_quality", quality)
    write_metrics(params, "eval_speed", speed_metrics)
    write_metrics(params, "eval", metrics)
    write_jsonl(Path(params.paths.reports_dir) / "evaluate" / "generations.jsonl", generations)
    rows = [{"exit": d, **metrics[f"exit_{d}"]} for d in exits]
    plot_tradeoff(rows, plots_dir(params, "evaluate"))
    return metrics


def main(argv: list[str] | None = None) -> int:
    return stage_main("evaluate", __doc__, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
