"""The privacy gate over the stage's own seed, on one vision tower: how often does the same tower pass?

    python benchmarks/experiments/privacy_gate_seeds.py --family artifacts/vl/rl [--params params.vl.yaml]
        [--seeds 1,2,3,4,5,6] [--jobs 2] [--out /tmp/privacy-gate-seeds] [--json gate_seeds.json]
        [--set KEY=VALUE ...]

Runs the privacy stage itself (`python -m tasks.privacy`: clips, mapping, attacks, the gate) once per
seed on the frozen vision tower of one family (`privacy.family_dir`). Each seed draws new clips (the
same identities rendered anew), a new mapping and new attackers; every other parameter is the params
file's (plus `--set`). Each seed writes under `--out/<seed>/` (the stage's paths overridden; the
family's tokenizer linked in for the cloud member when the family holds none), so the workspace is
untouched. A failed gate (the stage's metrics written with `passed: false`) is a row, not an error; any
other failure stops the script, naming the seed's log. Prints one row per seed and a summary: how many
seeds pass, the spread of the F1 ratio and of the best attacker's re-identification against their
bars. Figures: benchmarks/RESULTS.md ("The gate over the stage's own seed, on one tower").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def gate_row(seed: int, m: dict) -> dict:
    """One seed's row from the stage's `privacy.json`: the gated figures and their bars."""
    gate = m["gate"]
    return {
        "seed": seed,
        "behaviour_f1": m["behaviour_f1"],
        "behaviour_f1_raw": m["behaviour_f1_raw"],
        "f1_ratio": m["behaviour_f1"] / m["behaviour_f1_raw"],
        "min_f1_ratio": gate["min_f1_ratio"],
        "reid": m["reid_accuracy"],
        "reid_mlp": m["reid_accuracy_mlp"],
        "reid_linear": m["reid_accuracy_linear"],
        "reid_bar": m["reid_chance"] + gate["reid_margin"],
        "inversion_reid": m["inversion_reid_accuracy"],
        "qa_member": m.get("qa_accuracy_member"),
        "qa_member_raw": m.get("qa_accuracy_member_raw"),
        "passed": bool(m["passed"]),
        "failures": [f["check"] for f in m.get("failures", [])],
        "wall_s": m.get("wall_s"),
    }


def summarise(rows: list[dict]) -> dict:
    """How many seeds pass, and the spread of each gated figure against its bar."""
    if not rows:
        raise ValueError("no seeds to summarise")
    ratios, reids = [r["f1_ratio"] for r in rows], [r["reid"] for r in rows]
    return {
        "seeds": len(rows),
        "passed": sum(r["passed"] for r in rows),
        "f1_ratio": {"min": min(ratios), "max": max(ratios), "mean": sum(ratios) / len(ratios)},
        "f1_ratio_bar": rows[0]["min_f1_ratio"],
        "reid": {"min": min(reids), "max": max(reids), "mean": sum(reids) / len(reids)},
        "reid_bar": rows[0]["reid_bar"],
        # which seeds failed which check, as the stage's own gate judged them (not re-derived here)
        "failed_checks": {
            check: [r["seed"] for r in rows if check in r["failures"]]
            for check in sorted({c for r in rows for c in r["failures"]})
        },
    }


def run_seed(seed: int, args: argparse.Namespace) -> dict:
    out = Path(args.out).resolve() / str(seed)
    shutil.rmtree(out, ignore_errors=True)  # a metrics file found afterwards is this run's
    (out / "artifacts").mkdir(parents=True)
    family = Path(args.family).resolve()
    if not (family / "tokenizer.json").is_file():
        tokenizer = Path(args.tokenizer).resolve() if args.tokenizer else family.parent / "tokenizer"
        if not (tokenizer / "tokenizer.json").is_file():
            raise SystemExit(f"no tokenizer.json in {family} or {tokenizer} (give --tokenizer)")
        (out / "artifacts" / "tokenizer").symlink_to(tokenizer)
    overrides = [
        f"seed={seed}",
        f"privacy.family_dir={family}",
        *(f"paths.{k}_dir={out / k}" for k in ("artifacts", "metrics", "plots", "reports")),
        *args.set,
    ]
    cmd = [sys.executable, "-m", "tasks.privacy", "--params", str(Path(args.params).resolve())]
    for o in overrides:
        cmd += ["--set", o]
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(args.threads))
    log_path = out.with_suffix(".log")
    t = time.perf_counter()
    with open(log_path, "w") as log:
        rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    metrics = out / "metrics" / "privacy.json"
    if not metrics.is_file():
        raise SystemExit(
            f"seed {seed}: the privacy stage failed (exit {rc}) before its metrics; see {log_path}"
        )
    row = gate_row(seed, json.loads(metrics.read_text()))
    if rc != 0 and row["passed"]:
        raise SystemExit(f"seed {seed}: exit {rc} with a passed gate; see {log_path}")
    print(
        f"seed {seed}: {'passed' if row['passed'] else 'FAILED'} in {time.perf_counter() - t:.0f} s",
        flush=True,
    )
    return row


def print_table(rows: list[dict], summary: dict) -> None:
    print(
        f"\n| seed | behaviour F1 / raw | ratio (>= {summary['f1_ratio_bar']:g}) | "
        f"re-id best, MLP / linear (<= {summary['reid_bar']:.3f}) | id. on reconstructions | "
        "member QA / raw | gate |"
    )
    print("|---|---|---:|---|---:|---|---|")
    for r in rows:
        qa = "-" if r["qa_member"] is None else f"{r['qa_member']:.3f} / {r['qa_member_raw']:.3f}"
        gate = "passed" if r["passed"] else "**failed** (" + ", ".join(r["failures"]) + ")"
        print(
            f"| {r['seed']} | {r['behaviour_f1']:.3f} / {r['behaviour_f1_raw']:.3f} | {r['f1_ratio']:.3f} | "
            f"{r['reid']:.3f} ({r['reid_mlp']:.3f} / {r['reid_linear']:.3f}) | {r['inversion_reid']:.3f} | "
            f"{qa} | {gate} |"
        )
    s = summary
    failed = "; ".join(f"{c}: seeds {', '.join(map(str, seeds))}" for c, seeds in s["failed_checks"].items())
    ratio, reid = s["f1_ratio"], s["reid"]
    print(
        f"\n{s['passed']} of {s['seeds']} seeds pass. F1 ratio {ratio['min']:.3f}-{ratio['max']:.3f} "
        f"(mean {ratio['mean']:.3f}); best-attacker re-id {reid['min']:.3f}-{reid['max']:.3f} "
        f"(mean {reid['mean']:.3f}). Failed checks: {failed or 'none'}."
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", required=True, help="the vision-language family whose tower is audited")
    ap.add_argument("--tokenizer", help="the cloud member's tokenizer (default: <family>/../tokenizer)")
    ap.add_argument("--params", default="params.vl.yaml", help="params file (default: params.vl.yaml)")
    ap.add_argument("--seeds", default="1,2,3,4,5,6", help="stage seeds, comma-separated")
    ap.add_argument("--jobs", type=int, default=2, help="stage runs at a time (each uses --threads)")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per run")
    ap.add_argument("--out", default="/tmp/privacy-gate-seeds", help="where each seed's run writes")
    ap.add_argument("--json", help="also write the rows and the summary to this file")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a further override")
    args = ap.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        ap.error(f"--seeds {args.seeds!r}: integers separated by commas")
    if not seeds or args.jobs < 1:
        ap.error("give at least one seed and --jobs >= 1")
    if not (Path(args.family) / "config.json").is_file():
        ap.error(f"--family {args.family}: no config.json there (a family checkpoint, e.g. artifacts/vl/rl)")
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda s: run_seed(s, args), seeds))
    summary = summarise(rows)
    print_table(rows, summary)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "summary": summary}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
