"""A rollout's time with each `rl.rollout_engine`, side by side: `hf` (the family's forward with its
DynamicCache) and `static` (`ruyi_model.static_decode`), on the pipeline's own model and RL prompts.

    python benchmarks/kernels/rollout_engine.py --family artifacts/sft --data data/validated/rl.jsonl \\
        [--members 2,5,8 --batches 6 --prompts 8 --group 8 --max-new-tokens 64 --threads 1]

Each batch is `--prompts` consecutive RL questions x `--group` samples, decoded as the rl stage
decodes them (`sample_completions` with the shared prefill and compaction, temperature 1, the
committed sampler), once per engine from the same seed, in alternating order. Per member it prints
the median rollout time of each engine, their ratio, and in how many rows the two engines drew the
same tokens (they compute the same layers up to float rounding, so they should agree everywhere
unless a draw falls within rounding of a boundary). Exit 2 for a missing or unreadable input.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def _fail(message: str) -> int:
    print(f"rollout_engine: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", type=Path, required=True, help="a saved family (e.g. artifacts/sft)")
    ap.add_argument("--data", type=Path, required=True, help="RL rows, JSON lines with a question")
    ap.add_argument("--members", default="", help="comma-separated exit layers (default: every member)")
    ap.add_argument("--batches", type=int, default=6, help="timed batches per member (default 6)")
    ap.add_argument("--prompts", type=int, default=8, help="questions per batch (default 8)")
    ap.add_argument("--group", type=int, default=8, help="samples per question (default 8)")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="generation budget (default 64)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    if min(args.batches, args.prompts, args.group, args.max_new_tokens, args.threads) < 1:
        ap.error("--batches, --prompts, --group, --max-new-tokens and --threads must be >= 1")
    if not (args.family / "config.json").is_file():
        return _fail(f"{args.family}: no saved family (config.json missing)")
    try:
        rows = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()]
        questions = [str(r["question"]) for r in rows]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return _fail(f"{args.data}: not RL rows with a question ({type(e).__name__}: {e})")
    need = args.batches * args.prompts
    if len(questions) < need:
        return _fail(f"{args.data}: {len(questions)} questions, {need} needed (--batches x --prompts)")

    import torch

    from tasks.core.artifacts import load_family
    from tasks.training.rl_algos import ENGINES, encode_chat_prompts, sample_completions

    torch.set_num_threads(args.threads)
    model, tokenizer = load_family(args.family)
    model.eval()
    exits = list(model.config.exit_layers)
    try:
        members = [int(x) for x in args.members.split(",")] if args.members else exits
    except ValueError:
        ap.error(f"--members {args.members!r}: expected comma-separated exit layers")
    if bad := [d for d in members if d not in exits]:
        ap.error(f"--members: {bad} are not exits of {args.family} ({exits})")
    stop_ids = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id]
    report = {}
    for d in members:
        times: dict[str, list[float]] = {e: [] for e in ENGINES}
        same = total = 0
        for b in range(args.batches):
            ids, mask = encode_chat_prompts(tokenizer, questions[b * args.prompts : (b + 1) * args.prompts])
            ids, mask = ids.repeat_interleave(args.group, 0), mask.repeat_interleave(args.group, 0)
            out = {}
            for engine in ENGINES if b % 2 == 0 else ENGINES[::-1]:
                t0 = time.perf_counter()
                out[engine] = sample_completions(
                    model,
                    ids,
                    mask,
                    exit_layer=d,
                    max_new_tokens=args.max_new_tokens,
                    stop_ids=stop_ids,
                    pad_id=tokenizer.pad_token_id,
                    generator=torch.Generator().manual_seed(b),
                    group_size=args.group,
                    share_prefill=True,
                    compact=True,
                    engine=engine,
                )
                times[engine].append(time.perf_counter() - t0)
            (hf_ids, hf_mask, _), (st_ids, st_mask, _) = out["hf"], out["static"]
            for row in range(ids.shape[0]):
                total += 1
                same += hf_ids[row][hf_mask[row].bool()].tolist() == st_ids[row][st_mask[row].bool()].tolist()
        med = {e: statistics.median(v) for e, v in times.items()}
        report[d] = {
            "hf_s": med["hf"],
            "static_s": med["static"],
            "ratio": med["hf"] / med["static"],
            "rows_identical": same,
            "rows": total,
        }
        print(
            f"member {d}: hf {med['hf']:.3f} s, static {med['static']:.3f} s per rollout "
            f"({args.prompts} x {args.group} rows, median of {args.batches}); hf / static "
            f"{med['hf'] / med['static']:.2f}x; same tokens in {same} of {total} rows"
        )
    if args.json:
        from tasks.core.files import write_json

        write_json(args.json, {"settings": {k: str(v) for k, v in vars(args).items()}, "members": report})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
