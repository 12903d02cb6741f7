"""How far each member's greedy path is from a tie, against how far batched and single-prompt logits differ.

    python benchmarks/experiments/greedy_margin.py [--checkpoint artifacts/compress] [--num-prompts 4]
        [--batch-prompts 32] [--max-new-tokens 64] [--dtype float32|bfloat16] [--json out.json]

Why: the deploy stage requires every served `exit_<d>` tier to answer the smoke questions with exactly
the text evaluate generated (tasks/deploy.py `compare_with_evaluate`). evaluate decodes left-padded
batches, the server one prompt at a time, so their logits differ by rounding. Equality is a fair test
when that difference is far below the smallest gap between the greedy token and the runner-up on the
decoded paths. For every member this prints:
- `min gap` / `median gap`: top-1 minus top-2 logit over every step of the greedy decoding
  (`generate(exit_layer=d)`, batch 1, chat template) of the first `--num-prompts` eval questions;
- `batched vs single`: max |logit difference| at the first decoding position between one left-padded
  batch of the first `--batch-prompts` questions (as evaluate decodes) and each prompt alone.
`--dtype bfloat16` runs both in bfloat16 (the serving option `deploy.dtype`). Figures: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint", type=Path, default=Path("artifacts/compress"), help="family checkpoint dir"
    )
    parser.add_argument("--eval-file", type=Path, default=Path("data/validated/eval.jsonl"))
    parser.add_argument(
        "--num-prompts", type=int, default=4, help="greedy paths measured (deploy.smoke_prompts)"
    )
    parser.add_argument(
        "--batch-prompts", type=int, default=32, help="left-padded batch (evaluate.decode_batch_size)"
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=64, help="greedy budget (evaluate.max_new_tokens)"
    )
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    for name in ("num_prompts", "batch_prompts", "max_new_tokens", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")

    from ruyi_model.decoding import encode_prompts, pad_left
    from tasks.core.artifacts import load_family
    from tasks.core.files import read_jsonl
    from tasks.core.stage import StageError

    torch.set_num_threads(args.threads)
    try:
        model, tokenizer = load_family(args.checkpoint, dtype=args.dtype)
        rows = read_jsonl(args.eval_file, required=("question",))
    except StageError as e:
        parser.error(str(e))
    questions = [str(r["question"]) for r in rows]
    if len(questions) < max(args.num_prompts, args.batch_prompts):
        parser.error(
            f"{args.eval_file} has {len(questions)} questions; --num-prompts and --batch-prompts need "
            f"{max(args.num_prompts, args.batch_prompts)}"
        )
    model.eval()
    # evaluate's own prompt encoding and left padding (ruyi_model.decoding, greedy_generate_ids)
    encoded = encode_prompts(tokenizer, questions[: args.batch_prompts])
    batch, mask = pad_left(encoded, tokenizer.pad_token_id)

    print(
        f"model: {args.checkpoint} ({args.dtype}), exits {list(model.config.exit_layers)}; greedy paths of "
        f"{args.num_prompts} eval questions x <= {args.max_new_tokens} tokens; a left-padded batch of "
        f"{args.batch_prompts} against each prompt alone; {args.threads} thread(s)"
    )
    print(f"{'exit':>4}  {'steps':>5}  {'min gap':>8}  {'median gap':>10}  {'batched vs single':>17}")
    out = []
    with torch.inference_mode():
        for d in model.config.exit_layers:
            gaps: list[float] = []
            for ids in encoded[: args.num_prompts]:
                gen = model.generate(
                    torch.tensor([ids]),
                    exit_layer=d,
                    do_sample=False,
                    max_new_tokens=args.max_new_tokens,
                    output_scores=True,
                    return_dict_in_generate=True,
                )
                for scores in gen.scores:
                    top = scores[0].float().topk(2).values
                    gaps.append(float(top[0] - top[1]))
            batched = model(input_ids=batch, attention_mask=mask, exit_layer=d, use_cache=False).logits[:, -1]
            single = torch.stack(
                [
                    model(input_ids=torch.tensor([e]), exit_layer=d, use_cache=False).logits[0, -1]
                    for e in encoded
                ]
            )
            diff = float((batched.float() - single.float()).abs().max())
            row = {
                "exit": d,
                "steps": len(gaps),
                "min_gap": min(gaps),
                "median_gap": statistics.median(gaps),
                "batched_vs_single": diff,
            }
            out.append(row)
            print(f"{d:>4}  {len(gaps):>5}  {min(gaps):>8.4f}  {row['median_gap']:>10.3f}  {diff:>17.2e}")
    if args.json:
        args.json.write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": out}, indent=2)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
