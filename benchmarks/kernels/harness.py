"""The shared harness of the kernel benchmarks (benchmark_exit_confidence.py, benchmark_exit_head_loss.py).

Each configuration (impl, chunk size) runs in a fresh worker process (the same script with the hidden
`--worker` flag), so peak memory is that configuration's alone; rounds are interleaved across
configurations, so load changes on a noisy machine hit every impl alike. A worker prints one JSON row; a
failed, OOM-killed or timed-out worker becomes a row with `status` "OOM" or "failed", never an exception.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def rss_bytes() -> int:
    """Resident memory of this process now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(call: Callable[[], object], device, repeats: int) -> tuple[list[float], int, object]:
    """Runs `call` once to warm up, then `repeats` timed times on `device` (a torch.device).

    Returns (the timed seconds, the peak extra bytes over the state before the first call, the last
    result). On CUDA: CUDA events and the allocator's peak; on CPU: wall time and the growth of the
    process's maximum resident set.
    """
    import torch

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    rss_before = rss_bytes()
    times: list[float] = []
    out = None
    for i in range(repeats + 1):
        if cuda:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = call()
            stop.record()
            torch.cuda.synchronize()
            elapsed = start.elapsed_time(stop) / 1e3
        else:
            t0 = time.perf_counter()
            out = call()
            elapsed = time.perf_counter() - t0
        if i:  # the first call is a warm-up
            times.append(elapsed)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before  # Linux: KiB
    return times, peak, out


def add_common_arguments(parser: argparse.ArgumentParser, *, repeats: int, chunk_help: str) -> None:
    """The options both benchmarks take (device, dtype, chunk sizes, repeats, rounds, threads, workers)."""
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument(
        "--dtype", default=None, help="float32 / bfloat16 / float16 (default: fp32 CPU, bf16 CUDA)"
    )
    parser.add_argument(
        "--chunk-sizes", nargs="+", type=int, default=[0], help=f"{chunk_help} (0 = library default)"
    )
    parser.add_argument(
        "--repeats", type=int, default=repeats, help="timed calls per process, after one warm-up"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="processes per configuration, interleaved across impls; time = best call",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument(
        "--worker-timeout",
        type=float,
        default=0,
        help="seconds per worker process before it is recorded as failed (0: no limit)",
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--chunk-size", type=int, default=None, help=argparse.SUPPRESS)


def resolve_defaults(args: argparse.Namespace, cpu_shape: dict, gpu_shape: dict) -> None:
    """Fills the device (cuda if available), the shape of that device and the dtype (bf16 on CUDA)."""
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    for key, value in (gpu_shape if args.device == "cuda" else cpu_shape).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"


def host_line(args: argparse.Namespace) -> str:
    return f"device={args.device}  host={platform.processor() or platform.machine()} cpus={os.cpu_count()}"


def worker_argv(args: argparse.Namespace, impl: str, chunk_size: int | None, **shape) -> list[str]:
    """The command-line options of one worker process (`shape`: the script's own size options)."""
    argv = ["--worker", impl, "--device", args.device, "--dtype", args.dtype]
    for key, value in shape.items():
        argv += [f"--{key}", str(value)]
    argv += ["--repeats", str(args.repeats), "--threads", str(args.threads)]
    if chunk_size:
        argv += ["--chunk-size", str(chunk_size)]
    return argv


def failure_row(base: dict, status: str, error: str) -> dict:
    """The row of a configuration that did not run to the end (`base`: its identifying fields)."""
    return dict(base, status=status, error=error, time_s=None, times_s=[], peak_extra_bytes=None)


def classify_failure(returncode: int, stderr: str) -> tuple[str, str]:
    """(status, error) of a worker that exited with `returncode`: "OOM" or "failed"."""
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    last = lines[-1][:300] if lines else f"exit status {returncode}, no output"
    lowered = stderr.lower()
    if "outofmemoryerror" in lowered or "out of memory" in lowered or "can't allocate memory" in lowered:
        return "OOM", last
    if returncode == -9:  # SIGKILL: on CPU almost always the kernel's OOM killer
        return "OOM", "killed by SIGKILL (likely the OOM killer)"
    if returncode < 0:
        return "failed", f"killed by signal {-returncode}"
    return "failed", last


def spawn(script: str, argv: Sequence[str], base: dict, timeout: float = 0) -> dict:
    """Runs `script` as a worker with `argv`; returns its JSON row, or a failure row built on `base`."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        out = subprocess.run(
            [sys.executable, script, *argv],
            capture_output=True,
            text=True,
            env=env,
            check=False,
            timeout=timeout or None,
        )
    except subprocess.TimeoutExpired:
        return failure_row(base, "failed", f"timeout after {timeout} s")
    if out.returncode != 0:
        return failure_row(base, *classify_failure(out.returncode, out.stderr))
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return failure_row(base, "failed", f"no result line in the output: {out.stdout[-200:]!r}")


def configurations(impls: Sequence[str], chunk_sizes: Sequence[int]) -> list[tuple[str, int | None]]:
    """(impl, chunk size) pairs: every chunk size for "chunked", none for the other impls."""
    return [
        (impl, chunk_size or None)
        for impl in impls
        for chunk_size in (chunk_sizes if impl == "chunked" else [None])
    ]


def run_interleaved(
    configs: Sequence[tuple], rounds: int, run_one: Callable[..., dict], report: Callable[[int, dict], None]
) -> list[dict]:
    """`rounds` rows of every configuration, interleaved; `report(round, row)` after each; merged rows."""
    runs: dict[tuple, list[dict]] = {config: [] for config in configs}
    for round_index in range(rounds):
        for config in configs:
            row = run_one(*config)
            runs[config].append(row)
            report(round_index, row)
    return [merge(runs[config]) for config in configs]


def merge(runs: list[dict]) -> dict:
    """One row per configuration: best time and largest peak over the rounds that succeeded."""
    ok = [r for r in runs if r["status"] == "ok"]
    if not ok:
        return dict(runs[0])
    merged = dict(ok[0])
    merged["time_s"] = min(r["time_s"] for r in ok)
    merged["times_s"] = [t for r in ok for t in r["times_s"]]
    merged["peak_extra_bytes"] = max(r["peak_extra_bytes"] for r in ok)
    failed = [r for r in runs if r["status"] != "ok"]
    if failed:  # e.g. an OOM in one round only: keep the figures, say so
        merged["error"] = (
            f"{len(failed)} of {len(runs)} rounds failed: {failed[0]['status']} {failed[0]['error']}"
        )
    return merged


def status_text(row: dict) -> str:
    return "OOM" if row["status"] == "OOM" else f"failed: {row['error']}"
