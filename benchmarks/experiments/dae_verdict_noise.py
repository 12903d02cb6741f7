"""Issue 10's DaE and SVD verdicts against the noise of their 200 eval problems.

    python benchmarks/experiments/dae_verdict_noise.py [--params params.yaml] [--boot 4000] [--seed 0]
        [--threads 1] [--json out.json]

The compress stage scores the DaE member greedily on the first `compress.accuracy_problems` eval
problems in three states: before DaE (family_sft's member, no blocks), dense (rl's output) and
decomposed (compress's output). The run's summary judges two targets on them: the DaE gain (dense -
before) of at least 10 points, and the share of it the decomposition keeps, `gain_retained` (`(svd -
before) / (dense - before)`, `tasks.compress.gain_retained`), of at least 0.95 (`flows.report.TARGETS`).
This script decodes the three states again, keeps each problem's verdict, and resamples the problems
(`--boot` times, the three states paired on the same problems). It prints each figure with its 95%
bootstrap interval, the share of resamples that miss the target, and how many problems each pair of
states answers differently. The accuracies are compared with the workspace's `metrics/compress.json`.

Run it in a workspace that ran the text pipeline through compress (artifacts/family_sft, rl, compress
and data/validated/eval.jsonl). Figures: benchmarks/RESULTS.md ("Issue 10's DaE and SVD verdicts on
200 problems").
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from paired_bootstrap import add_arguments, check_arguments  # noqa: E402

from data_contracts.bootstrap import interval95, resamples  # noqa: E402

STATES = {"before_dae": "family_sft", "dense": "rl", "decomposed": "compress"}  # state -> stage output


def resample(correct: dict[str, np.ndarray], boots: int, seed: int) -> dict[str, np.ndarray]:
    """The DaE gain and `gain_retained` over `boots` resamples of the problems (paired: every state on
    the same problems); NaN where a resample has no gain to retain."""
    from tasks.compress import gain_retained

    b, d, s = (np.asarray(correct[k], dtype=float) for k in STATES)
    gains, kept = np.empty(boots), np.empty(boots)
    for k, i in enumerate(resamples(len(b), boots, seed)):
        before, dense, svd = b[i].mean(), d[i].mean(), s[i].mean()
        gains[k] = dense - before
        r = gain_retained(before, dense, svd)
        kept[k] = np.nan if r is None else r
    return {"gain": gains, "gain_retained": kept}


def summarise(
    correct: dict[str, np.ndarray], draws: dict[str, np.ndarray], targets: dict[str, float]
) -> dict:
    """Each figure, its 95% interval, the share of resamples below its target, and the disagreements."""
    from tasks.compress import gain_retained

    acc = {k: float(np.mean(correct[k])) for k in STATES}
    point = {
        "gain": acc["dense"] - acc["before_dae"],
        "gain_retained": gain_retained(acc["before_dae"], acc["dense"], acc["decomposed"]),
    }
    out: dict = {"accuracy": acc, "problems": len(correct["dense"])}
    for name, target in targets.items():
        x = draws[name][~np.isnan(draws[name])]
        lo, hi = interval95(x)
        out[name] = {
            "value": point[name],
            "target": target,
            "ci95": [lo, hi],
            "p_below_target": float((x < target).mean()),
            "decided": lo >= target or hi < target,
        }
    pairs = (("before_dae", "dense"), ("dense", "decomposed"))
    out["answered_differently"] = {
        f"{a} vs {c}": int((np.asarray(correct[a]) != np.asarray(correct[c])).sum()) for a, c in pairs
    }
    return out


def decode_correct(
    model, tokenizer, exit_layer: int, problems: Sequence[dict], max_new_tokens: int
) -> np.ndarray:
    """Each problem's greedy exact match at `exit_layer`, decoded as the compress stage decodes it."""
    from ruyi_model.decoding import greedy_generate

    texts = greedy_generate(
        model, tokenizer, [str(p["question"]) for p in problems], exit_layer, max_new_tokens, batch_size=32
    )
    return verdicts(texts, problems)


def verdicts(texts: Sequence[str], problems: Sequence[dict]) -> np.ndarray:
    """Exact match of each response's final answer (`#### <number>`) with its problem's, as
    `tasks.compress.member_accuracy` counts it."""
    from tasks.data.mathgen import answers_match, extract_answer

    return np.array(
        [answers_match(extract_answer(t), str(p["answer"])) for p, t in zip(problems, texts, strict=True)],
        dtype=bool,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml", help="the text params file of the workspace")
    add_arguments(ap, boot=4000, items="problems")
    ap.add_argument("--json", default=None, help="also write the figures and each problem's verdicts here")
    args = ap.parse_args(argv)
    check_arguments(ap, args)

    import torch

    from flows.report import TARGETS
    from tasks.core.artifacts import load_family
    from tasks.core.files import read_jsonl
    from tasks.core.params import ParamsError, load_params
    from tasks.core.paths import Workspace

    torch.set_num_threads(args.threads)
    try:
        params = load_params(Path(args.params))
    except ParamsError as e:
        ap.error(str(e))
    if params.model.modality != "text":
        ap.error(f"--params {args.params}: model.modality is {params.model.modality!r}; DaE is text-only")
    ws = Workspace.from_params(params)
    for stage in STATES.values():
        if not (ws.artifacts(stage) / "config.json").is_file():
            ap.error(f"{ws.artifacts(stage)}: no family checkpoint (run the pipeline through compress first)")
    cfg, d = params.compress, params.dae_exit
    problems = read_jsonl(ws.validated_file("eval.jsonl"), required=("question", "answer"))[
        : cfg.accuracy_problems
    ]
    correct = {}
    for state, stage in STATES.items():
        model, tokenizer = load_family(ws.artifacts(stage))
        correct[state] = decode_correct(model.eval(), tokenizer, d, problems, cfg.max_new_tokens)
    targets = {"gain": TARGETS["dae_gain"], "gain_retained": TARGETS["svd_gain_retained"]}
    summary = summarise(correct, resample(correct, args.boot, args.seed), targets)
    recorded_path = ws.metrics_dir / "compress.json"
    recorded = json.loads(recorded_path.read_text())["dae_control"] if recorded_path.is_file() else {}
    print(f"DaE member (exit {d}) on {summary['problems']} eval problems, greedy:")
    for state in STATES:
        line = f"  {state:>10}: {summary['accuracy'][state]:.1%}"
        if state in recorded:
            line += f" (metrics/compress.json: {recorded[state]['accuracy']:.1%})"
        print(line)
    for name in targets:
        f = summary[name]
        lo, hi = f["ci95"]
        scale = 100 if name == "gain" else 1
        unit = " points" if name == "gain" else ""
        print(
            f"  {name}: {f['value'] * scale:.3g}{unit}, 95% [{lo * scale:.3g}, {hi * scale:.3g}], target "
            f">= {f['target'] * scale:g}{unit}: below it in {f['p_below_target']:.0%} of the resamples, "
            f"{'decided' if f['decided'] else 'undecided'}"
        )
    print(
        "  answered differently: " + ", ".join(f"{k} {v}" for k, v in summary["answered_differently"].items())
    )
    if args.json:
        payload = {**summary, "verdicts": {k: v.astype(int).tolist() for k, v in correct.items()}}
        Path(args.json).write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
