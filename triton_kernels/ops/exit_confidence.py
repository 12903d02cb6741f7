"""Exit confidence: RMSNorm -> LM head -> (argmax, max softmax probability, entropy) at one exit.

Implementations (`impl=`): `"naive"` (full logits), `"chunked"` (chunks of rows, the CPU default) and
`"triton"` (one pass over vocabulary tiles with online statistics). fp32 statistics with Qwen3RMSNorm
numerics; argmax ties resolve to the lowest token id; no gradients (inference only).
Details: docs/choices.md#kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from triton_kernels.ops.utils import (
    check_exit_confidence_args,
    check_triton_usable,
    resolve_impl,
    rms_norm_reference,
)

#: Target size, in fp32 elements, of the per-chunk logits buffer of the chunked path (chunk x V).
DEFAULT_CHUNK_ELEMENTS = 2**23


def exit_confidence(
    hidden: torch.Tensor,
    norm_weight: torch.Tensor | None,
    lm_head_weight: torch.Tensor,
    eps: float = 1e-6,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy token, max softmax probability and entropy of one exit's head, without B x V logits.

    Args:
        hidden: ``(B, D)`` hidden states at the exit, *before* the exit norm. fp32, fp16 or bf16.
        norm_weight: ``(D,)`` the exit's RMSNorm weight, or None to use ``hidden`` as is (no norm).
        lm_head_weight: ``(V, D)`` head weight, same dtype as ``hidden``.
        eps: RMSNorm epsilon.
        impl: ``"triton"``, ``"chunked"``, ``"naive"`` or ``"auto"`` (triton on CUDA, chunked elsewhere;
            on an H200 the kernel took 1.03x the naive path's time at 4096 rows and 0.79x at 64; an earlier
            run: 1.01x and 0.69x; benchmarks/RESULTS.md).

    Returns:
        ``(token_ids, max_prob, entropy)``: ``(B,)`` int64 argmax ids (ties: lowest id), ``(B,)`` fp32
        max softmax probability, ``(B,)`` fp32 softmax entropy in nats.

    Raises:
        ValueError: unknown ``impl``, shapes that disagree (D), mismatched dtypes or devices.
        RuntimeError: ``impl="triton"`` on CPU without ``TRITON_INTERPRET=1``.
    """
    check_exit_confidence_args(hidden, norm_weight, lm_head_weight)
    chosen = resolve_impl(impl, hidden.device)
    if chosen == "naive":
        return exit_confidence_reference(hidden, norm_weight, lm_head_weight, eps)
    if chosen == "chunked":
        return exit_confidence_chunked(hidden, norm_weight, lm_head_weight, eps)
    check_triton_usable(hidden.device)
    from triton_kernels.ops.exit_confidence_triton import exit_confidence_triton

    return exit_confidence_triton(hidden, norm_weight, lm_head_weight, eps)


def _stats_from_logits(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    log_probs = torch.log_softmax(logits, dim=-1)
    token_ids = logits.argmax(-1)
    max_prob = log_probs.amax(-1).exp()
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return token_ids, max_prob, entropy


@torch.no_grad()
def exit_confidence_reference(
    hidden: torch.Tensor,
    norm_weight: torch.Tensor | None,
    lm_head_weight: torch.Tensor,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference (``impl="naive"``): ``(B, V)`` fp32 logits, ``log_softmax``, ``argmax``.

    Shapes and semantics as :func:`exit_confidence`.
    """
    y = hidden if norm_weight is None else rms_norm_reference(hidden, norm_weight, eps)
    return _stats_from_logits(F.linear(y, lm_head_weight).float())


@torch.no_grad()
def exit_confidence_chunked(
    hidden: torch.Tensor,
    norm_weight: torch.Tensor | None,
    lm_head_weight: torch.Tensor,
    eps: float = 1e-6,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chunked pure-torch path (``impl="chunked"``); shapes and semantics as :func:`exit_confidence`.

    Args:
        chunk_size: rows per chunk; default about ``DEFAULT_CHUNK_ELEMENTS / V``. Extra memory: two
            reused ``chunk_size x V`` fp32 buffers.
    """
    num_rows = hidden.shape[0]
    vocab_size = lm_head_weight.shape[0]
    if chunk_size is None:
        chunk_size = max(1, DEFAULT_CHUNK_ELEMENTS // vocab_size)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    token_ids = torch.empty(num_rows, dtype=torch.long, device=hidden.device)
    max_prob = torch.empty(num_rows, dtype=torch.float32, device=hidden.device)
    entropy = torch.empty(num_rows, dtype=torch.float32, device=hidden.device)
    # Two reused chunk x V fp32 buffers (no per-chunk allocation): shifted logits and their exp.
    rows = min(chunk_size, num_rows)
    shifted_buf = torch.empty(rows * vocab_size, dtype=torch.float32, device=hidden.device)
    exp_buf = torch.empty_like(shifted_buf)
    for start in range(0, num_rows, chunk_size):
        stop = min(num_rows, start + chunk_size)
        h = hidden[start:stop]
        y = h if norm_weight is None else rms_norm_reference(h, norm_weight, eps)
        shifted = shifted_buf[: (stop - start) * vocab_size].view(stop - start, vocab_size)
        if hidden.dtype == torch.float32:
            torch.mm(y, lm_head_weight.t(), out=shifted)
        else:
            shifted.copy_(F.linear(y, lm_head_weight))
        token_ids[start:stop] = shifted.argmax(-1)
        shifted.sub_(shifted.amax(-1, keepdim=True))  # z - max
        exp_shifted = torch.exp(shifted, out=exp_buf[: shifted.numel()].view_as(shifted))
        sum_exp = exp_shifted.sum(-1)
        # entropy = log(l) - sum(exp(z - m) * (z - m)) / l, l = sum exp(z - m); max prob = 1 / l
        weighted = exp_shifted.mul_(shifted).sum(-1)
        max_prob[start:stop] = sum_exp.reciprocal()
        entropy[start:stop] = sum_exp.log() - weighted / sum_exp
    return token_ids, max_prob, entropy
