"""Dynamic (confidence-based) early exit against the deepest member: tokens/s and accuracy, side by side.

    python benchmarks/experiments/early_exit.py [--checkpoint artifacts/compress]
        [--thresholds 0.5,0.8,0.9,0.95,0.99,0.999] [--num-prompts 100] [--kv-fills recompute,copy]
        [--synthetic]

Model: `--checkpoint`, else `artifacts/compress` or `artifacts/sft`, else a tiny family trained here on
digit-string reversal (said so). Accuracy: exact numeric match on eval.jsonl questions (synthetic: the
reversed string); `agree` = share identical to the deepest member. Columns: tok/s, `x gen`, `x dyn`,
`layers/tok`, `rows/tok`, `exits %`. Method: docs/choices.md#benchmarks; figures: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DIGITS = 10
SEP, END, PAD = 10, 11, 12  # synthetic vocabulary: digits 0-9, '>', '.', pad


# --- synthetic family -------------------------------------------------------------------------
def synthetic_example(rng: random.Random) -> tuple[list[int], list[int]]:
    """Digit reversal: 4-9 random digits and '>' -> the digits reversed and '.'."""
    digits = [rng.randrange(DIGITS) for _ in range(rng.randint(4, 9))]
    return digits + [SEP], digits[::-1] + [END]


def train_synthetic_family(
    steps: int, batch_size: int, hidden: int, seed: int, exits: list[int], lr: float = 3e-3
):
    """A tiny family (L=8, one branch layer per non-deepest member) trained on digit reversal."""
    from tqdm.auto import tqdm

    from ruyi_model import FamilialConfig, FamilialForCausalLM
    from tasks.training.loop import lr_factor

    torch.manual_seed(seed)
    heads = max(2, hidden // 16)
    cfg = FamilialConfig(
        vocab_size=16,
        hidden_size=hidden,
        intermediate_size=int(hidden * 8 / 3) // 4 * 4,
        num_hidden_layers=8,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        head_dim=16,
        max_position_embeddings=64,
        exit_layers=exits,
        exit_branch_layers=1,
        pad_token_id=PAD,
        eos_token_id=END,
        bos_token_id=None,
    )
    model = FamilialForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps // 10, steps, 0.1))
    rng = random.Random(seed)
    model.train()
    bar = tqdm(range(steps), desc="train synthetic family", leave=False)
    for _ in bar:
        rows = [synthetic_example(rng) for _ in range(batch_size)]
        width = max(len(p) + len(r) for p, r in rows)
        ids = torch.full((batch_size, width), PAD, dtype=torch.long)
        labels = torch.full((batch_size, width), -100, dtype=torch.long)
        for i, (p, r) in enumerate(rows):
            ids[i, : len(p) + len(r)] = torch.tensor(p + r)
            labels[i, len(p) : len(p) + len(r)] = torch.tensor(r)  # loss on the answer only
        out = model(ids, labels=labels)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix({f"ce@{d}": f"{v.item():.3f}" for d, v in out.exit_losses.items()})
    final = {d: round(v.item(), 4) for d, v in out.exit_losses.items()}
    return model.eval(), final


# --- workloads ----------------------------------------------------------------------------------
class Workload:
    """Prompts, stop tokens and a scorer for one model."""

    def __init__(self, name: str, prompts: list[list[int]], stop_ids: list[int], pad_id: int, scorer):
        self.name, self.prompts, self.stop_ids, self.pad_id, self.scorer = (
            name,
            prompts,
            stop_ids,
            pad_id,
            scorer,
        )


def synthetic_workload(num_prompts: int, seed: int) -> Workload:
    rng = random.Random(seed + 1_000_003)
    examples = [synthetic_example(rng) for _ in range(num_prompts)]
    targets = [r for _, r in examples]

    def score(i: int, new_ids: list[int]) -> bool | None:
        return new_ids == targets[i]

    return Workload("synthetic digit reversal (exact match)", [p for p, _ in examples], [END], PAD, score)


def pipeline_workload(checkpoint: Path, tokenizer, num_prompts: int, eval_file: Path) -> Workload:
    from ruyi_model.decoding import encode_prompts, stop_token_ids

    stops = stop_token_ids(tokenizer)
    if eval_file.exists():
        from tasks.core.files import read_jsonl
        from tasks.data.mathgen import answers_match, extract_answer

        rows = read_jsonl(eval_file, required=("question", "answer"))[:num_prompts]
        if not rows:
            raise SystemExit(f"{eval_file} has no rows")

        def score(i: int, new_ids: list[int]) -> bool | None:
            text = tokenizer.decode([t for t in new_ids if t not in stops], skip_special_tokens=True)
            return answers_match(extract_answer(text), str(rows[i]["answer"]))

        return Workload(
            f"math exact match on {eval_file}",
            encode_prompts(tokenizer, [str(r["question"]) for r in rows]),
            stops,
            tokenizer.pad_token_id or 0,
            score,
        )
    print(f"note: {eval_file} not found: accuracy = agreement with the deepest member's greedy output")
    prompts = [f"What is {a} + {b}?" for a, b in zip(range(3, 3 + num_prompts), range(11, 11 + num_prompts))]
    return Workload(
        "agreement with the deepest member",
        encode_prompts(tokenizer, prompts),
        stops,
        tokenizer.pad_token_id or 0,
        lambda i, new: None,
    )


# --- measurement --------------------------------------------------------------------------------
def run_generate(
    model, ids: torch.Tensor, d: int, max_new: int, stops: list[int], pad_id: int, temperature: float = 0.0
):
    """Member d's own `generate`: greedy, or (temperature > 0) plain sampling at that temperature with
    top-k and top-p off (torch's global RNG: seed it before the call)."""
    from transformers import GenerationConfig

    sampling = {"temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature else {}
    gen_config = GenerationConfig(
        max_new_tokens=max_new,
        do_sample=bool(temperature),
        num_beams=1,
        eos_token_id=stops,
        pad_token_id=pad_id,
        **sampling,
    )
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, generation_config=gen_config, exit_layer=d)
    seconds = time.perf_counter() - start
    new = out[0, ids.shape[1] :].tolist()
    depth = len(model.member_layers(d))
    # rows: layer-position forwards, the prompt's prefill included (as dynamic_generate counts them)
    return (
        new,
        seconds,
        {"layers": depth * len(new), "rows": depth * (ids.shape[1] + len(new) - 1), "exits": {d: len(new)}},
    )


def run_dynamic(
    model, ids: torch.Tensor, threshold: float, kv_fill: str, criterion: str, max_new: int, stops: list[int]
):
    from ruyi_model.generation import dynamic_generate

    out = dynamic_generate(
        model, ids, max_new, threshold, criterion=criterion, eos_token_id=stops, kv_fill=kv_fill
    )
    new = out.sequences[0, ids.shape[1] :].tolist()
    return (
        new,
        out.seconds,
        {
            "layers": int(out.layers_run.sum()),
            "rows": int(out.layer_rows.sum()),
            "exits": out.tokens_per_member,
        },
    )


@dataclass
class Subject:
    """The model under test, its workload and where it came from (a checkpoint dir or "synthetic")."""

    model: object
    workload: Workload
    source: str


@dataclass
class Config:
    """One decoding configuration: `generate` at member `exit_layer`, or `dynamic` with a threshold."""

    name: str
    kind: str  # "generate" | "dynamic"
    exit_layer: int | None = None
    threshold: float | None = None
    kv_fill: str | None = None

    def run(self, model, ids: torch.Tensor, criterion: str, max_new: int, workload: Workload):
        if self.kind == "generate":
            return run_generate(model, ids, self.exit_layer, max_new, workload.stop_ids, workload.pad_id)
        return run_dynamic(model, ids, self.threshold, self.kv_fill, criterion, max_new, workload.stop_ids)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    thresholds = [float(x) for x in args.thresholds.split(",") if x.strip()]
    kv_fills = [x.strip() for x in args.kv_fills.split(",") if x.strip()]
    subject = load_subject(args)
    cfg = subject.model.config
    never = 2.0 if args.criterion == "max_prob" else None
    configs = build_configs(cfg.exit_layers, kv_fills, thresholds, never)
    warm_up(subject, configs, args.criterion)
    stats = measure(subject, configs, args.criterion, args.max_new_tokens)
    print(
        f"\nmodel: {subject.source}; L={cfg.num_hidden_layers}, exits {cfg.exit_layers}, "
        f"hidden {cfg.hidden_size}, vocab {cfg.vocab_size}; criterion {args.criterion}; "
        f"{len(subject.workload.prompts)} prompts, "
        f"<= {args.max_new_tokens} new tokens, batch 1, greedy, {args.threads} thread(s)"
    )
    print(
        f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, "
        f"torch {torch.__version__}, python {platform.python_version()}; "
        f"accuracy = {subject.workload.name}"
    )
    rows = table(configs, stats, cfg.exit_layers[-1], never is not None)
    print_verdicts(rows, kv_fills, cfg.exit_layers[-1])
    if args.json:
        summary = {"model": subject.source, "criterion": args.criterion, "rows": rows}
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="family checkpoint dir (default: artifacts/compress, else artifacts/sft, else synthetic)",
    )
    ap.add_argument("--synthetic", action="store_true", help="train and use the tiny synthetic family")
    ap.add_argument("--eval-file", type=Path, default=REPO / "data" / "validated" / "eval.jsonl")
    ap.add_argument(
        "--thresholds",
        default="0.5,0.8,0.9,0.95,0.99,0.999",
        help="comma-separated thresholds (max_prob: probabilities; entropy: nats)",
    )
    ap.add_argument("--criterion", default="max_prob", choices=["max_prob", "entropy"])
    ap.add_argument("--kv-fills", default="recompute,copy")
    ap.add_argument("--num-prompts", type=int, default=100)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--train-steps", type=int, default=400, help="synthetic family: optimizer steps")
    ap.add_argument("--train-batch", type=int, default=32, help="synthetic family: sequences per step")
    ap.add_argument("--hidden", type=int, default=64, help="synthetic family: hidden size")
    ap.add_argument("--exits", default="1,4,8", help="synthetic family: member depths (L = 8)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (default 1: steadier timings)"
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the table as JSON here")
    args = ap.parse_args(argv)
    for name in ("num_prompts", "max_new_tokens", "train_steps", "train_batch", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def load_subject(args: argparse.Namespace) -> Subject:
    """The pipeline checkpoint (`--checkpoint`, else artifacts/compress or artifacts/sft) and its eval
    prompts, or the synthetic family trained here and its digit-reversal prompts."""
    checkpoint = args.checkpoint
    if checkpoint is None and not args.synthetic:
        checkpoint = next(
            (
                REPO / p
                for p in ("artifacts/compress", "artifacts/sft")
                if (REPO / p / "config.json").exists()
            ),
            None,
        )
    if checkpoint is None:
        print(
            f"no pipeline checkpoint (artifacts/compress, artifacts/sft): training a tiny synthetic family "
            f"({args.train_steps} steps, batch {args.train_batch}, hidden {args.hidden}) on digit reversal"
        )
        t0 = time.perf_counter()
        exits = [int(x) for x in args.exits.split(",")]
        model, final_ce = train_synthetic_family(
            args.train_steps, args.train_batch, args.hidden, args.seed, exits
        )
        print(f"trained in {time.perf_counter() - t0:.0f} s; final per-exit CE on answers: {final_ce}")
        return Subject(model, synthetic_workload(args.num_prompts, args.seed), "synthetic")
    from tasks.core.artifacts import load_family

    model, tokenizer = load_family(checkpoint)
    model.eval()
    workload = pipeline_workload(checkpoint, tokenizer, args.num_prompts, args.eval_file)
    return Subject(model, workload, str(checkpoint))


def build_configs(
    exits: list[int], kv_fills: list[str], thresholds: list[float], never: float | None
) -> list[Config]:
    """`generate` at every member, then per KV fill: a never-exiting threshold (max_prob) and each one."""
    configs = [Config(f"generate@{d}", "generate", exit_layer=d) for d in exits]
    for kv in kv_fills:
        if never is not None:
            configs.append(Config(f"dynamic {kv} never", "dynamic", threshold=never, kv_fill=kv))
        configs += [Config(f"dynamic {kv} {t:g}", "dynamic", threshold=t, kv_fill=kv) for t in thresholds]
    return configs


def warm_up(subject: Subject, configs: list[Config], criterion: str) -> None:
    """First calls pay for lazy imports and allocator growth: one short run of every configuration."""
    warm = torch.tensor([subject.workload.prompts[0]])
    for config in configs:
        config.run(subject.model, warm, criterion, 4, subject.workload)


def measure(subject: Subject, configs: list[Config], criterion: str, max_new: int) -> dict[str, dict]:
    """Every prompt under every configuration (the order rotated per prompt); totals per configuration,
    with agreement with and accuracy relative to the deepest member's `generate`."""
    from tqdm.auto import tqdm

    workload, exits = subject.workload, subject.model.config.exit_layers
    stats = {
        c.name: {
            "seconds": 0.0,
            "tokens": 0,
            "layers": 0,
            "rows": 0,
            "correct": 0,
            "scored": 0,
            "agree": 0,
            "exits": {d: 0 for d in exits},
            "outputs": [],
        }
        for c in configs
    }
    for i, prompt in enumerate(tqdm(workload.prompts, desc="prompts x configurations", leave=False)):
        ids = torch.tensor([prompt])
        order = configs[i % len(configs) :] + configs[: i % len(configs)]
        for config in order:
            new, seconds, info = config.run(subject.model, ids, criterion, max_new, workload)
            s = stats[config.name]
            s["seconds"] += seconds
            s["tokens"] += len(new)
            s["layers"] += info["layers"]
            s["rows"] += info["rows"]
            for d, n in info["exits"].items():
                s["exits"][d] += n
            s["outputs"].append(new)
            verdict = workload.scorer(i, new)
            if verdict is not None:
                s["scored"] += 1
                s["correct"] += bool(verdict)
    reference = stats[f"generate@{exits[-1]}"]
    for s in stats.values():
        s["agree"] = sum(a == b for a, b in zip(s["outputs"], reference["outputs"])) / len(workload.prompts)
        s["accuracy"] = s["correct"] / s["scored"] if s["scored"] else s["agree"]
        s["tok_s"] = s["tokens"] / s["seconds"]
    return stats


def table(configs: list[Config], stats: dict[str, dict], deepest: int, has_never: bool) -> list[dict]:
    """Prints the comparison table; returns its rows (the JSON output)."""
    reference = stats[f"generate@{deepest}"]
    base_gen = reference["tok_s"]
    rows = []
    header = (
        f"{'configuration':<26} {'tok/s':>8} {'x gen':>6} {'x dyn':>6} {'acc':>6} {'d acc':>6} {'agree':>6} "
        f"{'layers/tok':>10} {'rows/tok':>8}  exits %"
    )
    print(header)
    print("-" * len(header))
    acc_ref = reference["accuracy"]
    for config in configs:
        name = config.name
        s = stats[name]
        kv = config.kv_fill if config.kind == "dynamic" else None
        base_dyn = stats[f"dynamic {kv} never"]["tok_s"] if kv and has_never else None
        exits_pct = " ".join(f"{d}:{100 * n / max(1, s['tokens']):.0f}" for d, n in s["exits"].items())
        row = {
            "configuration": name,
            "tokens_per_s": s["tok_s"],
            "speedup_vs_generate": s["tok_s"] / base_gen,
            "speedup_vs_dynamic_never": s["tok_s"] / base_dyn if base_dyn else None,
            "accuracy": s["accuracy"],
            "accuracy_delta": s["accuracy"] - acc_ref,
            "agreement": s["agree"],
            "layers_per_token": s["layers"] / max(1, s["tokens"]),
            "rows_per_token": s["rows"] / max(1, s["tokens"]),
            "exit_share": {d: n / max(1, s["tokens"]) for d, n in s["exits"].items()},
            "tokens": s["tokens"],
        }
        rows.append(row)
        x_dyn = f"{row['speedup_vs_dynamic_never']:.2f}" if base_dyn else "-"
        print(
            f"{name:<26} {s['tok_s']:>8.1f} {row['speedup_vs_generate']:>6.2f} {x_dyn:>6} "
            f"{s['accuracy']:>6.3f} "
            f"{row['accuracy_delta']:>+6.3f} {s['agree']:>6.3f} {row['layers_per_token']:>10.2f} "
            f"{row['rows_per_token']:>8.2f}  {exits_pct}"
        )
    return rows


def print_verdicts(rows: list[dict], kv_fills: list[str], deepest: int) -> None:
    """Per KV fill: the fastest threshold within 1 accuracy point of the deepest member, against 1.8x."""
    for kv in kv_fills:
        ok = [
            r
            for r in rows
            if r["configuration"].startswith(f"dynamic {kv} ")
            and r["accuracy_delta"] >= -0.01
            and not r["configuration"].endswith("never")
        ]
        best = max(ok, key=lambda r: r["speedup_vs_generate"], default=None)
        if best is None:
            print(f"{kv}: no threshold keeps accuracy within 1 point of the deepest member")
        else:
            verdict = "meets" if best["speedup_vs_generate"] >= 1.8 else "misses"
            print(
                f"{kv}: best within 1 point of accuracy: {best['configuration']} at "
                f"{best['speedup_vs_generate']:.2f}x over generate@{deepest} ({verdict} the 1.8x target)"
            )


if __name__ == "__main__":
    raise SystemExit(main())
