"""Triton path of `triton_kernels.exit_confidence`: softmax statistics in one pass over the vocabulary.

`_exit_confidence_kernel` (grid: row tiles x vocabulary splits) folds each logits tile into running
max/argmax, `l = sum exp(z - m)` and `t = sum exp(z - m) (z - m)`; the per-split statistics are merged in
torch. No logits tensor is written. Imported only for `impl="triton"`. Why: docs/choices.md#kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton_kernels.ops.exit_head_loss_triton import _dot_mode
from triton_kernels.ops.rms_norm_triton import rms_norm_forward
from triton_kernels.ops.utils import triton_interpreting


@triton.jit
def _exit_confidence_kernel(
    Y,
    W,
    PART_MAX,
    PART_SUM,
    PART_T,
    PART_ARG,
    B,
    V,
    D,
    vocab_per_split,
    BLOCK_B: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_IN_INPUT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    rows64 = rows.to(tl.int64)
    v_start = pid_s * vocab_per_split
    v_stop = tl.minimum(v_start + vocab_per_split, V)

    m_i = tl.full([BLOCK_B], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_B], dtype=tl.float32)
    t_i = tl.zeros([BLOCK_B], dtype=tl.float32)
    best = tl.zeros([BLOCK_B], dtype=tl.int32)
    for v0 in range(v_start, v_stop, BLOCK_V):
        vocab = v0 + tl.arange(0, BLOCK_V)
        vocab_mask = vocab < v_stop
        acc = tl.zeros([BLOCK_B, BLOCK_V], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_mask = cols < D
            y = tl.load(
                Y + rows64[:, None] * D + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0
            ).to(tl.float32)
            w = tl.load(
                W + vocab[:, None].to(tl.int64) * D + cols[None, :],
                mask=vocab_mask[:, None] & col_mask[None, :],
                other=0.0,
            ).to(tl.float32)
            if DOT_IN_INPUT_DTYPE:
                acc = tl.dot(y.to(Y.dtype.element_ty), tl.trans(w.to(W.dtype.element_ty)), acc)
            else:
                acc = tl.dot(y, tl.trans(w), acc, input_precision=INPUT_PRECISION)
        logits = tl.where(vocab_mask[None, :], acc, float("-inf"))
        tile_max = tl.max(logits, axis=1)
        tile_arg = tl.argmax(logits, axis=1) + v0  # lowest index among equal maxima
        m_new = tl.maximum(m_i, tile_max)
        alpha = tl.exp(m_i - m_new)  # 0 on the first tile (m_i = -inf)
        shifted = tl.where(vocab_mask[None, :], logits - m_new[:, None], 0.0)
        e = tl.where(vocab_mask[None, :], tl.exp(shifted), 0.0)
        delta = tl.where(l_i > 0, m_i - m_new, 0.0)  # avoid -inf * 0 on the first tile
        t_i = alpha * (t_i + delta * l_i) + tl.sum(e * shifted, axis=1)
        l_i = alpha * l_i + tl.sum(e, axis=1)
        best = tl.where(tile_max > m_i, tile_arg.to(tl.int32), best)
        m_i = m_new

    out = pid_s.to(tl.int64) * B + rows64
    tl.store(PART_MAX + out, m_i, mask=row_mask)
    tl.store(PART_SUM + out, l_i, mask=row_mask)
    tl.store(PART_T + out, t_i, mask=row_mask)
    tl.store(PART_ARG + out, best, mask=row_mask)


def _num_splits(row_tiles: int, vocab_tiles: int, device: torch.device) -> int:
    if triton_interpreting() or device.type != "cuda":
        return 1 if vocab_tiles < 4 else 2  # 2 exercises the merge in tests; the interpreter is serial
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(vocab_tiles, triton.cdiv(2 * sms, row_tiles)))


@torch.no_grad()
def exit_confidence_triton(
    hidden: torch.Tensor,
    norm_weight: torch.Tensor | None,
    lm_head_weight: torch.Tensor,
    eps: float = 1e-6,
    config: dict | None = None,
):
    """Triton path; arguments and returns as :func:`triton_kernels.ops.exit_confidence.exit_confidence`.

    Args:
        config: optional overrides: ``BLOCK_B``, ``BLOCK_V``, ``BLOCK_D`` (powers of two >= 16),
            ``splits`` (vocabulary splits), ``num_warps``.
    """
    num_rows, dim = hidden.shape
    vocab_size = lm_head_weight.shape[0]
    device = hidden.device
    if num_rows == 0:
        empty = torch.empty(0, dtype=torch.float32, device=device)
        return torch.empty(0, dtype=torch.long, device=device), empty, empty.clone()
    hidden = hidden.contiguous()
    lm_head_weight = lm_head_weight.contiguous()
    if norm_weight is not None:
        y = rms_norm_forward(hidden.view(1, num_rows, dim), norm_weight.contiguous().view(1, dim), eps)[0]
        y = y.view(num_rows, dim)
    else:
        y = hidden

    cfg = dict(config or {})
    if triton_interpreting():
        blocks = dict(BLOCK_B=16, BLOCK_V=64, BLOCK_D=64)
    else:
        blocks = dict(BLOCK_B=min(64, max(16, triton.next_power_of_2(num_rows))), BLOCK_V=128, BLOCK_D=64)
    for name in blocks:
        blocks[name] = cfg.pop(name, blocks[name])
        if blocks[name] < 16 or blocks[name] & (blocks[name] - 1):
            raise ValueError(f"{name} must be a power of two >= 16 (tl.dot tiles), got {blocks[name]}")
    row_tiles = triton.cdiv(num_rows, blocks["BLOCK_B"])
    vocab_tiles = triton.cdiv(vocab_size, blocks["BLOCK_V"])
    splits = cfg.pop("splits", None) or _num_splits(row_tiles, vocab_tiles, device)
    # Whole tiles per split, and no empty split (an empty split would merge -inf * 0 = NaN).
    vocab_per_split = triton.cdiv(vocab_tiles, min(splits, vocab_tiles)) * blocks["BLOCK_V"]
    splits = triton.cdiv(vocab_size, vocab_per_split)

    part_max = torch.empty(splits, num_rows, dtype=torch.float32, device=device)
    part_sum = torch.empty_like(part_max)
    part_t = torch.empty_like(part_max)
    part_arg = torch.empty(splits, num_rows, dtype=torch.int32, device=device)
    _exit_confidence_kernel[(row_tiles, splits)](
        y,
        lm_head_weight,
        part_max,
        part_sum,
        part_t,
        part_arg,
        num_rows,
        vocab_size,
        dim,
        vocab_per_split,
        **blocks,
        **_dot_mode(hidden.dtype),
        **cfg,
    )

    # Merge the splits: rescale each split's sums to the global max (first split wins ties: lowest id).
    best_split = part_max.argmax(0, keepdim=True)
    global_max = part_max.gather(0, best_split)
    rescale = torch.exp(part_max - global_max)
    sum_exp = (part_sum * rescale).sum(0)
    t_sum = (rescale * (part_t + (part_max - global_max) * part_sum)).sum(0)
    token_ids = part_arg.gather(0, best_split).squeeze(0).long()
    max_prob = sum_exp.reciprocal()
    entropy = sum_exp.log() - t_sum / sum_exp
    return token_ids, max_prob, entropy
