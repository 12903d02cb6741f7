"""What rl does to its member where it can be seen: greedy accuracy on three slices every n steps.

    python benchmarks/experiments/rl_slices.py --seed 0                      # in a recorded run's directory
    python benchmarks/experiments/rl_slices.py --seed 1 --set rl.lr=3e-4 --set rl.algorithm=grpo --json o.json
    python benchmarks/experiments/rl_slices.py --seed 0 --control sft   # the same steps, gold chains

Runs the rl stage's own trainer (`tasks.training.rl_trainer.RLTrainer`, params.yaml with `--set`
overrides, `--seed` as the stage's `seed`) from `artifacts/sft` without checkpoint selection, and
every `--every` steps (and at step 0) scores the RL-trained members greedily (`evaluate_members`, as
the stage) on: rl's held-out slice (the last `rl.eval_prompts` rows of rl.jsonl), the first `--select`
rows of select.jsonl (the split `rl.select_prompts` selects on) and the first `--eval` rows of
eval.jsonl (what evaluate and compress's DaE control report). Prints one line per point and writes the
three curves as JSON. Figures: benchmarks/RESULTS.md ("rl measured where it can be seen").

`--control sft` replaces rl by its supervised control: the same trainable parameters, optimizer
(AdamW at `rl.lr`, no weight decay, `rl.grad_clip`) and number of steps, each step the assistant-token
loss of `rl.prompts_per_step` gold chats drawn from sft.jsonl (the member's own SFT data; `--control
eval` draws from the eval problems' gold solutions instead, which makes the eval slice a training slice).
It answers whether a fall on select comes from rl's reward or from any further training of the member.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml", help="params file of the run (default: params.yaml)")
    ap.add_argument("--seed", type=int, required=True, help="the stage's seed (rl sampling)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="params override")
    ap.add_argument("--every", type=int, default=10, help="steps between evaluations (default 10)")
    ap.add_argument("--select", type=int, default=200, help="rows of select.jsonl (default 200)")
    ap.add_argument("--eval", type=int, default=200, help="rows of eval.jsonl (default 200)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--json", type=Path, help="write the curves here")
    ap.add_argument(
        "--control",
        choices=["sft", "eval"],
        help="train on gold chats of sft.jsonl (or of eval.jsonl) instead of rl: the supervised control",
    )
    args = ap.parse_args(argv)

    import torch

    from tasks.core.files import read_jsonl
    from tasks.core.params import load_params
    from tasks.core.paths import Workspace
    from tasks.core.stage import parse_overrides
    from tasks.rl import _load_inputs
    from tasks.training.rl_trainer import (
        RLTrainer,
        evaluate_members,
        load_select_rows,
        trainable_parameters,
    )

    torch.set_num_threads(args.threads)
    overrides = {**parse_overrides(args.set), "seed": args.seed, "rl.select_prompts": 0}
    params = load_params(args.params, overrides)
    cfg, ws = params.rl, Workspace.from_params(params)
    inputs = _load_inputs(params)
    model, tokenizer, members = inputs.model, inputs.tokenizer, inputs.members
    solution = ("solution",) if args.control == "eval" else ()
    eval_rows = read_jsonl(ws.eval_data, required=("id", "question", "answer", *solution))
    slices = {
        "held": inputs.eval_rows,
        "select": load_select_rows(ws.validated_file("select.jsonl"), args.select),
        "eval": [
            {"id": r["id"], "question": r["question"], "answer": r["answer"]} for r in eval_rows[: args.eval]
        ],
    }
    trainable = trainable_parameters(model, cfg.members, members)
    if args.control == "sft":
        gold = read_jsonl(ws.sft_data, required=("id", "prompt", "response"))
        trainer = SupervisedControl(model, tokenizer, gold, str(ws.sft_data), params, members, trainable)
    elif args.control == "eval":
        gold = [{"id": r["id"], "prompt": r["question"], "response": r["solution"]} for r in eval_rows]
        trainer = SupervisedControl(model, tokenizer, gold, str(ws.eval_data), params, members, trainable)
    else:
        trainer = RLTrainer(
            model, tokenizer, inputs.train_rows, cfg, members=members, trainable=trainable, seed=params.seed
        )
    curves: dict[str, list] = {"step": [], **{name: [] for name in slices}}

    def score() -> None:
        t0 = time.perf_counter()
        curves["step"].append(trainer.step_index)
        for name, rows in slices.items():
            result = evaluate_members(model, tokenizer, rows, members, cfg.max_new_tokens, cfg.format_reward)
            curves[name].append(sum(result[d]["accuracy"] for d in members) / len(members))
        points = "  ".join(f"{name} {curves[name][-1]:.3f}" for name in slices)
        print(f"step {trainer.step_index:4d}  {points}  ({time.perf_counter() - t0:.1f} s)", flush=True)

    score()
    while trainer.step_index < cfg.steps:
        trainer.step()
        if trainer.step_index % args.every == 0 or trainer.step_index == cfg.steps:
            score()
    if args.json:
        rows = {name: len(rows) for name, rows in slices.items()}
        out = {"seed": args.seed, "set": args.set, "control": args.control, "rows": rows, "curves": curves}
        args.json.write_text(json.dumps(out, indent=1))
    return 0


class SupervisedControl:
    """rl's supervised control: `step()` takes one AdamW step (as `RLTrainer`: `rl.lr`, no weight decay,
    `rl.grad_clip`) on the mean assistant-token loss of the members over `rl.prompts_per_step` of the
    gold chats `rows` ({"prompt", "response"}; `where` names their file in errors), drawn with the
    stage's seed."""

    def __init__(self, model, tokenizer, rows: list[dict], where: str, params, members: list[int], trainable):
        import torch

        from tasks.training.batches import build_sft_examples
        from tasks.training.loop import member_loss_fn

        self.examples, _ = build_sft_examples(tokenizer, rows, params.sft.seq_len, where)
        self.model, self.cfg = model, params.rl
        self.losses = [member_loss_fn(d) for d in members]
        self.params = [p for _, p in trainable]
        self.optimizer = torch.optim.AdamW(self.params, lr=self.cfg.lr, weight_decay=0.0)
        self.generator = torch.Generator().manual_seed(params.seed)
        self.step_index = 0

    def step(self) -> None:
        import torch

        from tasks.training.batches import trim_batch

        n = self.examples["input_ids"].shape[0]
        idx = torch.randint(n, (self.cfg.prompts_per_step,), generator=self.generator)
        batch = trim_batch({k: v[idx] for k, v in self.examples.items()})
        self.model.train()
        loss = sum(fn(self.model, batch, self.step_index)[0] for fn in self.losses) / len(self.losses)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.optimizer.step()
        self.step_index += 1


if __name__ == "__main__":
    raise SystemExit(main())
