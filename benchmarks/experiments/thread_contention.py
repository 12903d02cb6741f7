"""Training at 1 and 2 intra-op threads, alone and beside other work: why `ruyi run` warns on a busy machine.

    python benchmarks/experiments/thread_contention.py [--steps 30] [--seq-len 100] [--wait-policy]
        [--json out.json]

Each scenario runs family_sft-shaped training steps (the tiny family of params.yaml, `family_sft`'s
batch size and optimizer, random tokens of `--seq-len`, the multi-exit loss) in a fresh process at a
given torch thread count, and reports the median seconds per step after three warm-up steps:
- `alone`: nothing else started (run it on an otherwise idle machine);
- `two at once`: two identical jobs started together (two `make run`s, or a run beside `make test`);
- `beside a 1-thread job`: a neighbour at one thread trains the same model for the whole measurement.
The ratio is each row's median over `2 threads, alone` (the tiny default's `threads: 2`).
`--wait-policy` adds the same rows under OMP_WAIT_POLICY=PASSIVE (OpenMP threads sleep instead of
spinning while they wait). Figures: benchmarks/RESULTS.md, "Threads on a busy machine".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def worker(threads: int, steps: int, seq_len: int) -> dict:
    """Times `steps` training steps at `threads` intra-op threads in this process."""
    import torch

    torch.set_num_threads(threads)
    from ruyi_model import FamilialForCausalLM
    from tasks.core.params import load_params
    from tasks.cpt import family_config
    from tasks.training.loop import build_optimizer, multi_exit_loss_fn

    params = load_params(REPO / "params.yaml")
    m, cfg = params.model, params.family_sft
    vocab = 2048
    torch.manual_seed(0)
    model = FamilialForCausalLM(family_config(m, vocab_size=vocab, pad_token_id=0, eos_token_id=1))
    optimizer, scheduler = build_optimizer(list(model.named_parameters()), cfg)
    loss_fn = multi_exit_loss_fn(lambda step: [0.3] * (len(m.exit_layers) - 1) + [1.0])
    model.train()
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        ids = torch.randint(2, vocab, (cfg.batch_size, seq_len))
        labels = ids.clone()
        labels[:, : seq_len // 3] = -100
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        loss, _ = loss_fn(model, batch, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        times.append(time.perf_counter() - t0)
    return {"threads": threads, "steps": steps, "median_s": statistics.median(times[3:])}


def _start(threads: int, steps: int, seq_len: int, env: dict[str, str]) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--worker", str(threads), "--steps", str(steps)]
    cmd += ["--seq-len", str(seq_len)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen) -> float:
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed with exit code {proc.returncode}")
    return float(json.loads(out.strip().splitlines()[-1])["median_s"])


def scenario(name: str, threads: int, steps: int, seq_len: int, policy: str | None) -> dict:
    """One row: the measured job at `threads`, with the neighbours `name` says."""
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    env.pop("OMP_NUM_THREADS", None)  # the job sets its threads itself; a cap would hide the effect
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    neighbour = None
    if name == "two at once":
        neighbour = _start(threads, steps, seq_len, env)
    elif name == "beside a 1-thread job":
        neighbour = _start(1, 10_000, seq_len, env)
    measured = _start(threads, steps, seq_len, env)
    median = _result(measured)
    others = []
    if neighbour is not None:
        if name == "two at once":
            others.append(round(_result(neighbour), 4))
        else:
            neighbour.kill()
            neighbour.wait()
    return {
        "scenario": name,
        "threads": threads,
        "wait_policy": policy or "default",
        "median_s": round(median, 4),
        "other_job_median_s": others,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30, help="training steps per job (3 warm-up)")
    parser.add_argument("--seq-len", type=int, default=100, help="tokens per row of a batch")
    parser.add_argument(
        "--wait-policy", action="store_true", help="also run every row under OMP_WAIT_POLICY=PASSIVE"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the rows here too")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 5:
        parser.error(f"--steps must be at least 5 (3 are warm-up), got {args.steps}")
    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.steps, args.seq_len)))
        return 0
    print(f"{os.cpu_count()} CPUs, {len(os.sched_getaffinity(0))} usable; {args.steps} steps per job")
    rows = []
    for policy in [None, "PASSIVE"] if args.wait_policy else [None]:
        for name in ("alone", "two at once", "beside a 1-thread job"):
            for threads in (2, 1):
                rows.append(scenario(name, threads, args.steps, args.seq_len, policy))
                r = rows[-1]
                print(f"  {r['wait_policy']:8s} {name:22s} {threads} thread(s): {r['median_s']:.3f} s/step")
    base = next(r["median_s"] for r in rows if r["scenario"] == "alone" and r["threads"] == 2)
    for r in rows:
        r["ratio_to_2_threads_alone"] = round(r["median_s"] / base, 2)
    print("\n| wait policy | scenario | threads | s/step | x 2 threads alone |\n|---|---|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['wait_policy']} | {r['scenario']} | {r['threads']} | {r['median_s']:.3f} "
            f"| {r['ratio_to_2_threads_alone']:.2f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
