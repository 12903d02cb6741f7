"""Tile and launch settings of the Triton exit_head_loss kernels, forward and backward timed apart.

    python benchmarks/kernels/tune_exit_head_loss.py                 # CUDA, the GPU shape, the grid below
    python benchmarks/kernels/tune_exit_head_loss.py --configs '{"BLOCK_N": 32, "num_warps": 8}' '{}'

Each config (a JSON object of `head_ce_forward` / `head_ce_backward` overrides; `{}` = the defaults)
runs in this process on the same inputs: one warm-up (it compiles), then `--repeats` timed calls of the
forward and of the backward (CUDA events). Its lse is checked against torch on the first 256 tokens
and its gradients against the first config's (relative max error), so a fast config that is wrong
shows as wrong. Figures: benchmarks/RESULTS.md ("Triton path").
"""

from __future__ import annotations

import argparse
import json
from functools import partial

import harness  # benchmarks/kernels/harness.py (this script's folder is on sys.path)
import torch

#: The grid tried by default: the defaults first (the reference of the gradient check), then larger
#: token tiles (fewer grad_W atomics), larger vocab tiles (fewer grad_y atomics), more warps.
GRID = [
    {},
    {"num_warps": 8},
    {"BLOCK_N": 32, "num_warps": 8},
    {"BLOCK_V": 256, "num_warps": 8},
    {"BLOCK_N": 32, "BLOCK_V": 256, "num_warps": 8},
    {"BLOCK_N": 64, "BLOCK_V": 128, "num_warps": 8},
    {"BLOCK_N": 32, "BLOCK_V": 128, "BLOCK_D": 128, "num_warps": 8},
    {"BLOCK_N": 32, "BLOCK_V": 256, "num_warps": 8, "num_stages": 2},
]


def _time(call, repeats: int) -> tuple[float, object]:
    """Best of `repeats` timed calls after a warm-up that compiles the config (harness.measure)."""
    times, _, out = harness.measure(call, torch.device("cuda"), repeats)
    return min(times), out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--K", type=int, default=4)
    parser.add_argument("--N", type=int, default=16384)
    parser.add_argument("--D", type=int, default=4096)
    parser.add_argument("--V", type=int, default=128256)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--configs", nargs="+", default=None, help="JSON objects (default: the grid above)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("tune_exit_head_loss.py needs CUDA (the compiled kernels)")
    from triton_kernels.ops.exit_head_loss_triton import head_ce_backward, head_ce_forward

    configs = [json.loads(c) for c in args.configs] if args.configs else GRID
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator(device="cuda").manual_seed(0)
    K, N, D, V = args.K, args.N, args.D, args.V
    y = torch.randn(K, N, D, generator=gen, device="cuda", dtype=dtype)
    w = torch.randn(V, D, generator=gen, device="cuda", dtype=dtype) * D**-0.5
    labels = torch.randint(0, V, (N,), generator=gen, device="cuda")
    labels[::10] = -100
    scale = torch.full((K,), 1.0 / int((labels != -100).sum()), device="cuda")
    ref_lse = torch.logsumexp((y[:, :256].float() @ w.float().T), -1)
    print(
        f"exit_head_loss triton tiles  K={K} N={N} D={D} V={V} {args.dtype}  {torch.cuda.get_device_name()}"
    )
    first = None
    for cfg in configs:
        try:
            t_fwd, (lse, _) = _time(partial(head_ce_forward, y, w, labels, -100, cfg), args.repeats)
            t_bwd, (gy, gw) = _time(
                partial(head_ce_backward, y, w, labels, lse, scale, -100, True, True, cfg), args.repeats
            )
        except Exception as exc:  # a config the compiler rejects (shared memory, registers) is a row
            print(f"  {json.dumps(cfg):70s}  failed: {str(exc).strip().splitlines()[0][:120]}", flush=True)
            continue
        lse_err = float((lse[:, :256] - ref_lse).abs().max())
        if first is None:
            first = (gy, gw)
            errs = "reference"
        else:
            errs = f"grad_y {_rel(gy, first[0]):.1e} grad_W {_rel(gw, first[1]):.1e}"
        print(
            f"  {json.dumps(cfg):70s}  fwd {t_fwd:7.3f} s  bwd {t_bwd:7.3f} s  total {t_fwd + t_bwd:7.3f} s"
            f"  lse err {lse_err:.1e}  {errs}",
            flush=True,
        )
        del gy, gw


if __name__ == "__main__":
    main()
