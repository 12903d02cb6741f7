"""Benchmark exit_confidence (inference): peak memory and time of naive, chunked and triton.

    python benchmarks/kernels/benchmark_exit_confidence.py                    # CPU shape, naive vs chunked
    python benchmarks/kernels/benchmark_exit_confidence.py --chunk-sizes 64 256
    python benchmarks/kernels/benchmark_exit_confidence.py --device cuda      # + triton, prefill and decode

Each (impl, chunk size) runs in a fresh subprocess (harness.py); ratios are against naive from the same run.
Method: docs/choices.md#benchmarks; figures: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json

import harness  # benchmarks/kernels/harness.py (this script's folder is on sys.path)

CPU_SHAPE = dict(B=[4096], D=512, V=32000)
GPU_SHAPE = dict(B=[4096, 64], D=4096, V=128256)


def worker(args) -> None:
    """Runs one impl in this (fresh) process and prints one JSON line."""
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
    times, peak, out = harness.measure(call, device, args.repeats)
    print(
        json.dumps(
            dict(
                impl=args.worker,
                B=rows,
                chunk_size=chunk,
                status="ok",
                error=None,
                time_s=min(times),
                times_s=times,
                peak_extra_bytes=peak,
                mean_entropy=out[2].float().mean().item(),
                mean_max_prob=out[1].float().mean().item(),
                threads=torch.get_num_threads(),
            )
        )
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    harness.add_common_arguments(parser, repeats=3, chunk_help="chunked path: rows per chunk to try")
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
    args = parser.parse_args(argv)
    harness.resolve_defaults(args, CPU_SHAPE, GPU_SHAPE)
    if args.worker:
        worker(args)
        return
    impls = args.impls or (["naive", "chunked", "triton"] if args.device == "cuda" else ["naive", "chunked"])

    print(f"exit_confidence  D={args.D} V={args.V} {args.dtype}  {harness.host_line(args)}")
    all_rows = []
    for rows in args.B:

        def run_one(impl, chunk_size, rows=rows):
            base = dict(impl=impl, B=rows, chunk_size=chunk_size)
            argv = harness.worker_argv(args, impl, chunk_size, B=rows, D=args.D, V=args.V)
            return harness.spawn(__file__, argv, base, args.worker_timeout)

        def report(round_index, r):
            if r["status"] != "ok":
                print(f"  round {round_index}  B={r['B']} {r['impl']}  {harness.status_text(r)}", flush=True)

        configs = harness.configurations(impls, args.chunk_sizes)
        results = harness.run_interleaved(configs, args.rounds, run_one, report)
        for r in results:
            if r["status"] != "ok":
                continue
            print(
                f"  B={rows:<6d} {r['impl']:8s} chunk={str(r['chunk_size'] or '-'):>6s}  "
                f"time {r['time_s'] * 1e3:9.1f} ms"
                f"  peak extra {r['peak_extra_bytes'] / 2**20:8.1f} MiB  "
                f"mean entropy {r['mean_entropy']:.5f}",
                flush=True,
            )
        naive = next((r for r in results if r["impl"] == "naive" and r["status"] == "ok"), None)
        if naive:
            for r in results:
                if r is not naive and r["status"] == "ok":
                    print(
                        f"    {r['impl']:8s} chunk={str(r['chunk_size'] or '-'):>6s} vs naive: memory "
                        f"{naive['peak_extra_bytes'] / max(r['peak_extra_bytes'], 1):6.1f}x less, "
                        f"time {r['time_s'] / naive['time_s']:5.2f}x"
                    )
        all_rows += results
    print("JSON " + json.dumps(dict(args=vars(args), results=all_rows)))
    if all(r["status"] != "ok" for r in all_rows):
        raise SystemExit("every worker failed")


if __name__ == "__main__":
    main()
