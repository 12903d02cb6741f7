"""Stage `evaluate`: quality, speed and size of every member of one family checkpoint.

    python -m tasks.evaluate [--params params.yaml] [--set evaluate.checkpoint=artifacts/sft] [--set ...]

Reads the checkpoint (`evaluate.checkpoint`, default `artifacts/compress/`), `data/validated/corpus_val.jsonl`
and `eval.jsonl`. Writes per exit loss, perplexity, solution loss, accuracy, params and speed (and
`ln_vocab`, a uniform model's loss, for the gates) to
`metrics/eval.json`, the reproducible part to `metrics/eval_quality.json` and the timings to
`metrics/eval_speed.json` (one set, one `run_id`), `reports/evaluate/generations.jsonl`, the per-item
results the gates resample (`reports/evaluate/items.jsonl`: each corpus block's loss and each problem's
verdict, per exit) and `plots/evaluate/tradeoff.{png,csv}`. Definitions and choices: docs/choices.md#evaluate.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import uuid
from pathlib import Path
from typing import Any

from tasks.core.artifacts import load_family
from tasks.core.files import atomic_file, pyplot, read_jsonl, save_figure, write_jsonl
from tasks.core.params import Params
from tasks.core.paths import Workspace
from tasks.core.stage import StageError, seed_everything, stage_main
from tasks.training.batches import read_corpus
from tasks.training.heldout import (
    check_family_inputs,
    first_blocks,
    member_losses,
    member_params,
    member_row_losses,
    solution_examples,
    target_tokens,
)

log = logging.getLogger("ruyi.evaluate")


# --- the stage -------------------------------------------------------------------------------
def evaluate_family(
    model, tokenizer, corpus, problems: list[dict[str, Any]], cfg, eval_file: str | Path = "eval.jsonl"
) -> tuple[dict, list[dict], list[dict]]:
    """Quality and size of every member (no timings).

    Args:
        model: a `FamilialForCausalLM`.
        tokenizer: its tokenizer.
        corpus: LongTensor N x T of packed held-out blocks.
        problems: eval rows ({"id", "question", "solution", "answer", "level"}).
        cfg: `EvaluateParams`.
        eval_file: where `problems` come from (named in errors).

    Returns:
        ({"exit_<d>": metrics}, generation rows, per-item rows (`data_contracts.items.item_row`: the
        loss of every corpus block and the verdict on every problem, per exit)).
    """
    from data_contracts.items import item_row
    from ruyi_model.decoding import greedy_generate
    from tasks.data.mathgen import answers_match, extract_answer
    from tasks.training.batches import fixed_batches

    exits = list(model.config.exit_layers)
    corpus_batches = fixed_batches({"input_ids": corpus}, cfg.batch_size, cfg.loss_batches)
    solutions = solution_examples(tokenizer, problems, cfg.seq_len, eval_file)
    solution_batches = fixed_batches(solutions, cfg.batch_size, len(problems))
    losses, block_losses = member_row_losses(model, exits, corpus_batches)
    solution_losses = member_losses(model, exits, solution_batches)
    results, generations, items = {}, [], []
    for d in exits:
        items += [
            item_row("loss", f"corpus_val block {i}", d, loss_sum=s, tokens=n)
            for i, (s, n) in enumerate(block_losses[d])
        ]
    for d in exits:
        completions = greedy_generate(
            model,
            tokenizer,
            [str(p["question"]) for p in problems],
            d,
            cfg.max_new_tokens,
            batch_size=cfg.decode_batch_size,
            progress=f"decode exit {d}",
        )
        correct, answered, by_level = 0, 0, {}
        for row, (p, text) in enumerate(zip(problems, completions), 1):
            pred = extract_answer(text)
            try:
                ok = answers_match(pred, str(p["answer"]))
            except ValueError as e:
                raise StageError(f"{eval_file}: row {row} (id={p['id']!r}): {e}") from None
            correct += ok
            answered += pred is not None
            level = by_level.setdefault(str(p.get("level", "?")), [0, 0])
            level[0] += ok
            level[1] += 1
            items.append(item_row("accuracy", p["id"], d, correct=bool(ok)))
            generations.append(
                {
                    "id": p["id"],
                    "exit": d,
                    "level": p.get("level"),
                    "answer": str(p["answer"]),
                    "predicted": pred,
                    "correct": ok,
                    "completion": text,
                }
            )
        loss, sol_loss = losses[d], solution_losses[d]
        results[f"exit_{d}"] = {
            "loss": loss,
            "perplexity": math.exp(loss),
            "loss_tokens": target_tokens(corpus_batches),
            "solution_loss": sol_loss,
            "solution_perplexity": math.exp(sol_loss),
            "solution_tokens": target_tokens(solution_batches),
            "accuracy": correct / len(problems),
            "answered": answered / len(problems),
            "accuracy_by_level": {k: c / n for k, (c, n) in sorted(by_level.items())},
            "params": member_params(model, d),
            "layers": len(model.member_layers(d)),
        }
        log.info(
            "exit %d: loss %.4f, solution loss %.4f, accuracy %.3f (%d params)",
            d,
            loss,
            sol_loss,
            correct / len(problems),
            results[f"exit_{d}"]["params"],
        )
    return results, generations, items


def plot_tradeoff(rows: list[dict[str, Any]], out_dir: Path) -> None:
    """plots/evaluate/tradeoff.png (accuracy and loss vs ms/token per exit) and tradeoff.csv."""
    import csv

    plt = pyplot()

    fields = ["exit", "params", "ms_per_token", "tokens_per_s", "accuracy", "loss", "solution_loss"]
    with atomic_file(out_dir / "tradeoff.csv") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in fields})

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    x = [r["ms_per_token"] for r in rows]
    for ax, key, label in (
        (axes[0], "accuracy", "math accuracy (exact match)"),
        (axes[1], "loss", "held-out loss (corpus_val)"),
    ):
        ax.plot(x, [r[key] for r in rows], "o--", lw=0.8)  # in exit order
        for r in rows:
            ax.annotate(
                f"exit {r['exit']}\n{r['params'] / 1e6:.2f}M",
                (r["ms_per_token"], r[key]),
                textcoords="offset points",
                xytext=(5, 5),
                fontsize=8,
            )
        ax.set_xlabel("latency (ms/token, batch 1, greedy)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle("Family trade-off: quality vs decoding latency per exit")
    fig.tight_layout()
    save_figure(fig, out_dir / "tradeoff.png")


METRIC_SET = ("eval_quality.json", "eval_speed.json", "eval.json")  # in the order they are put in place


def _dump(obj: dict) -> str:
    from tasks.core.files import _json_default

    return json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n"


def write_metric_set(metrics_dir: Path, quality: dict, speed: dict, combined: dict) -> str:
    """Writes eval_quality.json, eval_speed.json and eval.json as one set (see docs/choices.md#evaluate);
    returns the set's run_id."""
    run_id = hashlib.sha256(_dump(quality).encode()).hexdigest()[:16]
    texts = [_dump({**obj, "run_id": run_id}) for obj in (quality, speed, combined)]
    metrics_dir.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmps = [metrics_dir / f".{name}.tmp-{tag}" for name in METRIC_SET]
    try:
        for tmp, text in zip(tmps, texts):
            with open(tmp, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        (metrics_dir / "eval.json").unlink(missing_ok=True)  # from here on, no eval.json of another run
        for tmp, name in zip(tmps, METRIC_SET):
            os.replace(tmp, metrics_dir / name)  # eval.json last
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
    return run_id


def metric_set_consistent(metrics_dir: str | Path) -> bool:
    """True when eval_quality.json, eval_speed.json and eval.json are all present and from one run."""
    ids = set()
    for name in METRIC_SET:
        path = Path(metrics_dir) / name
        try:
            ids.add(json.loads(path.read_text()).get("run_id"))
        except (OSError, ValueError, AttributeError):
            return False
    return len(ids) == 1 and None not in ids


def run(params: Params) -> dict:
    """Evaluates every exit of `evaluate.checkpoint`; returns the content of metrics/eval.json."""
    import torch

    from ruyi_model.decoding import encode_prompts, measure_family_tokens_per_s
    from tasks.training.members import device_for_training

    cfg, ws = params.evaluate, Workspace.from_params(params)
    seed_everything(params.seed)
    checkpoint = Path(cfg.checkpoint) if cfg.checkpoint else ws.artifacts("compress")
    model, tokenizer = load_family(checkpoint)
    model.to(device_for_training()).eval()
    check_family_inputs(model, tokenizer, checkpoint, cfg.seq_len, "evaluate.seq_len")

    val_file = ws.corpus_val
    corpus = first_blocks(
        tokenizer,
        [r["text"] for r in read_corpus(val_file)],
        cfg.seq_len,
        cfg.loss_batches * cfg.batch_size,
        val_file,
    )
    eval_file = ws.eval_data
    problems = read_jsonl(eval_file, required=("id", "question", "solution", "answer"))[: cfg.num_problems]
    if len(problems) < cfg.num_problems:
        log.warning(
            "%s has only %d problems (evaluate.num_problems=%d)", eval_file, len(problems), cfg.num_problems
        )

    quality, generations, items = evaluate_family(model, tokenizer, corpus, problems, cfg, eval_file)
    exits = list(model.config.exit_layers)
    common = {
        "checkpoint": str(checkpoint),
        "exits": exits,
        "num_problems": len(problems),
        "vocab_size": model.config.vocab_size,
        "ln_vocab": round(math.log(model.config.vocab_size), 6),
    }
    quality = {**common, **quality}

    speed_prompt = encode_prompts(tokenizer, [str(problems[0]["question"])])[0]
    speed = measure_family_tokens_per_s(
        model,
        exits,
        speed_prompt,
        cfg.speed_new_tokens,
        warmup=cfg.speed_warmup,
        repeats=cfg.speed_repeats,
        pad_id=tokenizer.pad_token_id,
    )
    speed_metrics = {
        **common,
        "torch_threads": torch.get_num_threads(),
        "device": str(model.device),
        **{f"exit_{d}": speed[d] for d in exits},
    }
    for d in exits:
        log.info(
            "exit %d: %.1f tokens/s (%.2f ms/token)", d, speed[d]["tokens_per_s"], speed[d]["ms_per_token"]
        )

    metrics = {
        **quality,
        **{
            f"exit_{d}": {
                **quality[f"exit_{d}"],
                "tokens_per_s": speed[d]["tokens_per_s"],
                "ms_per_token": speed[d]["ms_per_token"],
            }
            for d in exits
        },
    }
    metrics["run_id"] = write_metric_set(ws.metrics_dir, quality, speed_metrics, metrics)
    write_jsonl(ws.eval_generations, generations)
    write_jsonl(ws.eval_items, items)
    rows = [{"exit": d, **metrics[f"exit_{d}"]} for d in exits]
    plot_tradeoff(rows, ws.plots("evaluate"))
    return metrics


def main(argv: list[str] | None = None) -> int:
    return stage_main("evaluate", __doc__, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
