"""Greedy decoding speed at each exit of one family, side by side, as a ratio to the deepest member.

    python benchmarks/kernels/exit_speed.py [--layers 16 --hidden 1024 --exits 2,4,8,16 --new-tokens 64]

Target: member d at least 0.8 x (L/d) of the deepest member's speed. Members are timed interleaved
(round-robin, best-of) in one process. Method: docs/choices.md#benchmarks; figures: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def build_family(layers: int, hidden: int, exits: list[int], vocab: int):
    from ruyi_model import FamilialConfig, FamilialForCausalLM

    heads = max(1, hidden // 64)
    cfg = FamilialConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        head_dim=64,
        max_position_embeddings=2048,
        exit_layers=exits,
    )
    torch.manual_seed(0)
    return FamilialForCausalLM(cfg).eval()


def time_member(model, ids: torch.Tensor, exit_layer: int, new_tokens: int) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            exit_layer=exit_layer,
            pad_token_id=0,
        )
    dt = time.perf_counter() - t0
    assert out.shape[1] == ids.shape[1] + new_tokens
    return new_tokens / dt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--exits", default="2,4,8,16", help="comma-separated member depths (last = --layers)")
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (default 1: steadier timings)"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    exits = [int(x) for x in args.exits.split(",")]
    model = build_family(args.layers, args.hidden, exits, args.vocab)
    ids = torch.randint(1, args.vocab, (1, args.prompt_len))
    for d in exits:  # warm-up
        time_member(model, ids, d, 4)
    samples: dict[int, list[float]] = {d: [] for d in exits}
    for _ in range(args.repeats):
        for d in exits:
            samples[d].append(time_member(model, ids, d, args.new_tokens))
    best = {d: max(v) for d, v in samples.items()}
    deepest = exits[-1]
    print(
        f"family: L={args.layers} hidden={args.hidden} vocab={args.vocab} exits={exits}; "
        f"{args.new_tokens} greedy tokens, batch 1, KV cache, best of {args.repeats}, "
        f"{args.threads} thread(s)"
    )
    print(f"{'exit':>5} {'tok/s':>9} {'median':>9} {'ratio':>7} {'L/d':>6} {'target':>7} {'met':>4}")
    failures = 0
    for d in exits:
        ratio = best[d] / best[deepest]
        ideal = args.layers / d
        target = 0.8 * ideal
        met = ratio >= target
        failures += not met
        print(
            f"{d:>5} {best[d]:>9.1f} {statistics.median(samples[d]):>9.1f} {ratio:>7.2f} {ideal:>6.2f} "
            f"{target:>7.2f} {'yes' if met else 'no':>4}"
        )
    print(f"{len(exits) - failures}/{len(exits)} members meet 0.8 x (L/d)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
