"""Self-speculative decoding vs the deepest member's own greedy decoding, side by side in one run.

    python benchmarks/experiments/speculative.py [MODEL_DIR] [--k 2,4,6] [--drafts 2,4] [--new-tokens 64]
    python benchmarks/experiments/speculative.py --random-init      # smoke run, no trained model needed

MODEL_DIR is a family checkpoint (default: artifacts/export/family, else artifacts/compress of a
pipeline run). For every drafting member and k it prints tokens/s, the speed-up over
`generate(exit_layer=L, do_sample=False)`, the acceptance rate, tokens per verification forward, and
whether the tokens equal the baseline's (they must, in greedy mode). Runs are interleaved round-robin
over --repeats and the best time is kept (a shared machine is noisy). EOS is disabled so that every
run produces --new-tokens tokens. A random-init family's members disagree, so acceptance is near 0
there and speculative decoding is slower: use it to check the script, not to measure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

DEFAULT_DIRS = ("artifacts/export/family", "artifacts/compress")
PROMPTS = [
    "Tom has 3 apples and buys 4 more. How many apples does he have now?",
    "A train travels 60 miles in 2 hours. What is its speed in miles per hour?",
    "Sara had 12 pencils. She gave 5 to her friend. How many pencils does she have left?",
]


def load(args):
    from ruyi_model import FamilialConfig, FamilialForCausalLM

    if args.random_init:
        exits = [int(x) for x in args.random_exits.split(",")]
        cfg = FamilialConfig(
            vocab_size=512,
            hidden_size=args.hidden,
            intermediate_size=4 * args.hidden,
            num_hidden_layers=exits[-1],
            num_attention_heads=max(1, args.hidden // 64),
            num_key_value_heads=max(1, args.hidden // 128),
            head_dim=64,
            max_position_embeddings=2048,
            exit_layers=exits,
        )
        torch.manual_seed(0)
        model = FamilialForCausalLM(cfg).eval()
        prompts = [torch.randint(4, 512, (1, 24)) for _ in PROMPTS]
        return model, prompts, "random-init"
    candidates = [args.model_dir] if args.model_dir else list(DEFAULT_DIRS)
    path = next((Path(p) for p in candidates if (Path(p) / "config.json").is_file()), None)
    if path is None:
        sys.exit(
            f"no family checkpoint in {candidates} (run the pipeline, pass MODEL_DIR, or use --random-init)"
        )
    from transformers import AutoTokenizer

    model = FamilialForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    prompts = []
    for text in PROMPTS:
        if tok.chat_template:
            text = tok.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
            )
        prompts.append(tok(text, return_tensors="pt").input_ids)
    return model, prompts, str(path)


def run_baseline(model, prompts, new_tokens):
    t0 = time.perf_counter()
    outs = []
    with torch.inference_mode():
        for ids in prompts:
            outs.append(
                model.generate(
                    ids,
                    max_new_tokens=new_tokens,
                    do_sample=False,
                    pad_token_id=0,
                    exit_layer=model.config.exit_layers[-1],
                )[0, ids.shape[1] :].tolist()
            )
    return time.perf_counter() - t0, outs


def run_speculative(model, prompts, new_tokens, draft, k):
    from ruyi_model import speculative_generate

    t0 = time.perf_counter()
    outs, proposed, accepted, forwards = [], 0, 0, 0
    with torch.inference_mode():
        for ids in prompts:
            out = speculative_generate(model, ids, draft_exit=draft, k=k, max_new_tokens=new_tokens)
            outs.append(out.new_tokens)
            proposed, accepted = proposed + out.proposed, accepted + out.accepted
            forwards += out.target_forwards
    return time.perf_counter() - t0, outs, (accepted / proposed if proposed else 0.0), forwards


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", nargs="?", help=f"family checkpoint dir (default: first of {DEFAULT_DIRS})")
    ap.add_argument("--k", default="2,4,6", help="comma-separated draft lengths")
    ap.add_argument(
        "--drafts", default=None, help="comma-separated drafting members (default: every shallow member)"
    )
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (default 1: steadier timings)"
    )
    ap.add_argument(
        "--random-init", action="store_true", help="random family instead of a checkpoint (smoke run)"
    )
    ap.add_argument("--random-exits", default="2,4,8", help="member depths of the --random-init family")
    ap.add_argument("--hidden", type=int, default=256, help="width of the --random-init family")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, prompts, source = load(args)
    model.generation_config.eos_token_id = None  # fixed-length runs on both sides
    exits = model.config.exit_layers
    drafts = [int(x) for x in args.drafts.split(",")] if args.drafts else exits[:-1]
    ks = [int(x) for x in args.k.split(",")]
    configs = [("baseline", None, None)] + [("speculative", d, k) for d in drafts for k in ks]
    best: dict[tuple, float] = {}
    info: dict[tuple, tuple] = {}
    run_baseline(model, prompts, 4)  # warm-up
    for _ in range(args.repeats):
        for cfg in configs:
            if cfg[0] == "baseline":
                dt, outs = run_baseline(model, prompts, args.new_tokens)
                info[cfg] = (outs, None, None)
            else:
                dt, outs, rate, fwd = run_speculative(model, prompts, args.new_tokens, cfg[1], cfg[2])
                info[cfg] = (outs, rate, fwd)
            best[cfg] = min(best.get(cfg, float("inf")), dt)
    total = args.new_tokens * len(prompts)
    base_tps = total / best[configs[0]]
    base_outs = info[configs[0]][0]
    print(
        f"model: {source}  members {exits}  prompts {len(prompts)} x {args.new_tokens} new tokens, "
        f"best of {args.repeats}, {args.threads} thread(s)"
    )
    print(
        f"{'mode':<12} {'draft':>5} {'k':>3} {'tok/s':>9} {'speed-up':>9} {'accept':>7} "
        f"{'tok/verify':>10} same"
    )
    rows = []
    for cfg in configs:
        outs, rate, fwd = info[cfg]
        tps = total / best[cfg]
        row = {
            "mode": cfg[0],
            "draft_exit": cfg[1],
            "k": cfg[2],
            "tokens_per_s": round(tps, 2),
            "speedup": round(tps / base_tps, 3),
            "acceptance_rate": None if rate is None else round(rate, 4),
            "tokens_per_verify": None if fwd is None else round(total / fwd, 3),
            "same_tokens": outs == base_outs,
        }
        rows.append(row)
        rate_s = "-" if rate is None else f"{rate:.2f}"
        per_verify = "-" if fwd is None else f"{total / fwd:.2f}"
        print(
            f"{cfg[0]:<12} {cfg[1] or '-':>5} {cfg[2] or '-':>3} {tps:9.1f} {row['speedup']:9.2f} "
            f"{rate_s:>7} {per_verify:>10} {row['same_tokens']}"
        )
    if args.json:
        args.json.write_text(json.dumps({"model": source, "rows": rows}, indent=2))
    return 0 if all(r["same_tokens"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
