"""Triton path of `triton_kernels.exit_head_loss`: fused head + cross-entropy, no logits in memory.

`_exit_ce_fwd_kernel` (grid: token tiles x exit groups) computes an online log-sum-exp over vocabulary
tiles and writes `lse` and per-row losses; `_exit_ce_bwd_kernel` (token tiles x vocab tiles in grouped
order, x exit groups) recomputes each logits tile and contracts `dz` into `grad_y` and `grad_W` with fp32
atomics. Tile and launch settings can be overridden through `config`. Imported only for `impl="triton"`.
Numerics, trade-offs and the open GPU-tuning questions: docs/choices.md#kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton_kernels.ops.rms_norm_triton import rms_norm_backward, rms_norm_forward
from triton_kernels.ops.utils import triton_interpreting


@triton.jit
def _exit_ce_fwd_kernel(
    Y,
    W,
    LABELS,
    LSE,
    ROW_LOSS,
    K,
    N,
    V,
    D,
    stride_w_exit,
    ignore_index,
    EXITS_PER_PROGRAM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_IN_INPUT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    BLOCK_M: tl.constexpr = EXITS_PER_PROGRAM * BLOCK_N
    r = tl.arange(0, BLOCK_M)
    exits = pid_k * EXITS_PER_PROGRAM + r // BLOCK_N
    tokens = pid_n * BLOCK_N + r % BLOCK_N
    row_mask = (exits < K) & (tokens < N)
    rows = (exits * N + tokens).to(tl.int64)
    labels = tl.load(LABELS + tokens, mask=row_mask, other=ignore_index).to(tl.int64)
    w_base = W + pid_k.to(tl.int64) * stride_w_exit

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    target = tl.zeros([BLOCK_M], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        vocab = v0 + tl.arange(0, BLOCK_V)
        vocab_mask = vocab < V
        acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_mask = cols < D
            y = tl.load(
                Y + rows[:, None] * D + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0
            ).to(tl.float32)
            w = tl.load(
                w_base + vocab[:, None].to(tl.int64) * D + cols[None, :],
                mask=vocab_mask[:, None] & col_mask[None, :],
                other=0.0,
            ).to(tl.float32)
            if DOT_IN_INPUT_DTYPE:
                acc = tl.dot(y.to(Y.dtype.element_ty), tl.trans(w.to(W.dtype.element_ty)), acc)
            else:
                acc = tl.dot(y, tl.trans(w), acc, input_precision=INPUT_PRECISION)
        logits = tl.where(vocab_mask[None, :], acc, float("-inf"))
        # Online log-sum-exp: every tile has >= 1 real column, so m_new is finite and exp(-inf) = 0
        # handles the first tile.
        m_new = tl.maximum(m_i, tl.max(logits, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), axis=1)
        m_i = m_new
        target += tl.sum(tl.where(vocab[None, :] == labels[:, None], acc, 0.0), axis=1)

    lse = m_i + tl.log(l_i)
    valid = row_mask & (labels != ignore_index)
    tl.store(LSE + rows, lse, mask=row_mask)
    tl.store(ROW_LOSS + rows, tl.where(valid, lse - target, 0.0), mask=row_mask)


@triton.jit
def _exit_ce_bwd_kernel(
    Y,
    W,
    LABELS,
    LSE,
    EXIT_SCALE,
    GRAD_Y,
    GRAD_W,
    K,
    N,
    V,
    D,
    stride_w_exit,
    ignore_index,
    EXITS_PER_PROGRAM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP_N: tl.constexpr,
    COMPUTE_GRAD_Y: tl.constexpr,
    COMPUTE_GRAD_W: tl.constexpr,
    DOT_IN_INPUT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    # Grouped launch order (as in Triton's matmul tutorial): consecutive programs cover GROUP_N token
    # tiles x a run of vocab tiles, so the grad_y rows and grad_W rows they add into stay in L2.
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_v = tl.cdiv(V, BLOCK_V)
    pids_per_group = GROUP_N * num_pid_v
    first_pid_n = (pid // pids_per_group) * GROUP_N
    group_size_n = tl.minimum(num_pid_n - first_pid_n, GROUP_N)
    pid_n = first_pid_n + (pid % pids_per_group) % group_size_n
    pid_v = (pid % pids_per_group) // group_size_n
    BLOCK_M: tl.constexpr = EXITS_PER_PROGRAM * BLOCK_N
    r = tl.arange(0, BLOCK_M)
    exits = pid_k * EXITS_PER_PROGRAM + r // BLOCK_N
    tokens = pid_n * BLOCK_N + r % BLOCK_N
    row_mask = (exits < K) & (tokens < N)
    rows = (exits * N + tokens).to(tl.int64)
    labels = tl.load(LABELS + tokens, mask=row_mask, other=ignore_index).to(tl.int64)
    lse = tl.load(LSE + rows, mask=row_mask, other=0.0)
    # d loss / d row loss: upstream grad * exit weight / number of valid tokens; 0 for ignored rows.
    scale = tl.load(EXIT_SCALE + exits, mask=exits < K, other=0.0)
    scale = tl.where(row_mask & (labels != ignore_index), scale, 0.0)

    w_base = W + pid_k.to(tl.int64) * stride_w_exit
    gw_base = GRAD_W + pid_k.to(tl.int64) * stride_w_exit
    vocab = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    vocab_mask = vocab < V

    acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_mask = cols < D
        y = tl.load(
            Y + rows[:, None] * D + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0
        ).to(tl.float32)
        w = tl.load(
            w_base + vocab[:, None].to(tl.int64) * D + cols[None, :],
            mask=vocab_mask[:, None] & col_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        if DOT_IN_INPUT_DTYPE:
            acc = tl.dot(y.to(Y.dtype.element_ty), tl.trans(w.to(W.dtype.element_ty)), acc)
        else:
            acc = tl.dot(y, tl.trans(w), acc, input_precision=INPUT_PRECISION)

    probs = tl.where(vocab_mask[None, :], tl.exp(acc - lse[:, None]), 0.0)
    onehot = tl.where(vocab[None, :] == labels[:, None], 1.0, 0.0)
    # dz = scale * (probs - onehot), but what goes to tl.dot is dz / max|scale| (entries in [-1, 1]) and
    # the fp32 dot results are multiplied by max|scale| afterwards: folding scale (upstream * w_k / count,
    # ~6e-5 at 16k tokens) into the fp16 operand would flush probs ~ 1/V to zero, and a loss-scaled
    # upstream (65536 * w_k / few tokens) would overflow fp16. With one exit per program (per-exit heads,
    # or K = 1) the ratio is exactly 1 on valid rows.
    max_scale = tl.max(tl.abs(scale), axis=0)
    max_scale = tl.where(max_scale > 0, max_scale, 1.0)
    dz = (probs - onehot) * (scale / max_scale)[:, None]
    if DOT_IN_INPUT_DTYPE:
        dz = dz.to(Y.dtype.element_ty)

    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_mask = cols < D
        if COMPUTE_GRAD_Y:
            w = tl.load(
                w_base + vocab[:, None].to(tl.int64) * D + cols[None, :],
                mask=vocab_mask[:, None] & col_mask[None, :],
                other=0.0,
            ).to(tl.float32)
            if DOT_IN_INPUT_DTYPE:
                grad_y = tl.dot(dz, w.to(W.dtype.element_ty))
            else:
                grad_y = tl.dot(dz, w, input_precision=INPUT_PRECISION)
            tl.atomic_add(
                GRAD_Y + rows[:, None] * D + cols[None, :],
                grad_y * max_scale,
                mask=row_mask[:, None] & col_mask[None, :],
            )
        if COMPUTE_GRAD_W:
            y = tl.load(
                Y + rows[:, None] * D + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0
            ).to(tl.float32)
            if DOT_IN_INPUT_DTYPE:
                grad_w = tl.dot(tl.trans(dz), y.to(Y.dtype.element_ty))
            else:
                grad_w = tl.dot(tl.trans(dz), y, input_precision=INPUT_PRECISION)
            tl.atomic_add(
                gw_base + vocab[:, None].to(tl.int64) * D + cols[None, :],
                grad_w * max_scale,
                mask=vocab_mask[:, None] & col_mask[None, :],
            )


def _config(num_exits: int, shared: bool, config: dict | None) -> dict:
    """Tile sizes (+ GROUP_N, the backward launch grouping). GPU defaults are starting points, untuned."""
    exits_per_program = triton.next_power_of_2(num_exits) if shared else 1
    if triton_interpreting():
        # The interpreter pays per op, not per element: few, large tiles.
        out = dict(BLOCK_N=16, BLOCK_V=64, BLOCK_D=64, GROUP_N=2)
    else:
        out = dict(BLOCK_N=max(16, 64 // exits_per_program), BLOCK_V=128, BLOCK_D=64, GROUP_N=8)
    out.update(config or {})
    out["EXITS_PER_PROGRAM"] = exits_per_program
    for name in ("BLOCK_N", "BLOCK_V", "BLOCK_D"):
        value = out[name]
        if value < 16 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two >= 16 (tl.dot tiles), got {value}")
    return out


def _dot_mode(dtype: torch.dtype) -> dict:
    if triton_interpreting():
        return dict(DOT_IN_INPUT_DTYPE=False, INPUT_PRECISION="ieee")
    if dtype in (torch.float16, torch.bfloat16):
        return dict(DOT_IN_INPUT_DTYPE=True, INPUT_PRECISION="ieee")
    return dict(
        DOT_IN_INPUT_DTYPE=False, INPUT_PRECISION="tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    )


def head_ce_forward(
    y: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    config: dict | None = None,
):
    """Runs the forward kernel.

    Args:
        y: ``(K, N, D)`` normalised hidden states, contiguous.
        lm_head_weight: ``(V, D)`` or ``(K, V, D)``, contiguous.
        labels: ``(N,)`` contiguous integer ids.
        ignore_index: label value to skip.
        config: optional overrides (``BLOCK_N``, ``BLOCK_V``, ``BLOCK_D``, ``GROUP_N``, ``num_warps``,
            ``num_stages``; for tests also ``DOT_IN_INPUT_DTYPE`` / ``INPUT_PRECISION``, the dot mode).

    Returns:
        ``(lse, row_loss)``: both ``(K, N)`` fp32.
    """
    num_exits, num_tokens, dim = y.shape
    shared = lm_head_weight.dim() == 2
    vocab_size = lm_head_weight.shape[-2]
    cfg = _config(num_exits, shared, config)
    cfg.pop("GROUP_N")
    lse = torch.empty(num_exits, num_tokens, dtype=torch.float32, device=y.device)
    row_loss = torch.empty_like(lse)
    grid = (triton.cdiv(num_tokens, cfg["BLOCK_N"]), 1 if shared else num_exits)
    _exit_ce_fwd_kernel[grid](
        y,
        lm_head_weight,
        labels,
        lse,
        row_loss,
        num_exits,
        num_tokens,
        vocab_size,
        dim,
        0 if shared else vocab_size * dim,
        ignore_index,
        **{**_dot_mode(y.dtype), **cfg},
    )
    return lse, row_loss


def head_ce_backward(
    y: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    exit_scale: torch.Tensor,
    ignore_index: int,
    compute_grad_y: bool,
    compute_grad_w: bool,
    config: dict | None = None,
):
    """Runs the backward kernel.

    Args:
        y, lm_head_weight, labels, ignore_index, config: as :func:`head_ce_forward`.
        lse: ``(K, N)`` fp32 from the forward.
        exit_scale: ``(K,)`` fp32, d loss / d (per-row loss) of each exit (upstream * weight / count).
        compute_grad_y / compute_grad_w: which gradients to produce.

    Returns:
        ``(grad_y, grad_w)``: ``(K, N, D)`` fp32 and the shape of ``lm_head_weight`` in fp32 (or None).
    """
    num_exits, num_tokens, dim = y.shape
    shared = lm_head_weight.dim() == 2
    vocab_size = lm_head_weight.shape[-2]
    cfg = _config(num_exits, shared, config)
    group_n = cfg.pop("GROUP_N")
    grad_y = torch.zeros(y.shape, dtype=torch.float32, device=y.device) if compute_grad_y else None
    grad_w = (
        torch.zeros(lm_head_weight.shape, dtype=torch.float32, device=y.device) if compute_grad_w else None
    )
    if not (compute_grad_y or compute_grad_w):
        return grad_y, grad_w
    dummy = lse  # never dereferenced when the matching COMPUTE_* flag is off
    grid = (
        triton.cdiv(num_tokens, cfg["BLOCK_N"]) * triton.cdiv(vocab_size, cfg["BLOCK_V"]),
        1 if shared else num_exits,
    )
    _exit_ce_bwd_kernel[grid](
        y,
        lm_head_weight,
        labels,
        lse,
        exit_scale,
        grad_y if grad_y is not None else dummy,
        grad_w if grad_w is not None else dummy,
        num_exits,
        num_tokens,
        vocab_size,
        dim,
        0 if shared else vocab_size * dim,
        ignore_index,
        GROUP_N=group_n,
        COMPUTE_GRAD_Y=compute_grad_y,
        COMPUTE_GRAD_W=compute_grad_w,
        **{**_dot_mode(y.dtype), **cfg},
    )
    return grad_y, grad_w


class TritonExitHeadLoss(torch.autograd.Function):
    """Autograd Function of the Triton path; same inputs/outputs as ``ChunkedExitHeadLoss`` minus chunk_size
    (``config`` instead: tile-size overrides or None)."""

    @staticmethod
    def forward(ctx, hidden, lm_head_weight, labels, norm_weights, exit_weights, eps, ignore_index, config):
        hidden = hidden.contiguous()
        lm_head_weight = lm_head_weight.contiguous()
        labels = labels.contiguous()
        norm_weights = norm_weights.contiguous() if norm_weights is not None else None
        num_exits, num_tokens, _ = hidden.shape
        count = (labels != ignore_index).sum().clamp_min(1).float()
        if num_tokens == 0:
            lse = torch.zeros(num_exits, 0, dtype=torch.float32, device=hidden.device)
            per_exit_losses = torch.zeros(num_exits, dtype=torch.float32, device=hidden.device)
        else:
            y = rms_norm_forward(hidden, norm_weights, eps)[0] if norm_weights is not None else hidden
            lse, row_loss = head_ce_forward(y, lm_head_weight, labels, ignore_index, config)
            per_exit_losses = row_loss.sum(1) / count
        loss = (per_exit_losses * exit_weights).sum()
        ctx.save_for_backward(hidden, lm_head_weight, labels, norm_weights, exit_weights, lse, count)
        ctx.eps, ctx.ignore_index, ctx.config = eps, ignore_index, config
        return loss, per_exit_losses

    @staticmethod
    def backward(ctx, grad_loss, grad_per_exit):
        hidden, lm_head_weight, labels, norm_weights, exit_weights, lse, count = ctx.saved_tensors
        need_hidden, need_head, _, need_norm = ctx.needs_input_grad[:4]
        need_norm = need_norm and norm_weights is not None
        upstream = torch.zeros_like(exit_weights)
        if grad_loss is not None:
            upstream = upstream + grad_loss.float() * exit_weights
        if grad_per_exit is not None:
            upstream = upstream + grad_per_exit.float()
        exit_scale = (upstream / count).contiguous()

        if hidden.shape[1] == 0:
            grad_hidden = torch.zeros_like(hidden) if need_hidden else None
            grad_head = torch.zeros_like(lm_head_weight) if need_head else None
            grad_norm = torch.zeros_like(norm_weights) if need_norm else None
            return grad_hidden, grad_head, None, grad_norm, None, None, None, None

        # Recompute the normalised states (one read of hidden) instead of keeping a K x N x D copy.
        if norm_weights is not None:
            y, rstd = rms_norm_forward(hidden, norm_weights, ctx.eps)
        else:
            y, rstd = hidden, None
        grad_y, grad_w = head_ce_backward(
            y,
            lm_head_weight,
            labels,
            lse,
            exit_scale,
            ctx.ignore_index,
            compute_grad_y=need_hidden or need_norm,
            compute_grad_w=need_head,
            config=ctx.config,
        )
        del y
        grad_hidden = grad_norm = None
        if norm_weights is not None and (need_hidden or need_norm):
            grad_hidden, grad_norm32 = rms_norm_backward(hidden, norm_weights, rstd, grad_y, need_norm)
            grad_norm = grad_norm32.to(norm_weights.dtype) if need_norm else None
        elif need_hidden:
            grad_hidden = grad_y.to(hidden.dtype)
        if not need_hidden:
            grad_hidden = None
        grad_head = grad_w.to(lm_head_weight.dtype) if need_head else None
        return grad_hidden, grad_head, None, grad_norm, None, None, None, None


def exit_head_loss_triton(
    hidden, lm_head_weight, labels, norm_weights, eps, exit_weights, ignore_index, config: dict | None = None
):
    """Triton path; arguments as :func:`triton_kernels.ops.exit_head_loss.exit_head_loss` with
    ``exit_weights`` already a ``(K,)`` fp32 tensor. ``config`` overrides tile sizes (tests, tuning)."""
    return TritonExitHeadLoss.apply(
        hidden, lm_head_weight, labels, norm_weights, exit_weights, eps, ignore_index, config
    )
