"""BPPO vs GRPO from the same SFT checkpoint: time and optimizer steps to the same reward, length, accuracy.

    python benchmarks/experiments/bppo_vs_grpo.py                  # artifacts/sft + data/validated/rl.jsonl
    python benchmarks/experiments/bppo_vs_grpo.py --sft DIR --data FILE --steps 80 --target 1.0
    python benchmarks/experiments/bppo_vs_grpo.py --synthetic      # force the built-in synthetic task

Three runs (`grpo`, `bppo`, `bppo-fixed`: the adaptive schedule off) share the SFT weights, the seed and
the prompt order; other settings come from `params.yaml`'s `rl` section (or `--params`), overridable by
flags. Without a trained SFT checkpoint the script builds a synthetic task and says so.
Method: docs/choices.md#benchmarks; figures: benchmarks/RESULTS.md.
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


def moving_average(values: list[float], window: int) -> list[float]:
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1) : i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def first_reach(ma: list[float], target: float, window: int) -> int | None:
    """Index of the first step whose moving average (over a full window) is >= target."""
    for i in range(window - 1, len(ma)):
        if ma[i] >= target:
            return i
    return None


def run_all(
    base_model, tok, rows: list[dict], cfg, configs: dict[str, dict], steps: int, seed: int, members_spec
) -> dict[str, dict]:
    """Trains one copy of `base_model` per config, round-robin; returns, per run, every member's history
    and greedy evaluation before/after: `{run: {"members": {d: {"history", "before", "after"}}}}`."""
    from tqdm.auto import tqdm

    from tasks.training.rl_trainer import (
        RLTrainer,
        evaluate_members,
        resolve_members,
        split_rows,
        trainable_parameters,
    )

    train_rows, eval_rows = split_rows(rows, cfg.eval_prompts, Path("<rl rows>"))
    runs = {}
    for name, overrides in configs.items():
        model = copy.deepcopy(base_model)
        run_cfg = cfg.model_copy(update=overrides)
        members = resolve_members(model.config, members_spec)
        trainable = trainable_parameters(model, members_spec, members)
        runs[name] = {
            "trainer": RLTrainer(
                model, tok, train_rows, run_cfg, members=members, trainable=trainable, seed=seed
            ),
            "model": model,
            "members": members,
        }
    first = next(iter(runs.values()))
    before = evaluate_members(
        first["model"], tok, eval_rows, first["members"], cfg.max_new_tokens, cfg.format_reward
    )
    for _ in tqdm(range(steps), desc="steps (round-robin over runs)"):
        for run in runs.values():
            run["trainer"].step()
    out = {}
    for name, run in runs.items():
        after = evaluate_members(
            run["model"], tok, eval_rows, run["members"], cfg.max_new_tokens, cfg.format_reward
        )
        out[name] = {
            "members": {
                d: {"history": run["trainer"].history[d], "before": before[d], "after": after[d]}
                for d in run["members"]
            }
        }
    return out


def summarize_member(
    results: dict[str, dict],
    window: int,
    target: float | None,
    target_frac: float = 0.8,
    acc_tol: float = 0.02,
) -> dict:
    """The comparison for one member: `results` maps run name -> {"history", "before", "after"}."""
    n_steps = min(len(r["history"]) for r in results.values())
    if n_steps == 0:
        raise ValueError("no training steps recorded; run with --steps >= 1")
    requested = window
    window = min(window, n_steps)  # a window longer than the run: one window over all steps
    ma = {name: moving_average([h["reward"] for h in r["history"]], window) for name, r in results.items()}
    start = ma["grpo"][window - 1]
    if target is None:
        # The same reward for every run: `target_frac` of the way from the first full window to the
        # best moving average that EVERY run reaches (the minimum over runs of their best).
        common_best = min(max(m[window - 1 :]) for m in ma.values())
        target = start + target_frac * (common_best - start)
    table = {}
    for name, r in results.items():
        hist = r["history"]
        idx = first_reach(ma[name], target, window)
        # Only steps that carried gradient are optimizer steps: a BPPO step without any correct/incorrect
        # pair (has_gradient 0) takes none and is not progress (curves from before the flag: all count).
        grad = [h.get("has_gradient", 1.0) for h in hist]
        table[name] = {
            "steps_to_target": None if idx is None else int(sum(grad[: idx + 1])),
            "sampled_steps_to_target": None if idx is None else idx + 1,
            "skipped_steps": int(len(hist) - sum(grad)),
            "time_to_target_s": None if idx is None else hist[idx]["time_s"],
            "total_time_s": hist[-1]["time_s"],
            "mean_step_s": hist[-1]["time_s"] / len(hist),
            "rollout_s_per_step": sum(h["rollout_s"] for h in hist) / len(hist),
            "train_s_per_step": sum(h["train_s"] for h in hist) / len(hist),
            "mean_length": sum(h["length"] for h in hist) / len(hist),
            "final_length": sum(h["length"] for h in hist[-window:]) / min(window, len(hist)),
            "tokens_generated": sum(h["tokens_generated"] for h in hist),
            "trained_tokens": sum(h["trained_tokens"] for h in hist),
            "final_ma_reward": ma[name][-1],
            "holds_target_at_end": ma[name][-1] >= target,
            "eval_before": r["before"],
            "eval_after": r["after"],
        }
    g = table["grpo"]
    for row in table.values():
        ok = row["time_to_target_s"] is not None and g["time_to_target_s"] is not None
        row["speedup_time"] = g["time_to_target_s"] / row["time_to_target_s"] if ok else None
        ok_steps = ok and row["steps_to_target"] and g["steps_to_target"]
        row["speedup_steps"] = g["steps_to_target"] / row["steps_to_target"] if ok_steps else None
        row["length_change"] = row["mean_length"] / g["mean_length"] - 1.0 if g["mean_length"] else None
        diff = row["eval_after"]["accuracy"] - g["eval_after"]["accuracy"]
        row["final_accuracy_diff"] = diff
        row["equal_final_accuracy"] = abs(diff) <= acc_tol + 1e-12
        row["target_met"] = bool(
            row["speedup_time"] is not None and row["speedup_time"] >= 3.0 and row["equal_final_accuracy"]
        )
    schedule = None
    full, fixed = table.get("bppo", {}).get("speedup_time"), table.get("bppo-fixed", {}).get("speedup_time")
    if full and fixed:
        factor = full / fixed
        schedule = {
            "factor": factor,
            "share_of_log_speedup": math.log(factor) / math.log(full) if full > 1 else None,
        }
    return {
        "target": target,
        "window": window,
        "requested_window": requested,
        "start_ma": start,
        "acc_tol": acc_tol,
        "runs": table,
        "schedule": schedule,
    }


def summarize(
    results: dict[str, dict],
    window: int,
    target: float | None,
    target_frac: float = 0.8,
    acc_tol: float = 0.02,
) -> dict:
    """Per member (`exit_<d>`), the comparison of `summarize_member`; `results` as `run_all` returns it."""
    names = list(results)
    members = list(results[names[0]]["members"])
    return {
        "members": {
            f"exit_{d}": summarize_member(
                {n: results[n]["members"][d] for n in names}, window, target, target_frac, acc_tol
            )
            for d in members
        }
    }


def fmt(x, spec=".2f", none="not reached"):
    return none if x is None else format(x, spec)


def print_report(summary: dict, setting: str) -> None:
    for member, msum in summary["members"].items():
        print_member(msum, f"{setting}; member {member}")


def print_member(summary: dict, setting: str) -> None:
    runs = summary["runs"]
    names = sorted(
        runs, key=lambda n: (n != "grpo", list(runs).index(n))
    )  # GRPO first (a JSON file sorts keys)
    print(f"\nBPPO vs GRPO ({setting})")
    note = (
        ""
        if summary["window"] == summary["requested_window"]
        else f"; --window {summary['requested_window']} is longer than the run, so one window of all steps"
    )
    print(
        f"target: moving-average reward >= {summary['target']:.3f} (window {summary['window']}{note}; "
        f"GRPO starts at {summary['start_ma']:.3f})\n"
    )
    rows = [
        ("steps to target (w/ grad)", lambda r: fmt(r["steps_to_target"], "d")),
        ("  sampled steps to target", lambda r: fmt(r["sampled_steps_to_target"], "d")),
        ("steps without gradient", lambda r: f"{r['skipped_steps']}"),
        ("time to target (s)", lambda r: fmt(r["time_to_target_s"])),
        (
            "speedup vs GRPO, time",
            lambda r: "-" if r["speedup_time"] is None else f"{r['speedup_time']:.2f}x",
        ),
        (
            "speedup vs GRPO, steps",
            lambda r: "-" if r["speedup_steps"] is None else f"{r['speedup_steps']:.2f}x",
        ),
        ("mean step time (s)", lambda r: f"{r['mean_step_s']:.3f}"),
        ("  rollout / train (s)", lambda r: f"{r['rollout_s_per_step']:.3f} / {r['train_s_per_step']:.3f}"),
        ("mean response length", lambda r: f"{r['mean_length']:.1f}"),
        (
            "length vs GRPO",
            lambda r: "-" if r["length_change"] is None else f"{100 * r['length_change']:+.0f}%",
        ),
        ("final-window length", lambda r: f"{r['final_length']:.1f}"),
        ("tokens generated", lambda r: f"{int(r['tokens_generated'])}"),
        ("tokens trained", lambda r: f"{int(r['trained_tokens'])}"),
        ("final MA reward", lambda r: f"{r['final_ma_reward']:.3f}"),
        ("still >= target at the end", lambda r: "yes" if r["holds_target_at_end"] else "NO"),
        (
            "greedy acc before -> after",
            lambda r: f"{r['eval_before']['accuracy']:.3f} -> {r['eval_after']['accuracy']:.3f}",
        ),
        (
            "final acc = GRPO's?",
            lambda r: f"{'yes' if r['equal_final_accuracy'] else 'NO'} ({r['final_accuracy_diff']:+.3f})",
        ),
    ]
    width = 28
    print("| " + "metric".ljust(width) + " | " + " | ".join(n.ljust(14) for n in names) + " |")
    print("|" + "-" * (width + 2) + "|" + "|".join("-" * 16 for _ in names) + "|")
    for label, fn in rows:
        print("| " + label.ljust(width) + " | " + " | ".join(fn(runs[n]).ljust(14) for n in names) + " |")
    sched = summary["schedule"]
    if sched:
        share = sched["share_of_log_speedup"]
        print(
            f"\nadaptive completion schedule: x{sched['factor']:.2f} of BPPO's speedup"
            + (f" ({100 * share:.0f}% of the log-speedup)" if share is not None else "")
        )
    tol = summary["acc_tol"]
    for name in names:
        if name == "grpo":
            continue
        r = runs[name]
        speed = (
            "not measurable (a run did not reach the target)"
            if r["speedup_time"] is None
            else f"{r['speedup_time']:.2f}x faster in time"
        )
        acc = (
            f"final greedy accuracy {r['eval_after']['accuracy']:.3f} vs GRPO "
            f"{runs['grpo']['eval_after']['accuracy']:.3f}: |diff| {abs(r['final_accuracy_diff']):.3f} "
            f"{'<=' if r['equal_final_accuracy'] else '>'} tolerance {tol:.3f} -> "
            f"{'equal' if r['equal_final_accuracy'] else 'NOT equal'}"
        )
        print(
            f"{name}: {speed}; {acc}; target (>= 3x with equal final accuracy): "
            f"{'met' if r['target_met'] else 'NOT met'}"
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
    if args.steps < 1 or args.window < 1:
        parser.error(f"--steps ({args.steps}) and --window ({args.window}) must be >= 1")
    if args.acc_tol < 0:
        parser.error(f"--acc-tol ({args.acc_tol}) must be >= 0")
    if args.from_json:
        resummarize(args)
        return 0

    import torch

    from tasks.core.stage import seed_everything

    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    setting = load_setting(args)
    cfg = with_overrides(setting.cfg, args)
    members = args.members or cfg.members
    if isinstance(members, str) and members not in ("dae", "all"):
        try:
            members = [int(x) for x in members.split(",")]
        except ValueError:
            parser.error(f"--members {args.members!r}: expected dae, all or comma-separated exit layers")
    configs = {
        "grpo": {"algorithm": "grpo"},
        "bppo": {"algorithm": "bppo", "bppo": cfg.bppo.model_copy(update={"adaptive_budget": True})},
        "bppo-fixed": {"algorithm": "bppo", "bppo": cfg.bppo.model_copy(update={"adaptive_budget": False})},
    }
    print(
        f"rl settings: G={cfg.group_size}, prompts/step={cfg.prompts_per_step}, "
        f"max_new_tokens={cfg.max_new_tokens}, lr={cfg.lr}, loss={cfg.loss_type}, "
        f"prefix={cfg.bppo.prefix_rule}, members={members}, steps={args.steps}, threads={args.threads}"
    )
    results = run_all(
        setting.base, setting.tokenizer, setting.rows, cfg, configs, args.steps, args.seed, members
    )
    summary = summarize(results, args.window, args.target, args.target_frac, args.acc_tol)
    summary.update(
        setting=setting.description,
        steps=args.steps,
        seed=args.seed,
        rl=cfg.model_dump(),
        members_spec=members,
        threads=args.threads,
        curves={n: {f"exit_{d}": m["history"] for d, m in r["members"].items()} for n, r in results.items()},
    )
    print_report(summary, setting.description)
    if args.json:
        from tasks.core.files import write_json

        write_json(args.json, summary)
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
    parser.add_argument(
        "--steps",
        type=int,
        default=60,
        help="training steps (generation batches) per run; steps "
        "without gradient are not counted as optimizer steps to the target",
    )
    parser.add_argument(
        "--window", type=int, default=10, help="moving-average window of the reward (capped at --steps)"
    )
    parser.add_argument(
        "--target", type=float, default=None, help="target moving-average reward (default: see --target-frac)"
    )
    parser.add_argument(
        "--target-frac",
        type=float,
        default=0.8,
        help="default target: this fraction of the way "
        "from GRPO's first window to the best moving average every run reaches",
    )
    parser.add_argument(
        "--acc-tol",
        type=float,
        default=0.02,
        help="final greedy accuracies within this absolute "
        "difference of GRPO's count as equal (default 0.02)",
    )
    parser.add_argument(
        "--from-json",
        default=None,
        metavar="FILE",
        help="re-summarise the curves saved by an earlier --json run (no training)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--members",
        default=None,
        help="rl.members override: dae | all | comma-separated exit "
        "layers (e.g. 2,4); every trained member is reported",
    )
    parser.add_argument("--prompts-per-step", type=int, default=None)
    parser.add_argument("--group-size", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--prefix-rule", choices=["fraction", "first_k", "common"], default=None)
    parser.add_argument("--prefix-fraction", type=float, default=None)
    parser.add_argument("--prefix-k", type=int, default=None)
    parser.add_argument("--eval-prompts", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--json", default=None, help="also write the summary as JSON to this file")
    return parser


def resummarize(args: argparse.Namespace) -> None:
    """`--from-json`: the summary of the curves saved by an earlier `--json` run, without training."""
    saved = json.loads(Path(args.from_json).read_text())
    results = {}
    for name, curves in saved["curves"].items():
        if isinstance(curves, list):  # a file from before per-member reports: one member
            run = saved["runs"][name]
            results[name] = {
                "members": {
                    "?": {"history": curves, "before": run["eval_before"], "after": run["eval_after"]}
                }
            }
        else:
            results[name] = {
                "members": {
                    key.removeprefix("exit_"): {
                        "history": hist,
                        "before": saved["members"][key]["runs"][name]["eval_before"],
                        "after": saved["members"][key]["runs"][name]["eval_after"],
                    }
                    for key, hist in curves.items()
                }
            }
    summary = summarize(results, args.window, args.target, args.target_frac, args.acc_tol)
    print_report(summary, saved["setting"] + f" (re-summarised from {args.from_json})")


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
    bppo_update = {
        k: v
        for k, v in {
            "prefix_rule": args.prefix_rule,
            "prefix_fraction": args.prefix_fraction,
            "prefix_k": args.prefix_k,
        }.items()
        if v is not None
    }
    return cfg.model_copy(update={**update, "bppo": cfg.bppo.model_copy(update=bppo_update)})


if __name__ == "__main__":
    raise SystemExit(main())
