"""DaE ablation: random vs clone initialisation of the expanded blocks, at equal steps (Ruyi2 Fig. 6).

    python benchmarks/experiments/dae_ablation.py [--params params.yaml] [--cpt artifacts/cpt] [--steps 400]
        [--every 50] [--set expand.num_blocks=3 ...] [--out benchmarks/experiments/dae_ablation.png]

Runs the expand stage's `train_dae` twice from the same family (`--cpt DIR`, or a tiny family trained
here), same data order and seed, and writes both loss curves to `--out` (PNG) and `.json` beside it.
Needs `data/validated/` and `artifacts/tokenizer/`. `--threads` (default 1) keeps the numbers
CPU-deterministic. Method: docs/choices.md#benchmarks; figures: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tasks.training.batches import BlockStream, fixed_batches, load_tokenizer, pack_corpus, read_corpus
from tasks.training.loop import exit_weights_at, multi_exit_loss_fn, train_loop

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

PAPER = {"random": 2.83, "clone": 2.89, "steps": 3000}


def fresh_family(params, steps: int):
    """A tiny family trained with params.cpt (no checkpoints), from the validated corpus."""
    from tasks import cpt
    from tasks.core.paths import Workspace
    from tasks.core.stage import seed_everything

    ws = Workspace.from_params(params)
    tokenizer = load_tokenizer(ws.tokenizer)
    train_path, val_path = ws.corpus_train, ws.corpus_val
    cfg = params.cpt.model_copy(
        update={
            "max_steps": steps,
            "warmup_steps": min(params.cpt.warmup_steps, steps - 1),
            "eval_every": steps,
        }
    )
    seed_everything(params.seed)
    model = cpt.build_family(params, tokenizer)
    texts = [r["text"] for r in read_corpus(train_path)]
    blocks = pack_corpus(tokenizer, texts, cfg.seq_len, str(train_path))
    val = pack_corpus(tokenizer, [r["text"] for r in read_corpus(val_path)], cfg.seq_len, str(val_path))
    exits = model.config.exit_layers
    result = train_loop(
        stage="cpt (fresh family)",
        model=model,
        cfg=cfg,
        named_params=list(model.named_parameters()),
        stream=BlockStream({"input_ids": blocks}, params.seed, "cpt/train"),
        loss_fn=multi_exit_loss_fn(lambda s: exit_weights_at(cfg.exit_weights, exits, s, steps)),
        val_batches=fixed_batches({"input_ids": val}, cfg.batch_size, cfg.eval_batches),
    )
    print(f"fresh family: {steps} cpt steps, val loss per member {result.val_losses()}")
    return model.to("cpu"), tokenizer


def windows(history, d: int, every: int, steps: int) -> list[tuple[int, float]]:
    """Mean train loss of member d over each `every`-step window, keyed by the window's last step."""
    train = {r["step"]: r["loss"] for r in history if r["split"] == "train" and r["exit"] == d}
    out = []
    for end in range(every, steps + 1, every):
        values = [train[s] for s in range(end - every + 1, end + 1)]
        out.append((end, sum(values) / len(values)))
    return out


@dataclass
class Ablation:
    """Both DaE runs of one member: the params used, the expanded member, the family's origin and
    per initialisation its history, time, parameter counts, held-out losses and train-loss windows."""

    params: object
    dae_exit: int
    source: str
    runs: dict[str, dict]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a parameter, e.g. --set expand.num_blocks=3 (repeatable)",
    )
    parser.add_argument(
        "--cpt", default=None, help="family to expand (a cpt stage output); default: train one"
    )
    parser.add_argument(
        "--cpt-steps", type=int, default=None, help="steps of the fresh family (default: cpt.max_steps)"
    )
    parser.add_argument(
        "--steps", type=int, default=400, help="DaE CPT steps per initialisation (default: 400)"
    )
    parser.add_argument(
        "--every", type=int, default=50, help="report/evaluation interval in steps (default: 50)"
    )
    parser.add_argument(
        "--out", default="benchmarks/experiments/dae_ablation.png", help="PNG path (the .json goes beside it)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.steps < 2 or args.every < 1 or args.every > args.steps:
        parser.error("--steps must be >= 2 and 1 <= --every <= --steps")

    import torch

    from tasks.core.params import ParamsError
    from tasks.core.stage import StageError, setup_logging

    setup_logging()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        ablation = run_ablation(args)
    except (ParamsError, StageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_table(ablation, args.steps, torch.get_num_threads())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(ablation, out)
    write_summary(ablation, out.with_suffix(".json"), args.steps, torch.get_num_threads())
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


def run_ablation(args: argparse.Namespace) -> Ablation:
    """Expands the family (`--cpt`, or a fresh one) and trains the new blocks once per initialisation."""
    from tasks import expand
    from tasks.core.artifacts import load_family
    from tasks.core.params import load_params
    from tasks.core.stage import parse_overrides

    params = load_params(args.params, parse_overrides(args.overrides))
    params = params.model_copy(
        update={
            "expand": params.expand.model_copy(
                update={
                    "max_steps": args.steps,
                    "eval_every": args.every,
                    "warmup_steps": min(params.expand.warmup_steps, args.steps - 1),
                }
            )
        }
    )
    if args.cpt:
        base, tokenizer = load_family(args.cpt)
        source = args.cpt
    else:
        steps = args.cpt_steps or params.cpt.max_steps
        base, tokenizer = fresh_family(params, steps)
        source = f"fresh family ({steps} cpt steps)"
    d = expand.resolve_dae_exit(params, base, source)
    data = expand.load_dae_data(params, tokenizer)
    runs = {}
    for init in ("random", "clone"):
        t0 = time.perf_counter()
        _, result, info = expand.train_dae(base, params, data, init=init)
        runs[init] = {
            "history": result.history,
            "seconds": time.perf_counter() - t0,
            **info,
            "val": sorted((r["step"], r["loss"]) for r in result.history if r["split"] == "val"),
            "train_windows": windows(result.history, d, args.every, args.steps),
        }
    return Ablation(params, d, source, runs)


def print_table(ablation: Ablation, steps: int, threads: int) -> None:
    cfg, runs, d = ablation.params.expand, ablation.runs, ablation.dae_exit
    print(
        f"\nDaE ablation: member {d} of {ablation.source}, +{cfg.num_blocks} blocks, {steps} steps, "
        f"lr {cfg.lr}, batch {cfg.batch_size}x{cfg.seq_len}, replay {cfg.replay_fraction}, "
        f"torch threads {threads}"
    )
    print(
        f"{'step':>6} | {'train random':>12} {'train clone':>12} | {'val random':>10} {'val clone':>10} "
        f"{'clone-random':>12}"
    )
    val_r, val_c = dict(runs["random"]["val"]), dict(runs["clone"]["val"])
    train_r, train_c = dict(runs["random"]["train_windows"]), dict(runs["clone"]["train_windows"])
    for step in sorted(val_r):
        tr = f"{train_r[step]:12.4f} {train_c[step]:12.4f}" if step in train_r else f"{'':12} {'':12}"
        print(
            f"{step:>6} | {tr} | {val_r[step]:10.4f} {val_c[step]:10.4f} {val_c[step] - val_r[step]:+12.4f}"
        )
    print(f"paper (Ruyi2 Fig. 6, 3k steps at 14B scale): random {PAPER['random']} vs clone {PAPER['clone']}")
    print(
        f"time: random {runs['random']['seconds']:.0f} s, clone {runs['clone']['seconds']:.0f} s; "
        f"trainable {runs['random']['trainable_params']} of {runs['random']['total_params']} parameters"
    )


def plot(ablation: Ablation, out: Path) -> None:
    from tasks.core.files import pyplot

    plt = pyplot()

    cfg, runs = ablation.params.expand, ablation.runs
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for init, color in (("random", "tab:blue"), ("clone", "tab:orange")):
        hist = runs[init]["history"]
        steps = [r["step"] for r in hist if r["split"] == "train"]
        ax.plot(steps, [r["loss"] for r in hist if r["split"] == "train"], color=color, lw=0.6, alpha=0.35)
        ax.plot(
            *zip(*runs[init]["train_windows"]),
            color=color,
            lw=1.2,
            ls="--",
            label=f"{init}: train (window mean)",
        )
        ax.plot(*zip(*runs[init]["val"]), color=color, lw=2, marker="o", ms=3, label=f"{init}: held-out STEM")
    ax.set_xlabel("DaE CPT step")
    ax.set_ylabel("cross-entropy of the expanded member (nats/token)")
    ax.set_title(f"DaE ablation: member {ablation.dae_exit} +{cfg.num_blocks} blocks, random vs clone init")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def write_summary(ablation: Ablation, path: Path, steps: int, threads: int) -> None:
    cfg, runs = ablation.params.expand, ablation.runs
    summary = {
        "source": ablation.source,
        "dae_exit": ablation.dae_exit,
        "num_blocks": cfg.num_blocks,
        "steps": steps,
        "lr": cfg.lr,
        "batch_size": cfg.batch_size,
        "seq_len": cfg.seq_len,
        "replay_fraction": cfg.replay_fraction,
        "seed": ablation.params.seed,
        "torch_threads": threads,
        "paper": PAPER,
        **{
            init: {
                "val": runs[init]["val"],
                "train_windows": runs[init]["train_windows"],
                "seconds": round(runs[init]["seconds"], 1),
                "trainable_params": runs[init]["trainable_params"],
            }
            for init in runs
        },
    }
    path.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
