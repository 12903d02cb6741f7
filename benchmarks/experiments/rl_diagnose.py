"""Why the rl stage does or does not move held-out greedy accuracy: where the RL-trained member stands
on the RL prompts before RL, and what an RL run with given settings does to the eval and train slices.

    python benchmarks/experiments/rl_diagnose.py                    # artifacts/sft + data/validated/rl.jsonl
    python benchmarks/experiments/rl_diagnose.py --sft DIR --data FILE --params FILE --samples 16
    python benchmarks/experiments/rl_diagnose.py --train --seed 0 --set lr=1e-3 --set bppo.prefix_k=1
    python benchmarks/experiments/rl_diagnose.py --train --mid 0.1 --set algorithm=grpo
    python benchmarks/experiments/rl_diagnose.py --train --fresh 2700 --eval-data data/validated/eval.jsonl \
        --no-train-eval --set steps=150 --set algorithm=grpo --set lr=5.0e-4 --eval-every 50

Without `--train` it prints, for the member `rl.members` selects, on the held-out slice (the last
`rl.eval_prompts` rows, as the stage) and the train slice: greedy accuracy per kind of problem (the
operation the generator's template asks for), and the per-prompt pass rate of `--samples` samples at
each `--temperatures` (the stage's own sampler): how many prompts are all wrong / all right (no RL
signal in a group) and how many greedy-wrong prompts are ever sampled right. With `--train` it runs
the stage's `RLTrainer` (params.yaml `rl` with `--set` overrides) from the same start and prints the
greedy accuracy on both slices every `--eval-every` steps; `--mid P` trains only on the train prompts
whose pass rate (first temperature) is in [P, 1 - P] (a difficulty filter); `--fresh N` adds N newly
generated problems to the train prompts (no prompt repeats within the run) and `--eval-data` the eval
split to the held-out slice. Figures: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def kind(question: str) -> str:
    """The operation a level-1 generator template asks for (by its wording)."""
    if "older" in question:
        return "add (older)"
    if "equally" in question:
        return "div (shares)"
    if "each" in question:
        return "mul (buys each)"
    return "other"


def pass_rates(model, tok, rows, member, samples, temperature, max_new_tokens, seed):
    """Per prompt: the fraction of `samples` samples (the stage's sampler) with the exact answer."""
    import torch

    from ruyi_model.decoding import stop_token_ids
    from tasks.training.rl_algos import (
        decode_completions,
        encode_chat_prompts,
        sample_completions,
        score_responses,
    )

    gen, out = torch.Generator().manual_seed(seed), []
    for i in range(0, len(rows), 16):
        chunk = rows[i : i + 16]
        ids, mask = encode_chat_prompts(tok, [r["question"] for r in chunk])
        ids, mask = ids.repeat_interleave(samples, 0), mask.repeat_interleave(samples, 0)
        comp, cmask, _ = sample_completions(
            model,
            ids,
            mask,
            exit_layer=member,
            max_new_tokens=max_new_tokens,
            stop_ids=stop_token_ids(tok),
            pad_id=tok.pad_token_id,
            temperature=temperature,
            generator=gen,
            group_size=samples,
            share_prefill=True,
            compact=True,
        )
        texts = decode_completions(tok, comp, cmask)
        _, ok = score_responses(texts, [str(r["answer"]) for r in chunk for _ in range(samples)], 0.0)
        out += ok.view(-1, samples).float().mean(1).tolist()
    return out


def fresh_problems(n: int, rl_rows: list[dict], heldout: list[dict], sft_path: Path) -> list[dict]:
    """`n` generated level-1 problems (seed 777) sharing no question with sft/rl/held-out and no problem
    (`problem_key`) with the held-out slice (so training on them cannot leak held-out answers)."""
    from tasks.data.mathgen import generate_problems, normalize_question, problem_key

    sft = [json.loads(line)["prompt"] for line in sft_path.read_text().splitlines() if line.strip()]
    seen = {normalize_question(q) for q in [*sft, *(r["question"] for r in [*rl_rows, *heldout])]}
    held = {problem_key(r["question"]) for r in heldout}
    out: list[dict] = []
    for p in generate_problems(4 * n + 1000, [1], seed=777):
        if normalize_question(p.question) in seen or problem_key(p.question) in held:
            continue
        out.append({"id": f"fresh-{len(out)}", "question": p.question, "answer": p.answer, "level": 1})
        if len(out) == n:
            return out
    raise SystemExit(f"--fresh {n}: only {len(out)} new problems could be drawn")


def greedy_correct(model, tok, rows, member, max_new_tokens):
    from ruyi_model.decoding import greedy_generate
    from tasks.training.rl_algos import score_responses

    texts = greedy_generate(
        model, tok, [r["question"] for r in rows], exit_layer=member, max_new_tokens=max_new_tokens
    )
    return score_responses(texts, [str(r["answer"]) for r in rows], 0.0)[1].tolist()


def describe(name, rows, greedy, rates_by_t):
    by_kind = collections.defaultdict(lambda: [0, 0])
    for r, g in zip(rows, greedy):
        by_kind[kind(r["question"])][0] += int(g)
        by_kind[kind(r["question"])][1] += 1
    print(f"{name}: {len(rows)} prompts, greedy accuracy {sum(greedy) / len(rows):.3f}")
    for k, (c, n) in sorted(by_kind.items(), key=lambda kv: -kv[1][1]):
        print(f"  {k:16s} {n:4d} prompts  greedy {c / n:.3f}")
    for t, rates in rates_by_t.items():
        wrong = [p for p, g in zip(rates, greedy) if not g]
        print(
            f"  T={t}: mean pass {sum(rates) / len(rates):.3f}; all wrong {sum(p == 0 for p in rates)}, "
            f"all right {sum(p == 1 for p in rates)}, in between {sum(0 < p < 1 for p in rates)}; "
            f"greedy-wrong prompts sampled right at least once {sum(p > 0 for p in wrong)} of {len(wrong)}, "
            f"with pass >= 0.5 {sum(p >= 0.5 for p in wrong)}"
        )


def main(argv=None) -> int:
    import torch
    import yaml

    from tasks.core.artifacts import load_family
    from tasks.core.params import RLParams
    from tasks.core.stage import seed_everything
    from tasks.training.rl_trainer import (
        RLTrainer,
        load_rl_rows,
        resolve_members,
        split_rows,
        trainable_parameters,
    )

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sft", default="artifacts/sft")
    p.add_argument("--data", default="data/validated/rl.jsonl")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--samples", type=int, default=16, help="samples per prompt for the pass rates")
    p.add_argument("--temperatures", default="1.0", help="comma-separated sampling temperatures")
    p.add_argument("--train", action="store_true", help="run RL and evaluate both slices")
    p.add_argument("--set", action="append", default=[], help="rl override KEY=VALUE (bppo.KEY too)")
    p.add_argument("--mid", type=float, default=0.0, help="train only on prompts with pass in [P, 1-P]")
    p.add_argument("--eval-every", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="append the result as one JSON line to this file")
    p.add_argument(
        "--fresh",
        type=int,
        default=0,
        help="also train on N freshly generated level-1 problems (none shares a question with sft/rl/eval "
        "or a problem (problem_key) with the held-out slice), so that prompts need not repeat",
    )
    p.add_argument(
        "--eval-data",
        default=None,
        help="add this file's problems (e.g. data/validated/eval.jsonl) to the held-out slice",
    )
    p.add_argument("--sft-data", default="data/validated/sft.jsonl", help="the questions --fresh avoids")
    p.add_argument("--no-train-eval", action="store_true", help="evaluate only the held-out slice")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    raw = yaml.safe_load(Path(a.params).read_text())["rl"]
    for s in a.set:
        key, val = s.split("=", 1)
        val = yaml.safe_load(val)
        if isinstance(val, str):
            try:
                val = float(val)
            except ValueError:
                pass
        if key.startswith("bppo."):
            raw.setdefault("bppo", {})[key[5:]] = val
        else:
            raw[key] = val
    cfg = RLParams(**raw)
    rows = load_rl_rows(Path(a.data))
    train, heldout = split_rows(rows, cfg.eval_prompts, Path(a.data))
    if a.eval_data:
        heldout = heldout + load_rl_rows(Path(a.eval_data))
    if a.fresh:
        train = train + fresh_problems(a.fresh, rows, heldout, Path(a.sft_data))
        print(f"training on {len(train)} prompts ({a.fresh} freshly generated)")
    model, tok = load_family(Path(a.sft))
    member = resolve_members(model.config, cfg.members)[0]
    temps = [float(t) for t in a.temperatures.split(",")]
    result: dict = {"seed": a.seed, "set": a.set, "mid": a.mid}
    if not a.train or a.mid:
        rates = {}
        for name, rs in (("eval", heldout), ("train", train)):
            greedy = greedy_correct(model, tok, rs, member, cfg.max_new_tokens)
            rates[name] = {
                t: pass_rates(model, tok, rs, member, a.samples, t, cfg.max_new_tokens, a.seed) for t in temps
            }
            describe(name, rs, greedy, rates[name])
        if a.mid:
            first = rates["train"][temps[0]]
            train = [r for r, q in zip(train, first) if a.mid <= q <= 1 - a.mid]
            print(f"--mid {a.mid}: training on {len(train)} prompts")
            if not train:
                raise SystemExit(f"--mid {a.mid}: no train prompt has a pass rate in [{a.mid}, {1 - a.mid}]")
    if a.train:
        seed_everything(a.seed)
        members = [member]
        trainer = RLTrainer(
            model,
            tok,
            train,
            cfg,
            members=members,
            trainable=trainable_parameters(model, cfg.members, members),
            seed=a.seed,
        )

        def evaluate():
            return [
                sum(greedy_correct(model, tok, rs, member, cfg.max_new_tokens)) / len(rs)
                for rs in ((heldout,) if a.no_train_eval else (heldout, train))
            ] + ([float("nan")] if a.no_train_eval else [])

        curve, t0 = [[0, *evaluate()]], time.perf_counter()
        for step in range(1, cfg.steps + 1):
            trainer.step()
            if step % a.eval_every == 0 or step == cfg.steps:
                curve.append([step, *evaluate()])
                print(f"step {step}: greedy accuracy eval {curve[-1][1]:.3f}, train {curve[-1][2]:.3f}")
        hist = trainer.history[member]
        tenth = max(1, len(hist) // 10)
        result.update(
            sampled_reward_first=sum(h["reward"] for h in hist[:tenth]) / tenth,
            sampled_reward_last=sum(h["reward"] for h in hist[-tenth:]) / tenth,
        )
        result.update(
            curve=curve,
            gain=curve[-1][1] - curve[0][1],
            train_gain=curve[-1][2] - curve[0][2],
            train_time_s=trainer.elapsed_s,
            wall_s=time.perf_counter() - t0,
            steps_with_gradient=sum(h["has_gradient"] for h in hist),
            mean_kl=_mean([h["kl"] for h in hist if h["kl"] is not None]),  # measured steps (rl.kl_every)
        )
        print(json.dumps(result))
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(result) + "\n")
    return 0


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


if __name__ == "__main__":
    raise SystemExit(main())
