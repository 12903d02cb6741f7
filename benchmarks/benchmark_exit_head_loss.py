"""Benchmark exit_head_loss forward+backward: peak memory and time of naive, chunked and triton.

    python benchmarks/benchmark_exit_head_loss.py                      # CPU shape, naive vs chunked
    python benchmarks/benchmark_exit_head_loss.py --chunk-sizes 64 128 256   # tune the chunk size
    python benchmarks/benchmark_exit_head_loss.py --device cuda        # + triton, GPU shape

CPU: every (impl, chunk size) runs in a fresh subprocess, because torch's CPU allocator is not
tracked: the peak is the child's ``ru_maxrss`` minus its RSS just before the measured work (inputs
already built), i.e. the extra memory the loss needs. Time is the best of ``--rounds`` processes x
``--repeats`` runs (each process warms up once; rounds are interleaved across impls so a busy machine
slows all alike). CUDA: in process, ``torch.cuda.max_memory_allocated`` above the inputs, CUDA events.
Ratios are printed against naive measured in the same invocation.
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

REPO = Path(__file__).resolve().parents[1]
CPU_SHAPE = dict(K=4, N=4096, D=512, V=32000)
GPU_SHAPE = dict(K=4, N=16384, D=4096, V=128256)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _make_inputs(shape, dtype, device, shared=True):
    import torch

    gen = torch.Generator(device=device).manual_seed(0)
    K, N, D, V = shape["K"], shape["N"], shape["D"], shape["V"]
    hidden = torch.randn(K, N, D, generator=gen, device=device, dtype=dtype).requires_grad_()
    head_shape = (V, D) if shared else (K, V, D)
    head = (torch.randn(head_shape, generator=gen, device=device, dtype=dtype) * D**-0.5).requires_grad_()
    norm = torch.ones(K, D, device=device, dtype=dtype).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=gen, device=device)
    labels[::10] = -100
    return hidden, head, labels, norm


def _step_fn(impl, chunk_size):
    from triton_kernels.ops.exit_head_loss import exit_head_loss, exit_head_loss_chunked

    def step(hidden, head, labels, norm):
        for t in (hidden, head, norm):
            t.grad = None
        if impl == "chunked":
            loss, _ = exit_head_loss_chunked(hidden, head, labels, norm, chunk_size=chunk_size)
        else:
            loss, _ = exit_head_loss(hidden, head, labels, norm, impl=impl)
        loss.backward()
        return loss.item()

    return step


def worker(args) -> None:
    """Runs one impl in this (fresh) process and prints one JSON line."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    shape = dict(K=args.K, N=args.N, D=args.D, V=args.V)
    device = torch.device(args.device)
    inputs = _make_inputs(shape, dtype, device, shared=not args.per_exit_heads)
    if args.worker == "chunked" and not args.chunk_size:
        from triton_kernels.ops.exit_head_loss import default_chunk_size

        args.chunk_size = default_chunk_size(args.K, args.V)
    step = _step_fn(args.worker, args.chunk_size)
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    rss_before = _rss_bytes()
    times = []
    loss = None
    for i in range(args.repeats + 1):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss = step(*inputs)
            stop.record()
            torch.cuda.synchronize()
            elapsed = start.elapsed_time(stop) / 1e3
        else:
            t0 = time.perf_counter()
            loss = step(*inputs)
            elapsed = time.perf_counter() - t0
        if i:  # the first run is a warm-up
            times.append(elapsed)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _maxrss_bytes() - rss_before
    print(json.dumps(dict(impl=args.worker, chunk_size=args.chunk_size, time_s=min(times),
                          times_s=times, peak_extra_bytes=peak, loss=loss, threads=torch.get_num_threads())))


def _spawn(args, impl, chunk_size) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, "--device", args.device, "--dtype", args.dtype,
           "--K", str(args.K), "--N", str(args.N), "--D", str(args.D), "--V", str(args.V),
           "--repeats", str(args.repeats), "--threads", str(args.threads)]
    if chunk_size:
        cmd += ["--chunk-size", str(chunk_size)]
    if args.per_exit_heads:
        cmd.append("--per-exit-heads")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise SystemExit(f"worker {impl} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _merge(runs: list[dict]) -> dict:
    merged = dict(runs[0])
    merged["time_s"] = min(r["time_s"] for r in runs)
    merged["times_s"] = [t for r in runs for t in r["times_s"]]
    merged["peak_extra_bytes"] = max(r["peak_extra_bytes"] for r in runs)
    return merged


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: fp32 CPU, bf16 CUDA)")
    parser.add_argument("--K", type=int, default=None, help="exits (default: 4)")
    parser.add_argument("--N", type=int, default=None, help="tokens (default: 4096 CPU, 16384 CUDA)")
    parser.add_argument("--D", type=int, default=None, help="hidden size (default: 512 CPU, 4096 CUDA)")
    parser.add_argument("--V", type=int, default=None, help="vocabulary (default: 32000 CPU, 128256 CUDA)")
    parser.add_argument("--impls", nargs="+", default=None,
                        help="impls to run (default: naive chunked, + triton on CUDA)")
    parser.add_argument("--chunk-sizes", nargs="+", type=int, default=[0],
                        help="chunked path: tokens per chunk to try (0 = library default)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per process, after one warm-up")
    parser.add_argument("--rounds", type=int, default=2,
                        help="processes per configuration, interleaved across impls; time = best run")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--per-exit-heads", action="store_true", help="K x V x D heads instead of a shared V x D")
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

    print(f"exit_head_loss forward+backward  K={args.K} N={args.N} D={args.D} V={args.V} {args.dtype} "
          f"{'per-exit heads' if args.per_exit_heads else 'shared head'}  device={args.device}  "
          f"host={platform.processor() or platform.machine()} cpus={os.cpu_count()}")
    configs = [(impl, chunk_size or None) for impl in impls
               for chunk_size in (args.chunk_sizes if impl == "chunked" else [None])]
    runs = {config: [] for config in configs}
    for round_index in range(args.rounds):  # interleaved, so load changes hit every impl alike
        for config in configs:
            r = _spawn(args, *config)
            runs[config].append(r)
            print(f"  round {round_index}  {r['impl']:8s} chunk={str(r['chunk_size'] or '-'):>6s}  "
                  f"time {r['time_s']:8.3f} s  peak extra {r['peak_extra_bytes'] / 2**20:9.1f} MiB  "
                  f"loss {r['loss']:.6f}", flush=True)
    rows = [_merge(runs[config]) for config in configs]
    print(f"summary (time: best of {args.rounds} x {args.repeats} runs; memory: largest peak)")
    for r in rows:
        print(f"  {r['impl']:8s} chunk={str(r['chunk_size'] or '-'):>6s}  time {r['time_s']:8.3f} s  "
              f"peak extra {r['peak_extra_bytes'] / 2**20:9.1f} MiB")
    naive = next((r for r in rows if r["impl"] == "naive"), None)
    if naive:
        print("ratios vs naive (memory: naive / impl, higher is better; time: impl / naive, lower is better)")
        for r in rows:
            if r is naive:
                continue
            mem_ratio = naive["peak_extra_bytes"] / max(r["peak_extra_bytes"], 1)
            print(f"  {r['impl']:8s} chunk={str(r['chunk_size'] or '-'):>6s}  memory {mem_ratio:6.1f}x less  "
                  f"time {r['time_s'] / naive['time_s']:5.2f}x")
    print("JSON " + json.dumps(dict(args=vars(args), results=rows)))


if __name__ == "__main__":
    main()
