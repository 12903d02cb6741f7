"""Benchmark exit_confidence (inference): peak memory and time of naive, chunked and triton.

    python benchmarks/kernels/benchmark_exit_confidence.py                    # CPU shape, naive vs chunked
    python benchmarks/kernels/benchmark_exit_confidence.py --chunk-sizes 64 256
    python benchmarks/kernels/benchmark_exit_confidence.py --device cuda      # + triton, prefill and decode

Each (impl, chunk size) runs in a fresh subprocess; ratios are against naive from the same run.
Method: docs/choices.md#benchmarks; figures: benchmarks/RESULTS.md.
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CPU_SHAPE = dict(B=[4096], D=512, V=32000)
GPU_SHAPE = dict(B=[4096, 64], D=4096, V=128256)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(args) -> None:
    import torch

    from triton_kernels.ops.exit_confidence import (
        DEFAULT_CHUNK_ELEMENTS,
        exit_confidence,
        exit_confidence_chunked,
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    rows = args.B[0]
    hidden = torch.randn(rows, args.D, generator=gen, device=device, dtype=dtype)
    head = torch.randn(args.V, args.D, generator=gen, device=device, dtype=dtype) * (4.0 * args.D**-0.5)
    norm = torch.ones(args.D, device=device, dtype=dtype)
    if args.worker == "chunked":
        chunk = args.chunk_size or max(1, DEFAULT_CHUNK_ELEMENTS // args.V)
        call = lambda: exit_confidence_chunked(hidden, norm, head, chunk_size=chunk)  # noqa: E731
    else:
        chunk = None
        call = lambda: exit_confidence(hidden, norm, head, impl=args.worker)  # noqa: E731
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    rss_before = _rss_bytes()
    times = []
    for i in range(args.repeats + 1):
        if device.type == "cuda":
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
        if i:
            times.append(elapsed)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    print(
        json.dumps(
            dict(
                impl=args.worker,
                B=rows,
                chunk_size=chunk,
                time_s=min(times),
                times_s=times,
                peak_extra_bytes=peak,
                mean_entropy=out[2].float().mean().item(),
                mean_max_prob=out[1].float().mean().item(),
                threads=torch.get_num_threads(),
            )
        )
    )


def _spawn(args, impl, rows, chunk_size) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        impl,
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--B",
        str(rows),
        "--D",
        str(args.D),
        "--V",
        str(args.V),
        "--repeats",
        str(args.repeats),
        "--threads",
        str(args.threads),
    ]
    if chunk_size:
        cmd += ["--chunk-size", str(chunk_size)]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise SystemExit(f"worker {impl} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument(
        "--dtype", default=None, help="float32 / bfloat16 / float16 (default: fp32 CPU, bf16 CUDA)"
    )
    parser.add_argument(
        "--B",
        type=int,
        nargs="+",
        default=None,
        help="rows (tokens) per call, one or more (default: 4096 CPU; 4096 and 64 CUDA)",
    )
    parser.add_argument("--D", type=int, default=None, help="hidden size (default: 512 CPU, 4096 CUDA)")
    parser.add_argument("--V", type=int, default=None, help="vocabulary (default: 32000 CPU, 128256 CUDA)")
    parser.add_argument("--impls", nargs="+", default=None, help="default: naive chunked, + triton on CUDA")
    parser.add_argument(
        "--chunk-sizes",
        nargs="+",
        type=int,
        default=[0],
        help="chunked path: rows per chunk to try (0 = library default)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per process, after one warm-up")
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="processes per configuration, interleaved across impls; time = best call",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--chunk-size", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = GPU_SHAPE if args.device == "cuda" else CPU_SHAPE
    for key, value in shape.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    if args.worker:
        worker(args)
        return
    impls = args.impls or (["naive", "chunked", "triton"] if args.device == "cuda" else ["naive", "chunked"])

    print(
        f"exit_confidence  D={args.D} V={args.V} {args.dtype}  device={args.device}  "
        f"host={platform.processor() or platform.machine()} cpus={os.cpu_count()}"
    )
    all_rows = []
    for rows in args.B:
        configs = [
            (impl, chunk_size or None)
            for impl in impls
            for chunk_size in (args.chunk_sizes if impl == "chunked" else [None])
        ]
        runs = {config: [] for config in configs}
        for _ in range(args.rounds):  # interleaved, so load changes hit every impl alike
            for config in configs:
                runs[config].append(_spawn(args, config[0], rows, config[1]))
        results = []
        for config in configs:
            r = dict(runs[config][0])
            r["time_s"] = min(x["time_s"] for x in runs[config])
            r["times_s"] = [t for x in runs[config] for t in x["times_s"]]
            r["peak_extra_bytes"] = max(x["peak_extra_bytes"] for x in runs[config])
            results.append(r)
            print(
                f"  B={rows:<6d} {r['impl']:8s} chunk={str(r['chunk_size'] or '-'):>6s}  "
                f"time {r['time_s'] * 1e3:9.1f} ms"
                f"  peak extra {r['peak_extra_bytes'] / 2**20:8.1f} MiB  "
                f"mean entropy {r['mean_entropy']:.5f}",
                flush=True,
            )
        naive = next((r for r in results if r["impl"] == "naive"), None)
        if naive:
            for r in results:
                if r is not naive:
                    print(
                        f"    {r['impl']:8s} chunk={str(r['chunk_size'] or '-'):>6s} vs naive: memory "
                        f"{naive['peak_extra_bytes'] / max(r['peak_extra_bytes'], 1):6.1f}x less, "
                        f"time {r['time_s'] / naive['time_s']:5.2f}x"
                    )
        all_rows += results
    print("JSON " + json.dumps(dict(args=vars(args), results=all_rows)))


if __name__ == "__main__":
    main()
