"""Benchmark exit_head_loss forward+backward: peak memory and time of naive, chunked and triton.

    python benchmarks/kernels/benchmark_exit_head_loss.py                      # CPU shape, naive vs chunked
    python benchmarks/kernels/benchmark_exit_head_loss.py --chunk-sizes 64 128 256   # tune the chunk size
    python benchmarks/kernels/benchmark_exit_head_loss.py --device cuda        # + triton, GPU shape

Impls (`--impls`): naive, chunked, triton, and `one-head` (naive with K=1: one materialised N x V head,
the baseline of the memory target). Each (impl, chunk size) runs in a fresh subprocess; a failed or
OOM worker is recorded, not fatal (exit status 0 unless every worker failed); harness.py. Method:
docs/choices.md#benchmarks; figures: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json

import harness  # benchmarks/kernels/harness.py (this script's folder is on sys.path)

CPU_SHAPE = dict(K=4, N=4096, D=512, V=32000)
GPU_SHAPE = dict(K=4, N=16384, D=4096, V=128256)
IMPLS = ("naive", "chunked", "triton", "one-head")
ONE_HEAD = "one-head"  # the naive loss with K=1: one materialised N x V head


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

        args.chunk_size = default_chunk_size(args.K, args.V, device.type)
    step = _step_fn("naive" if args.worker == ONE_HEAD else args.worker, args.chunk_size)
    try:
        times, peak, loss = harness.measure(lambda: step(*inputs), device, args.repeats)
    except (torch.OutOfMemoryError, RuntimeError) as exc:  # CPU allocation failures are RuntimeErrors
        if not isinstance(exc, torch.OutOfMemoryError) and "can't allocate memory" not in str(exc):
            raise
        error = str(exc).strip().splitlines()[0][:300]
        row = harness.failure_row(_base(args.worker, args.chunk_size, args.K), "OOM", error)
        print(json.dumps(dict(row, loss=None, threads=torch.get_num_threads())))
        return
    print(
        json.dumps(
            dict(
                impl=args.worker,
                chunk_size=args.chunk_size,
                K=args.K,
                status="ok",
                error=None,
                time_s=min(times),
                times_s=times,
                peak_extra_bytes=peak,
                loss=loss,
                threads=torch.get_num_threads(),
            )
        )
    )


def _base(impl, chunk_size, num_exits) -> dict:
    return dict(impl=impl, chunk_size=chunk_size, K=num_exits, loss=None)


def _spawn(args, impl, chunk_size) -> dict:
    """Runs one worker; returns its row (``status`` "ok", "OOM" or "failed"), never raises on failure."""
    num_exits = 1 if impl == ONE_HEAD else args.K
    argv = harness.worker_argv(args, impl, chunk_size, K=num_exits, N=args.N, D=args.D, V=args.V)
    if args.per_exit_heads:
        argv.append("--per-exit-heads")
    return harness.spawn(__file__, argv, _base(impl, chunk_size, num_exits), args.worker_timeout)


def _label(r: dict) -> str:
    chunk = str(r["chunk_size"] or "-")
    return f"{r['impl']:8s} K={r['K']} chunk={chunk:>6s}"


def _ratio(numerator, denominator) -> float | None:
    if numerator is None or denominator is None:
        return None
    return numerator / max(denominator, 1e-12)


def _fmt(value: float | None, spec: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


def summarize(rows: list[dict]) -> list[dict]:
    """Adds the ratios to each row (in place) and prints the summary table; returns the rows.

    ``mem_vs_naive`` = naive peak / impl peak (higher is better), ``time_vs_naive`` = impl time / naive
    time (lower is better), ``mem_vs_one_head`` = impl peak / one-head peak (<= 1 meets the GPU target).
    A ratio is None when either side failed or is not measured.
    """
    naive = next((r for r in rows if r["impl"] == "naive" and r["status"] == "ok"), None)
    one = next((r for r in rows if r["impl"] == ONE_HEAD and r["status"] == "ok"), None)
    for r in rows:
        ok = r["status"] == "ok"
        r["mem_vs_naive"] = _ratio(naive["peak_extra_bytes"], r["peak_extra_bytes"]) if naive and ok else None
        r["time_vs_naive"] = _ratio(r["time_s"], naive["time_s"]) if naive and ok else None
        r["mem_vs_one_head"] = _ratio(r["peak_extra_bytes"], one["peak_extra_bytes"]) if one and ok else None
    print(
        "summary (time: best run; memory: largest peak; vs naive: naive peak / impl peak and impl time / "
        "naive time; vs one-head: impl peak / one-head peak, <= 1 meets the GPU target)"
    )
    for r in rows:
        if r["status"] != "ok":
            print(f"  {_label(r)}  {harness.status_text(r)}")
            continue
        print(
            f"  {_label(r)}  time {r['time_s']:8.3f} s  peak extra {r['peak_extra_bytes'] / 2**20:9.1f} MiB  "
            f"| vs naive: memory {_fmt(r['mem_vs_naive'], '6.1f')}x less, "
            f"time {_fmt(r['time_vs_naive'], '5.2f')}x "
            f"| vs one-head: memory {_fmt(r['mem_vs_one_head'], '5.2f')}x"
            + (f"  ({r['error']})" if r.get("error") else "")
        )
    for r in rows:
        if r["impl"] not in ("triton", "chunked"):
            continue
        if r["status"] != "ok":
            print(f"  target ({r['impl']}, K={r['K']}): not measured, {harness.status_text(r)}")
            continue
        mem = r["mem_vs_one_head"]
        speed = r["time_vs_naive"]
        mem_txt = (
            "one-head not measured"
            if mem is None
            else f"peak {mem:.2f}x one materialised head ({'met' if mem <= 1 else 'missed'})"
        )
        speed_txt = (
            "naive not measured"
            if speed is None
            else f"time {speed:.2f}x naive ({'met' if speed <= 1 else 'missed'})"
        )
        print(f"  target ({r['impl']}, chunk={r['chunk_size'] or '-'}): {mem_txt}; {speed_txt}")
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    harness.add_common_arguments(parser, repeats=1, chunk_help="chunked path: tokens per chunk to try")
    parser.add_argument("--K", type=int, default=None, help="exits (default: 4)")
    parser.add_argument("--N", type=int, default=None, help="tokens (default: 4096 CPU, 16384 CUDA)")
    parser.add_argument("--D", type=int, default=None, help="hidden size (default: 512 CPU, 4096 CUDA)")
    parser.add_argument("--V", type=int, default=None, help="vocabulary (default: 32000 CPU, 128256 CUDA)")
    parser.add_argument(
        "--impls",
        nargs="+",
        default=None,
        choices=IMPLS,
        help="impls to run (default: naive chunked one-head, + triton on CUDA); one-head = "
        "naive with K=1, the 'one materialised head' baseline",
    )
    parser.add_argument(
        "--per-exit-heads", action="store_true", help="K x V x D heads instead of a shared V x D"
    )
    args = parser.parse_args(argv)

    harness.resolve_defaults(args, CPU_SHAPE, GPU_SHAPE)
    if args.worker:
        worker(args)
        return
    impls = args.impls or (
        ["naive", "chunked", "triton", ONE_HEAD] if args.device == "cuda" else ["naive", "chunked", ONE_HEAD]
    )

    print(
        f"exit_head_loss forward+backward  K={args.K} N={args.N} D={args.D} V={args.V} {args.dtype} "
        f"{'per-exit heads' if args.per_exit_heads else 'shared head'}  {harness.host_line(args)}"
    )

    def report(round_index, r):
        if r["status"] != "ok":
            print(f"  round {round_index}  {_label(r)}  {harness.status_text(r)}", flush=True)
            return
        print(
            f"  round {round_index}  {_label(r)}  time {r['time_s']:8.3f} s  "
            f"peak extra {r['peak_extra_bytes'] / 2**20:9.1f} MiB  loss {r['loss']:.6f}",
            flush=True,
        )

    configs = harness.configurations(impls, args.chunk_sizes)
    rows = summarize(harness.run_interleaved(configs, args.rounds, lambda *c: _spawn(args, *c), report))
    print("JSON " + json.dumps(dict(args=vars(args), results=rows)))
    if all(r["status"] != "ok" for r in rows):
        raise SystemExit("every worker failed")


if __name__ == "__main__":
    main()
