"""BPPO vs GRPO from the pipeline's SFT checkpoint over seeds: time and steps to GRPO's final held-out
accuracy, final accuracy, response length, tokens generated / trained, where the step time goes.

    python benchmarks/experiments/bppo_vs_grpo.py                  # artifacts/sft + data/validated/rl.jsonl
    python benchmarks/experiments/bppo_vs_grpo.py --sft DIR --data FILE --params FILE --seeds 0,1,2
    python benchmarks/experiments/bppo_vs_grpo.py --run bppo-div=bppo,bppo.prefix_rule=divergent
    python benchmarks/experiments/bppo_vs_grpo.py --synthetic      # the built-in synthetic task

Per seed, every run (default `grpo` and `bppo`, each with the committed `rl` params of `--params`;
`--run NAME=ALGORITHM,KEY=VALUE,...` adds variants, KEY an `rl` field or `bppo.<field>`) starts from
the same SFT weights and advances round-robin, one step each, so load spikes hit them alike; a run's
clock is the sum of its own step times (rollouts, loss, optimizer, the KL metric on every `rl.kl_every`-th
step; evaluation excluded).
Every `--eval-every` steps each run is evaluated greedily on the held-out prompts (the rl stage's own
evaluation). The target of a seed is GRPO's final held-out accuracy; the time and steps to it are
those of the first evaluation at or above it. Method: docs/choices.md#benchmarks; figures:
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

SPECIALS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
SYN_WORDS = ["[UNK]", "user", "assistant", "what", "is", "plus", "?", "so", "####"] + [
    str(i) for i in range(19)
]
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# --- the synthetic task --------------------------------------------------------------------------


def synthetic_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + SYN_WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        unk_token="[UNK]",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tok.chat_template = TEMPLATE
    return tok


def synthetic_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        rows.append(
            {"id": f"syn-{i}", "question": f"what is {a} plus {b} ?", "answer": str(a + b), "level": 1}
        )
    return rows


def synthetic_sft(steps: int, seed: int, filler: int = 12, batch: int = 32):
    """A small family supervised on worked answers with 0..`filler` filler tokens; returns (model,
    tokenizer)."""
    import torch
    from tqdm.auto import tqdm

    from ruyi_model import FamilialConfig, FamilialForCausalLM

    tok = synthetic_tokenizer()
    cfg = FamilialConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        exit_layers=[2, 4],
        dae_blocks=[1, 0],
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        max_position_embeddings=128,
    )
    torch.manual_seed(seed)
    model = FamilialForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(seed + 1)
    for _ in (bar := tqdm(range(steps), desc="synthetic SFT")):
        ids_l, lab_l = [], []
        for _ in range(batch):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            prompt = tok.apply_chat_template(
                [{"role": "user", "content": f"what is {a} plus {b} ?"}],
                tokenize=False,
                add_generation_prompt=True,
            )
            p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
            resp = " ".join(
                ["so"] * rng.randint(0, filler)
                + [str(a), "plus", str(b), "is", str(a + b), "####", str(a + b)]
            )
            full = p_ids + tok(resp + "<|im_end|>", add_special_tokens=False)["input_ids"]
            ids_l.append(full)
            lab_l.append([-100] * len(p_ids) + full[len(p_ids) :])
        width = max(map(len, ids_l))
        ids = torch.full((batch, width), tok.pad_token_id)
        labels = torch.full((batch, width), -100)
        attn = torch.zeros((batch, width), dtype=torch.long)
        for i, (x, y) in enumerate(zip(ids_l, lab_l)):
            ids[i, : len(x)], labels[i, : len(y)], attn[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
        loss = sum(
            model(input_ids=ids, attention_mask=attn, labels=labels, exit_layer=d).loss
            for d in cfg.exit_layers
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    model.eval()
    return model, tok


# --- measurement -----------------------------------------------------------------------------------


def parse_run(spec: str) -> tuple[str, dict]:
    """`NAME=ALGORITHM[,KEY=VALUE...]` -> (name, rl overrides); KEY an rl field or `bppo.<field>`."""
    import yaml

    name, sep, rest = spec.partition("=")
    parts = [p for p in rest.split(",") if p]
    if not sep or not name or not parts or parts[0] not in ("grpo", "bppo"):
        raise ValueError(f"--run {spec!r}: expected NAME=grpo|bppo[,KEY=VALUE...]")
    update: dict = {"algorithm": parts[0]}
    for item in parts[1:]:
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"--run {spec!r}: {item!r} is not KEY=VALUE")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):  # YAML 1.1 reads 1e-4 as a string
            try:
                parsed = float(parsed)
            except ValueError:
                pass
        update[key] = parsed
    return name, update


def apply_overrides(cfg, update: dict):
    """`cfg` (RLParams) with dotted overrides applied and validated."""
    from tasks.core.params import RLParams

    data = cfg.model_dump()
    for key, value in update.items():
        node = data
        *path, last = key.split(".")
        for k in path:
            node = node[k]
        if last not in node:
            raise ValueError(f"unknown rl parameter {key!r}")
        node[last] = value
    return RLParams.model_validate(data)


def mean_accuracy(ev: dict) -> float:
    return sum(v["accuracy"] for v in ev.values()) / len(ev)


def run_seed(setting, cfg, runs: dict[str, dict], steps: int, seed: int, eval_every: int, members_spec):
    """One seed: every run from a copy of the SFT weights, round-robin; returns per run the history of
    every member and the evaluations `[(step, time_s, accuracy)]` (accuracy: mean over members)."""
    from tqdm.auto import tqdm

    from tasks.core.stage import seed_everything
    from tasks.training.rl_trainer import (
        RLTrainer,
        evaluate_members,
        resolve_members,
        split_rows,
        trainable_parameters,
    )

    seed_everything(seed)
    train_rows, eval_rows = split_rows(setting.rows, cfg.eval_prompts, Path("<rl rows>"))
    state = {}
    for name, update in runs.items():
        model = copy.deepcopy(setting.base)
        run_cfg = apply_overrides(cfg, update)
        members = resolve_members(model.config, members_spec)
        trainable = trainable_parameters(model, members_spec, members)
        trainer = RLTrainer(
            model, setting.tokenizer, train_rows, run_cfg, members=members, trainable=trainable, seed=seed
        )
        state[name] = {"trainer": trainer, "model": model, "members": members, "cfg": run_cfg}

    def evaluate(name):
        st = state[name]
        return evaluate_members(
            st["model"], setting.tokenizer, eval_rows, st["members"], cfg.max_new_tokens, cfg.format_reward
        )

    first = next(iter(state))
    before = mean_accuracy(evaluate(first))
    evals = {name: [(0, 0.0, before)] for name in state}
    for step in tqdm(range(1, steps + 1), desc=f"seed {seed}: steps (round-robin over runs)"):
        for name, st in state.items():
            st["trainer"].step()
            if step % eval_every == 0 or step == steps:
                evals[name].append((step, st["trainer"].elapsed_s, mean_accuracy(evaluate(name))))
    return {
        name: {
            "history": {str(d): st["trainer"].history[d] for d in st["members"]},
            "evals": evals[name],
            "rl": st["cfg"].model_dump(),
        }
        for name, st in state.items()
    }


def first_at_or_above(evals: list, target: float) -> tuple[int, float] | None:
    """(step, time_s) of the first evaluation after step 0 whose accuracy is >= target."""
    for step, t, acc in evals[1:]:
        if acc >= target - 1e-9:
            return step, t
    return None


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def summarize(per_seed: dict[int, dict], acc_tol: float) -> dict:
    """Per run over seeds: time/steps to GRPO's final accuracy, final accuracy, lengths, tokens, the
    step time split; `per_seed` maps seed -> `run_seed`'s result (which must contain a `grpo` run)."""
    names = list(next(iter(per_seed.values())))
    if "grpo" not in names:
        raise ValueError("the comparison needs a run named grpo")
    out: dict = {"acc_tol": acc_tol, "seeds": sorted(per_seed), "runs": {}}
    for name in names:
        rows = []
        for seed, res in per_seed.items():
            run, grpo = res[name], res["grpo"]
            start, target = grpo["evals"][0][2], grpo["evals"][-1][2]
            hit = first_at_or_above(run["evals"], target)
            g_hit = first_at_or_above(grpo["evals"], target)
            hists = list(run["history"].values())
            steps = [h for hist in hists for h in hist]
            n = len(hists[0])
            grad = [h.get("has_gradient", 1.0) for h in hists[0]]
            rows.append(
                {
                    "seed": seed,
                    "start_accuracy": start,
                    "target": target,
                    "grpo_improved": target > start,
                    "final_accuracy": run["evals"][-1][2],
                    "steps_to_target": None if hit is None else hit[0],
                    "optimizer_steps_to_target": None if hit is None else int(sum(grad[: hit[0]])),
                    "time_to_target_s": None if hit is None else hit[1],
                    # Only where GRPO improved on the start: otherwise the target is no RL progress.
                    "speedup_time": g_hit[1] / hit[1]
                    if hit and g_hit and hit[1] > 0 and target > start
                    else None,
                    "total_time_s": run["evals"][-1][1],
                    "mean_length": sum(h["length"] for h in steps) / len(steps),
                    "tokens_generated": sum(h["tokens_generated"] for h in steps),
                    "tokens_trained": sum(h["trained_tokens"] for h in steps),
                    "rollout_s_per_step": sum(h["rollout_s"] for h in steps) / n,
                    "loss_s_per_step": sum(h.get("loss_s", 0.0) for h in steps) / n,
                    "optim_s_per_step": sum(h.get("optim_s", 0.0) for h in steps) / n,
                    "train_s_per_step": sum(h["train_s"] for h in steps) / n,
                    "stopped_early": sum(h.get("stopped_early", 0.0) for h in steps) / len(steps),
                }
            )
        out["runs"][name] = {"per_seed": rows}
    g_rows = out["runs"]["grpo"]["per_seed"]
    for run in out["runs"].values():
        rows = run["per_seed"]
        acc_m, acc_sd = _mean_sd([r["final_accuracy"] for r in rows])
        reached = [r for r in rows if r["time_to_target_s"] is not None]
        speedups = [r["speedup_time"] for r in rows if r["speedup_time"] is not None]
        g_reached = [r for r in g_rows if r["time_to_target_s"] is not None]

        def avg(key, rs=rows):
            return sum(r[key] for r in rs) / len(rs) if rs else None

        g_len = avg("mean_length", g_rows)
        diff = acc_m - _mean_sd([r["final_accuracy"] for r in g_rows])[0]
        run.update(
            final_accuracy_mean=acc_m,
            final_accuracy_sd=acc_sd,
            start_accuracy=avg("start_accuracy"),
            accuracy_diff=diff,
            equal_accuracy=abs(diff) <= acc_tol + 1e-9,
            reached=len(reached),
            time_to_target_s=avg("time_to_target_s", reached),
            steps_to_target=avg("steps_to_target", reached),
            # Ratio of mean times over the seeds where both reached the target, and per-seed ratios.
            speedup_time=(
                sum(g["time_to_target_s"] for g, r in zip(g_rows, rows) if r["speedup_time"])
                / sum(r["time_to_target_s"] for r in rows if r["speedup_time"])
                if speedups
                else None
            ),
            speedups=speedups,
            grpo_reached=len(g_reached),
            total_time_s=avg("total_time_s"),
            mean_length=avg("mean_length"),
            length_change=avg("mean_length") / g_len - 1.0 if g_len else None,
            tokens_generated=avg("tokens_generated"),
            tokens_trained=avg("tokens_trained"),
            rollout_s_per_step=avg("rollout_s_per_step"),
            loss_s_per_step=avg("loss_s_per_step"),
            optim_s_per_step=avg("optim_s_per_step"),
            train_s_per_step=avg("train_s_per_step"),
            stopped_early=avg("stopped_early"),
        )
        run["target_met"] = bool(
            run["equal_accuracy"]
            and run["speedup_time"] is not None
            and run["speedup_time"] >= 3.0
            and run["reached"] == len(rows)
        )
    out["grpo_improved"] = [r["grpo_improved"] for r in g_rows]
    return out


def fmt(x, spec=".2f", none="-"):
    return none if x is None else format(x, spec)


def print_report(summary: dict, setting: str) -> None:
    runs = summary["runs"]
    names = sorted(runs, key=lambda n: (n != "grpo", list(runs).index(n)))
    seeds = summary["seeds"]
    print(f"\nBPPO vs GRPO ({setting}); seeds {seeds}")
    for seed, ok in zip(seeds, summary["grpo_improved"]):
        g = runs["grpo"]["per_seed"][seeds.index(seed)]
        note = "" if ok else "  <- GRPO did not improve held-out accuracy: a failed RL run, not a baseline"
        print(
            f"seed {seed}: held-out accuracy before RL {g['start_accuracy']:.3f}, target = GRPO's final "
            f"{g['target']:.3f}{note}"
        )
    rows = [
        ("reached GRPO's final acc", lambda r: f"{r['reached']}/{len(seeds)}"),
        ("time to it (s, mean)", lambda r: fmt(r["time_to_target_s"])),
        ("steps to it (mean)", lambda r: fmt(r["steps_to_target"], ".1f")),
        (
            "speedup vs GRPO, time",
            lambda r: "-" if r["speedup_time"] is None else f"{r['speedup_time']:.2f}x",
        ),
        ("  per seed", lambda r: " ".join(f"{x:.2f}" for x in r["speedups"]) or "-"),
        (
            "final acc (mean +- sd)",
            lambda r: f"{r['final_accuracy_mean']:.3f} +- {r['final_accuracy_sd']:.3f}",
        ),
        (
            "acc = GRPO's (tolerance)",
            lambda r: f"{'yes' if r['equal_accuracy'] else 'NO'} ({r['accuracy_diff']:+.3f})",
        ),
        ("mean response length", lambda r: f"{r['mean_length']:.1f}"),
        (
            "length vs GRPO",
            lambda r: "-" if r["length_change"] is None else f"{100 * r['length_change']:+.0f}%",
        ),
        ("tokens generated / run", lambda r: f"{r['tokens_generated']:.0f}"),
        ("tokens trained / run", lambda r: f"{r['tokens_trained']:.0f}"),
        ("step time (s)", lambda r: f"{r['rollout_s_per_step'] + r['train_s_per_step']:.3f}"),
        (
            "  rollout / loss / optim",
            lambda r: (
                f"{r['rollout_s_per_step']:.3f} / {r['loss_s_per_step']:.3f} / {r['optim_s_per_step']:.3f}"
            ),
        ),
        ("total train time (s)", lambda r: f"{r['total_time_s']:.1f}"),
        ("rows stopped early", lambda r: f"{100 * r['stopped_early']:.0f}%"),
    ]
    width = 26
    col = max(16, *(len(n) + 2 for n in names))
    print("\n| " + "metric".ljust(width) + " | " + " | ".join(n.ljust(col) for n in names) + " |")
    print("|" + "-" * (width + 2) + "|" + "|".join("-" * (col + 2) for _ in names) + "|")
    for label, fn in rows:
        print("| " + label.ljust(width) + " | " + " | ".join(fn(runs[n]).ljust(col) for n in names) + " |")
    tol = summary["acc_tol"]
    print(f"\nequal accuracy: |mean final accuracy - GRPO's| <= {tol:.3f} over the seeds")
    for name in names:
        if name == "grpo":
            continue
        r = runs[name]
        print(
            f"{name}: speedup {fmt(r['speedup_time'], '.2f')}x, accuracy "
            f"{'equal' if r['equal_accuracy'] else 'NOT equal'} ({r['accuracy_diff']:+.3f}), length "
            f"{fmt(r['length_change'] and 100 * r['length_change'], '+.0f')}%; target (>= 3x, equal "
            f"accuracy, every seed reaching it): {'met' if r['target_met'] else 'NOT met'}"
        )


class Setting:
    """What the runs start from: the SFT family, its tokenizer, the RL prompts, the base `rl` params and
    a one-line description for the report. (A plain class, not a dataclass: the tests load this file
    with `importlib` without registering it in `sys.modules`, which dataclasses need.)"""

    def __init__(self, base, tokenizer, rows: list[dict], cfg, description: str):
        self.base, self.tokenizer, self.rows = base, tokenizer, rows
        self.cfg, self.description = cfg, description


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.steps is not None and args.steps < 1) or args.eval_every < 1:
        parser.error(f"--steps ({args.steps}) and --eval-every ({args.eval_every}) must be >= 1")
    if args.acc_tol < 0:
        parser.error(f"--acc-tol ({args.acc_tol}) must be >= 0")
    try:
        seeds = [int(x) for x in args.seeds.split(",")]
        runs = dict(parse_run(s) for s in (args.run or ["grpo=grpo", "bppo=bppo"]))
    except ValueError as e:
        parser.error(str(e))
    if "grpo" not in runs:
        parser.error("one --run must be named grpo (the baseline)")
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        per_seed = {int(k): v for k, v in saved["results"].items()}
        print_report(summarize(per_seed, args.acc_tol), saved["setting"] + f" (from {args.from_json})")
        return 0

    import torch

    torch.set_num_threads(args.threads)
    setting = load_setting(args)
    cfg = with_overrides(setting.cfg, args)
    args.steps = args.steps or cfg.steps
    for update in runs.values():
        apply_overrides(cfg, update)  # fail before any training on a bad --run
    members = args.members or cfg.members
    if isinstance(members, str) and members not in ("dae", "all"):
        try:
            members = [int(x) for x in members.split(",")]
        except ValueError:
            parser.error(f"--members {args.members!r}: expected dae, all or comma-separated exit layers")
    print(
        f"rl settings: G={cfg.group_size}, prompts/step={cfg.prompts_per_step}, "
        f"max_new_tokens={cfg.max_new_tokens}, lr={cfg.lr}, loss={cfg.loss_type}, "
        f"prefix={cfg.bppo.prefix_rule}, members={members}, steps={args.steps}, threads={args.threads}, "
        f"runs={runs}"
    )
    per_seed = {}
    for seed in seeds:
        per_seed[seed] = run_seed(setting, cfg, runs, args.steps, seed, args.eval_every, members)
        if args.json:  # after every seed, so a cut-short run keeps what it measured
            from tasks.core.files import write_json

            write_json(
                args.json,
                {
                    "setting": setting.description,
                    "runs": runs,
                    "steps": args.steps,
                    "threads": args.threads,
                    "results": {str(k): v for k, v in per_seed.items()},
                },
            )
    summary = summarize(per_seed, args.acc_tol)
    print_report(summary, setting.description)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sft", default="artifacts/sft", help="SFT checkpoint directory (default: artifacts/sft)"
    )
    parser.add_argument(
        "--data", default="data/validated/rl.jsonl", help="RL prompts (default: data/validated/rl.jsonl)"
    )
    parser.add_argument(
        "--params", default="params.yaml", help="params file whose rl section is the base setting"
    )
    parser.add_argument(
        "--synthetic", action="store_true", help="use the built-in synthetic task even if --sft exists"
    )
    parser.add_argument(
        "--sft-steps", type=int, default=160, help="supervised warm-up steps of the synthetic task"
    )
    parser.add_argument(
        "--filler", type=int, default=12, help="synthetic task: at most this many filler tokens"
    )
    parser.add_argument(
        "--save-synthetic",
        default=None,
        metavar="DIR",
        help="save the synthetic SFT family to DIR (and its prompts to DIR/rl.jsonl) for reuse "
        "with --sft DIR --data DIR/rl.jsonl",
    )
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument(
        "--run",
        action="append",
        default=None,
        metavar="NAME=ALG[,KEY=VALUE...]",
        help="a run (repeatable; default grpo=grpo and bppo=bppo); KEY is an rl field or bppo.<field>",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="training steps per run (default: rl.steps of --params)"
    )
    parser.add_argument("--eval-every", type=int, default=10, help="held-out evaluation every n steps")
    parser.add_argument(
        "--acc-tol",
        type=float,
        default=0.03,
        help="mean final accuracies within this absolute difference of GRPO's count as equal (default 0.03)",
    )
    parser.add_argument(
        "--from-json", default=None, metavar="FILE", help="re-summarise an earlier --json file (no training)"
    )
    parser.add_argument(
        "--members",
        default=None,
        help="rl.members override: dae | all | comma-separated exit layers (accuracy: mean over members)",
    )
    parser.add_argument("--prompts-per-step", type=int, default=None)
    parser.add_argument("--group-size", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--eval-prompts", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--json", default=None, help="also write every curve and evaluation to this file")
    return parser


def load_setting(args: argparse.Namespace) -> Setting:
    """The pipeline's SFT checkpoint and RL prompts, or the built-in synthetic task (`--synthetic`, or
    when either is missing), with the `rl` section of `--params` (defaults when absent)."""
    from tasks.core.artifacts import load_family
    from tasks.core.params import load_params
    from tasks.training.rl_trainer import load_rl_rows

    cfg = load_params(args.params).rl if Path(args.params).is_file() else None
    if cfg is None:
        from tasks.core.params import RLParams

        cfg = RLParams()
    use_synthetic = (
        args.synthetic or not (Path(args.sft) / "config.json").is_file() or not Path(args.data).is_file()
    )
    t0 = time.perf_counter()
    if use_synthetic:
        why = (
            "--synthetic"
            if args.synthetic
            else f"no trained SFT checkpoint at {args.sft} (or no {args.data})"
        )
        print(
            f"using the built-in synthetic task ({why}): single-digit additions, micro family, "
            f"{args.sft_steps} supervised warm-up steps"
        )
        base, tok = synthetic_sft(args.sft_steps, args.seed, filler=args.filler)
        rows = synthetic_rows(400, args.seed + 2)
        if args.save_synthetic:
            from tasks.core.artifacts import save_family
            from tasks.core.files import write_jsonl

            save_family(base, tok, args.save_synthetic)
            write_jsonl(Path(args.save_synthetic) / "rl.jsonl", rows)
        description = (
            f"synthetic additions, micro family hidden 64, exits [2, 4], DaE member 2 (+1 block), "
            f"{args.sft_steps} SFT steps, filler 0-{args.filler}"
        )
        cfg = cfg.model_copy(
            update={
                "max_new_tokens": 32,
                "eval_prompts": 64,
                "lr": 2e-3,
                "bppo": cfg.bppo.model_copy(update={"budget_min_tokens": 8}),
            }
        )
    else:
        base, tok = load_family(args.sft)
        rows = load_rl_rows(Path(args.data))
        description = f"{args.sft}, {args.data}"
    print(f"setup took {time.perf_counter() - t0:.1f} s")
    return Setting(base, tok, rows, cfg, description)


def with_overrides(cfg, args: argparse.Namespace):
    """`cfg` with the `rl` options given on the command line."""
    update = {
        k: v
        for k, v in {
            "prompts_per_step": args.prompts_per_step,
            "group_size": args.group_size,
            "max_new_tokens": args.max_new_tokens,
            "lr": args.lr,
            "eval_prompts": args.eval_prompts,
        }.items()
        if v is not None
    }
    return cfg.model_copy(update=update)


if __name__ == "__main__":
    raise SystemExit(main())
