"""Triton RMSNorm forward/backward for the exit norms (Qwen3RMSNorm numerics), rows grouped by exit.

The input is `(K, N, D)` viewed as K*N rows; row `r` uses exit `r // N`'s weight. The forward writes `y`
(input dtype) and `rstd` (fp32); the backward takes fp32 `grad_y` and returns `grad_x` plus per-tile fp32
partial sums of `grad_weight`, reduced by the launcher (deterministic, no atomics). Any D works (loops
over `BLOCK_D` chunks). Imported only for `impl="triton"`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_fwd_kernel(
    X,
    NORM_W,
    Y,
    RSTD,
    N,
    D,
    eps,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # grid: (cdiv(N, BLOCK_R), K); a program normalises BLOCK_R rows of one exit.
    pid_r = tl.program_id(0)
    exit_id = tl.program_id(1)
    tokens = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = tokens < N
    rows = (exit_id * N + tokens).to(tl.int64)

    sum_sq = tl.zeros([BLOCK_R], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (cols < D)[None, :]
        x = tl.load(X + rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        sum_sq += tl.sum(x * x, axis=1)
    # One rsqrt (MUFU rsqrt.approx on NVIDIA, ~2 ulp like torch.rsqrt on CUDA) instead of sqrt + divide.
    rstd = tl.rsqrt(sum_sq / D + eps)
    tl.store(RSTD + rows, rstd, mask=row_mask)

    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (cols < D)[None, :]
        x = tl.load(X + rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        # Qwen3RMSNorm rounds the normalised value to the input dtype *before* the weight multiply.
        normed = (x * rstd[:, None]).to(Y.dtype.element_ty).to(tl.float32)
        if HAS_WEIGHT:
            w = tl.load(NORM_W + exit_id * D + cols, mask=cols < D, other=0.0).to(tl.float32)
            normed = normed * w[None, :]
        tl.store(Y + rows[:, None] * D + cols[None, :], normed.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    X,
    NORM_W,
    RSTD,
    GRAD_Y,
    GRAD_X,
    GRAD_W_PARTIAL,
    N,
    D,
    HAS_WEIGHT: tl.constexpr,
    COMPUTE_GRAD_W: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # grid: (cdiv(N, BLOCK_R), K). GRAD_Y is fp32; GRAD_W_PARTIAL is (K, cdiv(N, BLOCK_R), D) fp32.
    pid_r = tl.program_id(0)
    exit_id = tl.program_id(1)
    tokens = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = tokens < N
    rows = (exit_id * N + tokens).to(tl.int64)
    rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)

    # Pass 1: mean over D of (grad_normed * xn), grad_normed = grad_y * w, xn = x * rstd.
    dot = tl.zeros([BLOCK_R], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (cols < D)[None, :]
        offs = rows[:, None] * D + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(GRAD_Y + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            w = tl.load(NORM_W + exit_id * D + cols, mask=cols < D, other=0.0).to(tl.float32)
            g = g * w[None, :]
        dot += tl.sum(g * x * rstd[:, None], axis=1)
    mean_gx = dot / D

    # Pass 2: grad_x = rstd * (grad_normed - xn * mean_gx); grad_w partial = sum_rows grad_y * normed.
    partial_base = (exit_id * tl.num_programs(0) + pid_r).to(tl.int64) * D
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (cols < D)[None, :]
        offs = rows[:, None] * D + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(GRAD_Y + offs, mask=mask, other=0.0).to(tl.float32)
        xn = x * rstd[:, None]
        if HAS_WEIGHT:
            w = tl.load(NORM_W + exit_id * D + cols, mask=cols < D, other=0.0).to(tl.float32)
            if COMPUTE_GRAD_W:
                normed = xn.to(GRAD_X.dtype.element_ty).to(tl.float32)
                tl.store(GRAD_W_PARTIAL + partial_base + cols, tl.sum(g * normed, axis=0), mask=cols < D)
            g = g * w[None, :]
        grad_x = rstd[:, None] * (g - xn * mean_gx[:, None])
        tl.store(GRAD_X + offs, grad_x.to(GRAD_X.dtype.element_ty), mask=mask)


def _row_blocks(dim: int) -> tuple[int, int]:
    block_d = min(triton.next_power_of_2(max(dim, 16)), 1024)
    block_r = max(1, min(16, 4096 // block_d))
    return block_r, block_d


def rms_norm_forward(hidden: torch.Tensor, norm_weights: torch.Tensor | None, eps: float):
    """Normalises each exit's rows.

    Args:
        hidden: ``(K, N, D)`` contiguous.
        norm_weights: ``(K, D)`` contiguous, or None (normalise without a scale).
        eps: RMSNorm epsilon.

    Returns:
        ``(y, rstd)``: ``(K, N, D)`` in ``hidden.dtype`` and ``(K, N)`` fp32.
    """
    num_exits, num_tokens, dim = hidden.shape
    y = torch.empty_like(hidden)
    rstd = torch.empty(num_exits, num_tokens, dtype=torch.float32, device=hidden.device)
    block_r, block_d = _row_blocks(dim)
    grid = (triton.cdiv(num_tokens, block_r), num_exits)
    _rms_norm_fwd_kernel[grid](
        hidden,
        norm_weights if norm_weights is not None else hidden,
        y,
        rstd,
        num_tokens,
        dim,
        eps,
        HAS_WEIGHT=norm_weights is not None,
        BLOCK_R=block_r,
        BLOCK_D=block_d,
    )
    return y, rstd


def rms_norm_backward(
    hidden: torch.Tensor,
    norm_weights: torch.Tensor | None,
    rstd: torch.Tensor,
    grad_y: torch.Tensor,
    compute_grad_weight: bool,
):
    """Backward of :func:`rms_norm_forward`.

    Args:
        hidden: ``(K, N, D)`` the forward input.
        norm_weights: ``(K, D)`` or None.
        rstd: ``(K, N)`` fp32 from the forward.
        grad_y: ``(K, N, D)`` fp32 gradient of the normalised states.
        compute_grad_weight: whether to return ``grad_norm_weights``.

    Returns:
        ``(grad_hidden, grad_norm_weights)``: ``(K, N, D)`` in ``hidden.dtype`` and ``(K, D)`` fp32 (or None).
    """
    num_exits, num_tokens, dim = hidden.shape
    block_r, block_d = _row_blocks(dim)
    tiles = triton.cdiv(num_tokens, block_r)
    grad_x = torch.empty_like(hidden)
    compute_grad_weight = compute_grad_weight and norm_weights is not None
    partial = (
        torch.empty(num_exits, tiles, dim, dtype=torch.float32, device=hidden.device)
        if compute_grad_weight
        else grad_y
    )
    _rms_norm_bwd_kernel[(tiles, num_exits)](
        hidden,
        norm_weights if norm_weights is not None else hidden,
        rstd,
        grad_y,
        grad_x,
        partial,
        num_tokens,
        dim,
        HAS_WEIGHT=norm_weights is not None,
        COMPUTE_GRAD_W=compute_grad_weight,
        BLOCK_R=block_r,
        BLOCK_D=block_d,
    )
    return grad_x, (partial.sum(1) if compute_grad_weight else None)
