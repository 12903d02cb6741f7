"""Training throughput of the same tiny family on the hf and megatron backends, and the multi-exit overhead.

    python benchmarks/experiments/megatron_vs_hf.py [--steps 8] [--hidden 256] [--layers 8] [--exits 2,4,8]
        [--layouts 1x1x1,2x1x1,1x2x1,1x1x2] [--seq-len 128] [--batch-size 8] [--cpu-rounds 10]
        [--json out.json]

One run, one table: tokens/s of full training steps (forward, backward, AdamW; no evaluation or
checkpoint time) for the family on the hf backend (`train_loop`, one process) and on the megatron
backend (`tasks.training.megatron_backend.train`, one row per TP x PP x DP layout, ranks spawned
on this machine: gloo on CPU, NCCL on GPU), then the same depth with a single exit (the deepest) on hf
and megatron 1x1x1: the measured multi-exit overhead next to the one its extra FLOPs predict
(6 x parameters of the matmuls + attention scores, per token: the branch layers and heads of the
shallow members over the single-exit model). Random tokens (throughput does not depend on them).
On a shared machine the wall-clock rows move by tens of points with the load, so the hf overhead is
also measured in CPU time (`time.process_time`, which does not count the time the process waits for
a core): one forward + backward of the multi-exit loss (no optimizer) of each model, the two models
alternating for `--cpu-rounds` rounds, the fastest and the lower-quartile round of each.
Figures: benchmarks/RESULTS.md#megatron-vs-hf.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

VOCAB = 2048


def family_config(args, exits: list[int]):
    from ruyi_model import FamilialConfig

    heads = max(1, args.hidden // 64)
    return FamilialConfig(
        vocab_size=VOCAB,
        hidden_size=args.hidden,
        intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        head_dim=64,
        max_position_embeddings=max(512, args.seq_len),
        exit_layers=exits,
        exit_branch_layers=1,
    )


def predicted_flops_per_token(cfg, seq_len: int) -> float:
    """Training FLOPs per token (3 x forward): 2 x matmul parameters + 4 x seq x attention width per layer
    (QK^T and AV over the full sequence, as the unfused attention computes them), per head 2 x h x V."""
    h, f = cfg.hidden_size, cfg.intermediate_size
    q = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_key_value_heads * cfg.head_dim
    layer = 2 * (h * q + 2 * h * kv + q * h + 3 * h * f) + 4 * seq_len * q
    head = 2 * h * cfg.vocab_size
    deepest = cfg.exit_layers[-1]
    branch_layers = sum(cfg.exit_branch_layers for d in cfg.exit_layers if d != deepest)
    return 3 * ((cfg.num_hidden_layers + branch_layers) * layer + len(cfg.exit_layers) * head)


def make_params(args, workdir: Path, layout: tuple[int, int, int] | None):
    from tasks.core.params import Params

    cpt = dict(
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_steps=args.steps,
        warmup_steps=1,
        checkpoint_every=10**6,
        eval_every=10**6,
        eval_batches=1,
    )
    heads = max(1, args.hidden // 64)
    model = {
        "hidden_size": args.hidden,
        "intermediate_size": 3 * args.hidden,
        "num_hidden_layers": args.layers,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 2),
        "head_dim": 64,
        "exit_layers": [int(x) for x in args.exits.split(",")],
    }
    raw = {
        "seed": 0,
        "model": model,
        "paths": {k: str(workdir / k) for k in ("data_dir", "artifacts_dir", "metrics_dir", "plots_dir")},
        "cpt": cpt,
    }
    if layout is not None:
        tp, pp, dp = layout
        raw["training"] = {"backend": "megatron", "megatron": {"tp": tp, "pp": pp, "dp": dp}}
    return Params.model_validate(raw)


def run_one(args, exits: list[int], layout: tuple[int, int, int] | None) -> dict:
    import torch

    from ruyi_model import FamilialForCausalLM
    from tasks.training.batches import BlockStream, fixed_batches
    from tasks.training.loop import exit_weights_at, multi_exit_eval, multi_exit_loss_fn, train_loop

    torch.manual_seed(0)
    cfg = family_config(args, exits)
    model = FamilialForCausalLM(cfg)
    blocks = torch.randint(0, VOCAB, (256, args.seq_len), generator=torch.Generator().manual_seed(1))
    stream = BlockStream({"input_ids": blocks}, 0, "bench")
    val = fixed_batches({"input_ids": blocks[:8]}, args.batch_size, 1)
    with tempfile.TemporaryDirectory(prefix="mcore-bench-") as tmp:
        params = make_params(args, Path(tmp), layout)
        section = params.cpt
        t0 = time.perf_counter()
        if layout is None:
            result = train_loop(
                stage="bench",
                model=model,
                cfg=section,
                named_params=list(model.named_parameters()),
                stream=stream,
                loss_fn=multi_exit_loss_fn(
                    lambda s: exit_weights_at(section.exit_weights, exits, s, section.max_steps)
                ),
                val_batches=val,
                eval_fn=multi_exit_eval,
                checkpointer=None,
            )
        else:
            from tasks.training.megatron_backend import train

            result = train(
                stage="bench",
                params=params,
                cfg=section,
                model=model,
                stream=stream,
                val_batches=val,
                checkpoint_root=Path(tmp) / "checkpoints" / "bench",
                info={"benchmark": True},
            )
        wall = time.perf_counter() - t0
    return {
        "backend": "hf" if layout is None else "megatron",
        "layout": "-" if layout is None else "x".join(map(str, layout)),
        "exits": exits,
        "tokens_per_s": result.tokens / result.train_seconds,
        "train_seconds": result.train_seconds,
        "wall_seconds": wall,
        "final_loss": {str(d): v for d, v in sorted(result.final_train_losses(1).items())},
    }


def hf_cpu_overhead(args, exits: list[int], single: list[int], rounds: int) -> dict:
    """CPU seconds of one forward + backward (batch_size x seq_len tokens) of the family and of the
    single-exit model, alternating, `rounds` times each; their min and lower quartile, and the overheads."""
    import torch

    from ruyi_model import FamilialForCausalLM

    ids = torch.randint(0, VOCAB, (args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(1))
    models = {}
    for ex in (exits, single):
        torch.manual_seed(0)
        models[tuple(ex)] = FamilialForCausalLM(family_config(args, ex)).train()

    def step(model) -> float:
        t0 = time.process_time()
        out = model(ids, labels=ids, exit_loss_weights=[1.0] * len(model.config.exit_layers))
        out.loss.backward()
        seconds = time.process_time() - t0
        model.zero_grad(set_to_none=True)
        return seconds

    for model in models.values():
        step(model)  # warm-up
    times: dict[tuple, list[float]] = {k: [] for k in models}
    for _ in range(rounds):
        for k, model in models.items():
            times[k].append(step(model))
    out = {}
    for name, pick in (("min", lambda v: sorted(v)[0]), ("q1", lambda v: sorted(v)[len(v) // 4])):
        multi, one = pick(times[tuple(exits)]), pick(times[tuple(single)])
        out[name] = {"multi_s": multi, "single_s": one, "overhead": multi / one - 1}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--exits", default="2,4,8")
    p.add_argument("--layouts", default="1x1x1,2x1x1,1x2x1,1x1x2", help="TPxPPxDP of the megatron rows")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=2, help="micro-batches per step (the 1F1B schedule's)")
    p.add_argument(
        "--cpu-rounds", type=int, default=10, help="rounds of the hf CPU-time overhead measurement (0: skip)"
    )
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    exits = [int(x) for x in args.exits.split(",")]
    layouts = [tuple(int(v) for v in s.split("x")) for s in args.layouts.split(",") if s]
    rows = [run_one(args, exits, None)]
    for lay in layouts:
        rows.append(run_one(args, exits, lay))
    single = [exits[-1]]
    rows.append(run_one(args, single, None))
    rows.append(run_one(args, single, (1, 1, 1)))

    print(
        f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"CUDA {torch.cuda.is_available()}, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}; family "
        f"{args.layers} layers x {args.hidden}, vocab {VOCAB}, seq {args.seq_len}, batch {args.batch_size} x "
        f"{args.grad_accum} micro-batches, {args.steps} steps"
    )
    print(
        f"{'backend':10} {'TPxPPxDP':9} {'exits':10} {'tokens/s':>10} {'train s':>8} {'wall s':>7}  "
        "final loss"
    )
    for r in rows:
        print(
            f"{r['backend']:10} {r['layout']:9} {','.join(map(str, r['exits'])):10} "
            f"{r['tokens_per_s']:10.0f} {r['train_seconds']:8.2f} {r['wall_seconds']:7.1f}  {r['final_loss']}"
        )
    flops_multi = predicted_flops_per_token(family_config(args, exits), args.seq_len)
    flops_single = predicted_flops_per_token(family_config(args, single), args.seq_len)
    predicted = flops_multi / flops_single - 1
    overhead = {}
    for backend, multi_row, single_row in [("hf", rows[0], rows[-2]), ("megatron 1x1x1", rows[1], rows[-1])]:
        overhead[backend] = single_row["tokens_per_s"] / multi_row["tokens_per_s"] - 1
    print(
        f"\nmulti-exit overhead (time per token, exits {exits} vs {single}): "
        f"predicted by FLOPs {predicted:+.1%}; " + "; ".join(f"{k} {v:+.1%}" for k, v in overhead.items())
    )
    cpu = hf_cpu_overhead(args, exits, single, args.cpu_rounds) if args.cpu_rounds > 0 else None
    if cpu:
        print(
            f"hf multi-exit overhead in CPU time (forward + backward, {args.cpu_rounds} alternating rounds): "
            + "; ".join(
                f"{k} {v['multi_s']:.3f} s / {v['single_s']:.3f} s = {v['overhead']:+.1%}"
                for k, v in cpu.items()
            )
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"rows": rows, "predicted": predicted, "overhead": overhead, "hf_cpu_overhead": cpu}, indent=1
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
