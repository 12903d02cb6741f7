"""Self-speculative decoding against the deepest member's own decoding, side by side in one run.

    python benchmarks/experiments/speculative.py [MODEL_DIR] [--num-prompts 100] [--drafts 2,5]
        [--k 4,16] [--thresholds 0,0.95] [--draft-blocks on,off] [--max-new-tokens 64] [--json spec.json]
        [--temperature 0.7]                                         # sampling instead of greedy
    python benchmarks/experiments/speculative.py --random-init      # smoke run, no trained model needed

MODEL_DIR is a family checkpoint (default: artifacts/compress, else artifacts/export/family). The
workload is the pipeline's own: the first --num-prompts eval.jsonl questions in the chat template,
greedy, batch 1, stopping at the tokenizer's stop tokens as `evaluate` and the served tiers do
(--no-eos: fixed-length runs that continue past the answer, the workload of the earlier measurements).

Configurations, interleaved prompt by prompt (the order rotated per prompt; a shared machine is noisy):
- `generate@L`, the deepest member's `generate(exit_layer=L, do_sample=False)`: the control;
- `loop@L`, the deepest member alone in speculative decoding's own loop (rounds of no drafts): what the
  loop costs or saves before any drafting (the same loop for every speculative configuration);
- `spec d/k/t`: member d drafts up to k tokens per round, a round stopping after a draft the member
  gives a probability below t (t = 0: always k), the deepest member verifies; `spec d-dae/k/t`: the
  same with member d drafting without its DaE blocks (`draft_blocks=False`; listed only for a member
  that has blocks).
Per configuration: tokens/s, speed-up over `generate@L` and over `loop@L`, the acceptance rate, drafts
per committed token, committed tokens per verification forward, accuracy (exact numeric match) and
whether every completion equals the control's (greedy speculative decoding must: the exit status is 1
otherwise). With --temperature T > 0 every configuration samples at T (top-k and top-p off; seeded per
prompt): `generate@L` plain sampling, the speculative ones speculative sampling, whose law is the
deepest member's (tested in tests/unit/test_speculative.py) but whose samples differ, so the completions
are not compared; accuracy is then that of one sample per problem. Method: docs/choices.md#benchmarks;
figures: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
for path in (REPO, HERE):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from early_exit import Workload, pipeline_workload, run_generate  # noqa: E402

DEFAULT_DIRS = ("artifacts/compress", "artifacts/export/family")


@dataclass
class Config:
    """`generate` (the control), `loop` (the deepest member in speculative decoding's loop, no drafts)
    or `spec` (member `draft` drafts up to `k` tokens, gated at `threshold`)."""

    kind: str
    draft: int | None = None
    k: int | None = None
    threshold: float | None = None
    blocks: bool = True

    def name(self, deepest: int) -> str:
        if self.kind == "spec":
            return f"spec {self.draft}{'' if self.blocks else '-dae'}/{self.k}/{self.threshold:g}"
        return f"{self.kind}@{deepest}"


def run_loop(
    model, prompt: list[int], max_new: int, stops: set[int], temperature: float = 0.0, seed: int = 0
) -> list[int]:
    """The deepest member alone through `SpeculativeState`'s rounds with no drafts (the state is built
    for the member with the fewest layers of its own, which then holds no backlog to carry); greedy, or
    sampling at `temperature` > 0."""
    from ruyi_model.speculative import SpeculativeState

    deepest = set(map(id, model.member_layers(model.config.exit_layers[-1])))
    member = min(
        model.config.exit_layers[:-1],
        key=lambda d: sum(id(layer) not in deepest for layer in model.member_layers(d)),
    )
    state = SpeculativeState(model, member, **sampling_kwargs(temperature, seed))
    state.prefill(prompt)
    return [t for new, _, _ in state.rounds(max_new, 0, stops=stops) for t in new]


def sampling_kwargs(temperature: float, seed: int) -> dict:
    """`SpeculativeState` / `speculative_generate` arguments: greedy at 0, else seeded sampling."""
    if not temperature:
        return {}
    return {"do_sample": True, "temperature": temperature, "generator": torch.Generator().manual_seed(seed)}


def run_config(
    config: Config,
    model,
    prompt: list[int],
    max_new: int,
    workload: Workload,
    temperature: float = 0.0,
    seed: int = 0,
) -> dict:
    """One prompt under one configuration: its new tokens, seconds and draft counts (0 for the controls);
    greedy, or sampling at `temperature` seeded with `seed`."""
    from ruyi_model import speculative_generate

    ids = torch.tensor([prompt])
    counts = {"proposed": 0, "accepted": 0, "verifies": 0}
    with torch.inference_mode():
        if config.kind == "generate":
            torch.manual_seed(seed)  # generate samples from torch's global RNG
            new, seconds, _ = run_generate(
                model,
                ids,
                model.config.exit_layers[-1],
                max_new,
                workload.stop_ids,
                workload.pad_id,
                temperature,
            )
            return {"new": new, "seconds": seconds, **counts}
        start = time.perf_counter()
        if config.kind == "loop":
            new = run_loop(model, prompt, max_new, set(workload.stop_ids), temperature, seed)
        else:
            out = speculative_generate(
                model,
                ids,
                draft_exit=config.draft,
                k=config.k,
                max_new_tokens=max_new,
                eos_token_id=sorted(workload.stop_ids) or None,
                draft_threshold=config.threshold or None,
                draft_blocks=config.blocks,
                **sampling_kwargs(temperature, seed),
            )
            new = out.new_tokens
            counts = {"proposed": out.proposed, "accepted": out.accepted, "verifies": out.target_forwards}
        return {"new": new, "seconds": time.perf_counter() - start, **counts}


def random_family(hidden: int, exits: list[int], num_prompts: int):
    from ruyi_model import FamilialConfig, FamilialForCausalLM

    cfg = FamilialConfig(
        vocab_size=512,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=exits[-1],
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 128),
        head_dim=64,
        max_position_embeddings=2048,
        exit_layers=exits,
        # as the tiny profile's DaE member: 2 blocks on the shallowest
        dae_blocks=[2] + [0] * (len(exits) - 1),
    )
    torch.manual_seed(0)
    model = FamilialForCausalLM(cfg).eval()
    prompts = [torch.randint(4, 512, (24,)).tolist() for _ in range(num_prompts)]
    return model, Workload("agreement with the deepest member", prompts, [], 0, lambda i, new: None)


def load(args):
    """(model, workload, source): the checkpoint and its eval prompts, or a random-init family."""
    if args.random_init:
        exits = [int(x) for x in args.random_exits.split(",")]
        model, workload = random_family(args.hidden, exits, args.num_prompts)
        return model, workload, "random-init"
    from tasks.core.artifacts import load_family

    candidates = [args.model_dir] if args.model_dir else [REPO / p for p in DEFAULT_DIRS]
    path = next((Path(p) for p in candidates if (Path(p) / "config.json").is_file()), None)
    if path is None:
        sys.exit(
            f"no family checkpoint in {[str(c) for c in candidates]} (run the pipeline, pass MODEL_DIR, "
            "or use --random-init)"
        )
    model, tokenizer = load_family(path)
    model.eval()
    workload = pipeline_workload(path, tokenizer, args.num_prompts, args.eval_file)
    return model, workload, str(path)


def measure(
    model, workload: Workload, configs: list[Config], max_new: int, temperature: float = 0.0
) -> list[dict]:
    from tqdm.auto import tqdm

    totals = [
        {
            "seconds": 0.0,
            "tokens": 0,
            "proposed": 0,
            "accepted": 0,
            "verifies": 0,
            "correct": 0,
            "scored": 0,
            "outputs": [],
        }
        for _ in configs
    ]
    order = list(range(len(configs)))
    for i, prompt in enumerate(tqdm(workload.prompts, desc="prompts x configurations", leave=False)):
        shift = i % len(configs)
        for c in order[shift:] + order[:shift]:
            r = run_config(configs[c], model, prompt, max_new, workload, temperature, seed=i)
            t = totals[c]
            t["seconds"] += r["seconds"]
            t["tokens"] += len(r["new"])
            for key in ("proposed", "accepted", "verifies"):
                t[key] += r[key]
            t["outputs"].append(r["new"])
            verdict = workload.scorer(i, r["new"])
            if verdict is not None:
                t["scored"] += 1
                t["correct"] += bool(verdict)
    return totals


def table(configs: list[Config], totals: list[dict], deepest: int, sampled: bool = False) -> list[dict]:
    """Prints and returns one row per configuration; `same_tokens` is None for sampled runs (their
    completions are draws, not a deterministic output to compare)."""
    base, loop = totals[0], totals[1]
    base_tps, loop_tps = base["tokens"] / base["seconds"], loop["tokens"] / loop["seconds"]
    header = (
        f"{'configuration':<22} {'tok/s':>8} {'x gen':>6} {'x loop':>6} {'accept':>7} {'drafts/tok':>10} "
        f"{'tok/verify':>10} {'acc':>6} same"
    )
    print(header)
    print("-" * len(header))
    rows = []
    for config, t in zip(configs, totals):
        tps = t["tokens"] / t["seconds"]
        row = {
            "configuration": config.name(deepest),
            "kind": config.kind,
            "draft_exit": config.draft,
            "k": config.k,
            "draft_threshold": config.threshold,
            "draft_blocks": config.blocks,
            "tokens": t["tokens"],
            "tokens_per_s": round(tps, 2),
            "speedup_vs_generate": round(tps / base_tps, 3),
            "speedup_vs_loop": round(tps / loop_tps, 3),
            "acceptance_rate": round(t["accepted"] / t["proposed"], 4) if t["proposed"] else None,
            "drafts_per_token": round(t["proposed"] / t["tokens"], 3) if config.kind == "spec" else None,
            "tokens_per_verify": round(t["tokens"] / t["verifies"], 3) if t["verifies"] else None,
            "accuracy": t["correct"] / t["scored"] if t["scored"] else None,
            "same_tokens": None if sampled else t["outputs"] == base["outputs"],
        }
        rows.append(row)

        def fmt(value, spec):
            return "-" if value is None else format(value, spec)

        print(
            f"{row['configuration']:<22} {tps:8.1f} {row['speedup_vs_generate']:6.2f} "
            f"{row['speedup_vs_loop']:6.2f} {fmt(row['acceptance_rate'], '.3f'):>7} "
            f"{fmt(row['drafts_per_token'], '.2f'):>10} {fmt(row['tokens_per_verify'], '.2f'):>10} "
            f"{fmt(row['accuracy'], '.3f'):>6} {fmt(row['same_tokens'], '')}"
        )
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", nargs="?", help=f"family checkpoint dir (default: first of {DEFAULT_DIRS})")
    ap.add_argument("--eval-file", type=Path, default=REPO / "data" / "validated" / "eval.jsonl")
    ap.add_argument("--num-prompts", type=int, default=100, help="first eval.jsonl questions (default 100)")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="per prompt (evaluate's budget: 64)")
    ap.add_argument(
        "--drafts", default=None, help="comma-separated drafting members (default: every shallow one)"
    )
    ap.add_argument("--k", default="4,16", help="comma-separated most drafts per round")
    ap.add_argument(
        "--thresholds", default="0,0.95", help="comma-separated draft confidence gates (0: always k drafts)"
    )
    ap.add_argument(
        "--draft-blocks",
        default="on,off",
        help="comma-separated on/off: draft with the member's DaE blocks, without them, or both (default)",
    )
    ap.add_argument("--no-eos", action="store_true", help="fixed-length runs: no stop tokens")
    ap.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="0: greedy (default; completions must equal the control's); > 0: every configuration samples "
        "at this temperature, seeded per prompt (completions not compared)",
    )
    ap.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (default 1: steadier timings)"
    )
    ap.add_argument(
        "--random-init",
        action="store_true",
        help="random family (2 DaE blocks on its shallowest member) instead of a checkpoint",
    )
    ap.add_argument("--random-exits", default="2,4,8", help="member depths of the --random-init family")
    ap.add_argument("--hidden", type=int, default=128, help="width of the --random-init family")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    for name in ("num_prompts", "max_new_tokens", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    try:
        args.k_values = [int(x) for x in args.k.split(",")]
        args.threshold_values = [float(x) for x in args.thresholds.split(",")]
        args.draft_values = [int(x) for x in args.drafts.split(",")] if args.drafts else None
    except ValueError as exc:
        ap.error(f"--k, --thresholds and --drafts are comma-separated numbers: {exc}")
    if any(k < 1 for k in args.k_values):
        ap.error(f"--k values must be >= 1, got {args.k}")
    if not 0 <= args.temperature <= 10:
        ap.error(f"--temperature must be in [0, 10] (0: greedy), got {args.temperature}")
    if any(not 0 <= t <= 1 for t in args.threshold_values):
        ap.error(f"--thresholds must be in [0, 1], got {args.thresholds}")
    switch = {"on": True, "off": False}
    words = args.draft_blocks.split(",")
    if any(w not in switch for w in words):
        ap.error(f"--draft-blocks takes on, off or on,off, got {args.draft_blocks!r}")
    args.block_values = [switch[w] for w in dict.fromkeys(words)]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    model, workload, source = load(args)
    exits = list(model.config.exit_layers)
    drafts = args.draft_values or exits[:-1]
    bad = [d for d in drafts if d not in exits[:-1]]
    if bad:
        sys.exit(f"--drafts {bad}: a drafting member must be shallower than the deepest, one of {exits[:-1]}")
    if args.no_eos:
        workload.stop_ids = []
    configs = [Config("generate"), Config("loop")] + [
        Config("spec", d, k, t, blocks)
        for d in drafts
        for blocks in args.block_values
        if blocks or model.config.num_dae_blocks(d)  # without blocks, a member without any is itself
        for k in args.k_values
        for t in args.threshold_values
    ]
    if len(configs) == 2:
        sys.exit(f"--draft-blocks off: none of the drafting members {drafts} has DaE blocks")
    warm = workload.prompts[0]
    for config in configs:  # first calls pay for lazy imports and allocator growth
        run_config(config, model, warm, 4, workload, args.temperature)
    totals = measure(model, workload, configs, args.max_new_tokens, args.temperature)
    decoding = f"sampling at T = {args.temperature:g}" if args.temperature else "greedy"
    print(
        f"\nmodel: {source}; members {exits}; {len(workload.prompts)} prompts, <= {args.max_new_tokens} new "
        f"tokens, {'no stop tokens' if args.no_eos else 'stop tokens on'}, batch 1, {decoding}, "
        f"{args.threads} thread(s)\nmachine: {platform.machine()} {os.cpu_count()} cores, "
        f"torch {torch.__version__}; accuracy = {workload.name}"
    )
    rows = table(configs, totals, exits[-1], sampled=bool(args.temperature))
    if args.json:
        args.json.write_text(
            json.dumps(
                {"model": source, "workload": workload.name, "temperature": args.temperature, "rows": rows},
                indent=2,
            )
        )
    lossy = [r["configuration"] for r in rows if r["same_tokens"] is False]
    if lossy:
        print(f"NOT LOSSLESS: {lossy} differ from generate@{exits[-1]}")
    return 1 if lossy else 0


if __name__ == "__main__":
    sys.exit(main())
