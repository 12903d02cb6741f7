"""Training at 1 and 2 intra-op threads, alone and beside other work: why `ruyi run` warns on a busy machine.

    python benchmarks/experiments/thread_contention.py [--steps 30] [--seq-len 100] [--wait-policy]
        [--quota] [--json out.json]

Each scenario runs family_sft-shaped training steps (the tiny family of params.yaml, `family_sft`'s
batch size and optimizer, random tokens of `--seq-len`, the multi-exit loss) in a fresh process at a
given torch thread count, and reports the median seconds per step after three warm-up steps:
- `alone`: nothing else started (run it on an otherwise idle machine);
- `two at once`: two identical jobs started together (two `make run`s, or a run beside `make test`);
- `beside a 1-thread job`: a neighbour at one thread trains the same model for the whole measurement.
The ratio is each row's median over `2 threads, alone` (the tiny default's `threads: 2`).
`--wait-policy` adds the same rows under OMP_WAIT_POLICY=PASSIVE (OpenMP threads sleep instead of
spinning while they wait). `--quota` adds rows for a job alone in a real cgroup v1 `cpu` cgroup with a
quota of one CPU (`docker run --cpus 1`, a Kubernetes limit of 1; needs root and a writable cgroup v1
`cpu` hierarchy): at 2 threads (what `threads: auto` or `threads: 2` started there before the quota
was counted) and at the threads the stages now pick there (tasks.core.cpus, resolved in the job).
Figures: benchmarks/RESULTS.md, "Threads on a busy machine" and "CPU quotas".
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
    """Times `steps` training steps at `threads` intra-op threads in this process (0: the stages' own
    choice for `threads: auto` here, tasks.core.stage.resolve_threads)."""
    import torch

    if threads == 0:
        from tasks.core.stage import resolve_threads

        threads = resolve_threads("auto")[0]
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


def _start(threads: int, steps: int, seq_len: int, env: dict[str, str], preexec=None) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--worker", str(threads), "--steps", str(steps)]
    cmd += ["--seq-len", str(seq_len)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True, preexec_fn=preexec)


def _report(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed with exit code {proc.returncode}")
    return json.loads(out.strip().splitlines()[-1])


def _result(proc: subprocess.Popen) -> float:
    return float(_report(proc)["median_s"])


def _env(policy: str | None = None) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    env.pop("OMP_NUM_THREADS", None)  # the job sets its threads itself; a cap would hide the effect
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    return env


def quota_parent() -> Path | None:
    """This process's cgroup in a writable cgroup v1 `cpu` hierarchy, or None."""
    from tasks.core.cpus import cgroup_dirs

    v1 = [d for version, d, _, _ in cgroup_dirs() if version == 1]
    return v1[0] if v1 and os.access(v1[0], os.W_OK) else None


def quota_rows(parent: Path, steps: int, seq_len: int) -> list[dict]:
    """The job alone in a new cgroup below `parent` with a quota of one CPU: at 2 threads, and at the
    stages' own choice there (worker 0); the cgroup is removed afterwards."""
    cgroup = parent / f"ruyi-bench-{os.getpid()}"
    cgroup.mkdir()
    rows = []
    try:
        (cgroup / "cpu.cfs_period_us").write_text("100000")
        (cgroup / "cpu.cfs_quota_us").write_text("100000")  # one CPU's worth of time per period

        def enter() -> None:
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))

        for threads in (2, 0):
            report = _report(_start(threads, steps, seq_len, _env(), enter))
            rows.append(
                {
                    "scenario": "alone, a quota of 1 CPU",
                    "threads": report["threads"],
                    "wait_policy": "default",
                    "median_s": round(report["median_s"], 4),
                    "other_job_median_s": [],
                    "chosen_by": "the stages (auto)" if threads == 0 else "set",
                }
            )
    finally:
        cgroup.rmdir()
    return rows


def scenario(name: str, threads: int, steps: int, seq_len: int, policy: str | None) -> dict:
    """One row: the measured job at `threads`, with the neighbours `name` says."""
    env = _env(policy)
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
    parser.add_argument(
        "--quota", action="store_true", help="also run the job alone in a cgroup with a 1-CPU quota (root)"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the rows here too")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 5:
        parser.error(f"--steps must be at least 5 (3 are warm-up), got {args.steps}")
    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.steps, args.seq_len)))
        return 0
    parent = quota_parent() if args.quota else None
    if args.quota and parent is None:
        parser.error("--quota needs a writable cgroup v1 cpu hierarchy (root on a cgroup v1 or hybrid host)")
    print(f"{os.cpu_count()} CPUs, {len(os.sched_getaffinity(0))} usable; {args.steps} steps per job")
    rows = []
    for policy in [None, "PASSIVE"] if args.wait_policy else [None]:
        for name in ("alone", "two at once", "beside a 1-thread job"):
            for threads in (2, 1):
                rows.append(scenario(name, threads, args.steps, args.seq_len, policy))
                r = rows[-1]
                print(f"  {r['wait_policy']:8s} {name:22s} {threads} thread(s): {r['median_s']:.3f} s/step")
    if parent is not None:
        for r in quota_rows(parent, args.steps, args.seq_len):
            rows.append(r)
            how = f"{r['threads']} thread(s), {r['chosen_by']}"
            print(f"  {r['scenario']:31s} {how}: {r['median_s']:.3f} s/step")
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
