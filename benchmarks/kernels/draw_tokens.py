"""The rollout samplers' cost per decoding step, side by side: `rl_algos.draw_tokens` with
`inverse_cdf` (one uniform per row) and `race` (one exponential per vocabulary entry).

    python benchmarks/kernels/draw_tokens.py [--rows 64 --vocab 2048 --repeats 300 --threads 1]

The defaults are a tiny-default rollout step (8 prompts x 8 samples, the tokenizer's 2048 entries).
Each round times both samplers on the same probabilities, in alternating order; the figure is the
median over rounds and the ratio race / inverse_cdf (that both draw from softmax's law is tested in
tests/integration/test_rl.py). The whole-rollout effect: benchmarks/experiments/bppo_vs_grpo.py
with `--run ...,sampler=race` (RESULTS.md, "Rollout draws").
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from tasks.training.rl_algos import SAMPLERS, draw_tokens  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=64, help="rows decoded per step (default 64)")
    ap.add_argument("--vocab", type=int, default=2048, help="vocabulary size (default 2048)")
    ap.add_argument("--repeats", type=int, default=300, help="timed rounds (default 300)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = ap.parse_args(argv)
    if min(args.rows, args.vocab, args.repeats, args.threads) < 1:
        ap.error("--rows, --vocab, --repeats and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    # a peaked distribution per row, as a trained member's (temperature 1)
    probs = torch.softmax(torch.randn(args.rows, args.vocab, generator=gen) * 3, dim=-1)
    rows = torch.arange(args.rows)
    times: dict[str, list[float]] = {s: [] for s in SAMPLERS}
    generators = {s: torch.Generator().manual_seed(1) for s in SAMPLERS}
    for s in SAMPLERS:  # warm-up
        draw_tokens(probs, rows, args.rows, generators[s], s)
    for r in range(args.repeats):
        for s in SAMPLERS if r % 2 == 0 else SAMPLERS[::-1]:
            t0 = time.perf_counter()
            draw_tokens(probs, rows, args.rows, generators[s], s)
            times[s].append(time.perf_counter() - t0)
    med = {s: statistics.median(v) * 1e3 for s, v in times.items()}
    for s in SAMPLERS:
        print(f"{s:12s} {med[s]:8.3f} ms per step ({args.rows} rows x {args.vocab} entries)")
    print(f"race / inverse_cdf: {med['race'] / med['inverse_cdf']:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
