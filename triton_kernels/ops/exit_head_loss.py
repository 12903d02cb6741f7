"""Early-exit head loss: RMSNorm -> LM head -> cross-entropy for K exits, weighted sum.

Three implementations with one contract (`exit_head_loss`, `impl=`): `"naive"` (reference, full logits,
memory O(K*N*V)), `"chunked"` (pure torch, tokens in chunks, backward recomputes the logits unless all
tokens fit in one chunk, whose logits it then keeps; the default on CPU and on CUDA, with a chunk budget
per device) and `"triton"` (fused kernels, the least memory, but its backward's atomics make it slow on
a GPU: `CUDA_DEFAULT_IMPL`; CPU only under `TRITON_INTERPRET=1`). All paths share Qwen3RMSNorm
numerics, fp32 logits, a per-exit token-mean loss and loss 0 with zero gradients when every token is
ignored. Details: docs/choices.md#kernels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from triton_kernels.ops.utils import (
    check_exit_head_loss_args,
    check_label_range,
    check_triton_usable,
    exit_weights_tensor,
    resolve_impl,
    rms_norm_reference,
)

#: Target size, in fp32 elements, of the per-chunk logits buffer of the chunked path (K x chunk x V).
#: 2**24 elements = 64 MiB; see benchmarks/RESULTS.md for the measured memory/time trade-off.
DEFAULT_CHUNK_ELEMENTS = 2**24
#: The same on CUDA: 2**29 elements (2 GiB). A chunk's tokens are the rows of the head's GEMMs and
#: cuBLAS needs hundreds of them: on an H200 (K=4, N=16384, D=4096, V=128256, bf16) forward + backward
#: took 1.88 s at 32 tokens a chunk (the CPU budget), 0.68 s at 256, 0.58 s at 1024 (this budget: peak
#: 6.9 GB, 0.28x one materialised head) and 0.56 s at 4096; the naive loss 0.41 s at 50 GB.
CUDA_CHUNK_ELEMENTS = 2**29
#: What ``impl="auto"`` runs on CUDA. Not "triton": its backward adds every logits tile into grad_hidden
#: and grad_W with fp32 atomics and took 4.99 s at the shape above (12x the naive loss; its forward alone
#: 0.19 s; the best tile settings tried, 3.30 s). benchmarks/RESULTS.md ("Triton path").
CUDA_DEFAULT_IMPL = "chunked"


def default_chunk_size(num_exits: int, vocab_size: int, device_type: str = "cpu") -> int:
    """Tokens per chunk so that a K x chunk x V fp32 logits buffer holds about DEFAULT_CHUNK_ELEMENTS
    (CUDA_CHUNK_ELEMENTS when `device_type` is ``"cuda"``)."""
    budget = CUDA_CHUNK_ELEMENTS if device_type == "cuda" else DEFAULT_CHUNK_ELEMENTS
    return max(16, budget // (num_exits * vocab_size))


def exit_head_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    norm_weights: torch.Tensor | None = None,
    eps: float = 1e-6,
    exit_weights: Sequence[float] | torch.Tensor | None = None,
    ignore_index: int = -100,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted sum of the per-exit cross-entropy losses of K early exits, without N x V logits.

    For each exit k: ``CE_k = mean over non-ignored tokens of cross_entropy(rmsnorm_k(hidden[k]) @ W_k.T,
    labels)``; the loss is ``sum_k exit_weights[k] * CE_k``.

    Args:
        hidden: ``(K, N, D)`` hidden states, one slice per exit, *before* the exit norm. fp32, fp16 or bf16.
        lm_head_weight: ``(V, D)`` head shared by all exits, or ``(K, V, D)`` one head per exit. Same
            dtype as ``hidden``.
        labels: ``(N,)`` integer target ids, already shifted by the caller; ``ignore_index`` marks
            tokens without a target.
        norm_weights: ``(K, D)`` RMSNorm weights of the exits, or None to use ``hidden`` as is (no norm).
        eps: RMSNorm epsilon.
        exit_weights: K floats (list or tensor), the weight of each exit's loss; default all 1.
            Treated as constants (no gradient).
        ignore_index: label value that contributes neither loss nor gradient.
        impl: ``"triton"``, ``"chunked"``, ``"naive"`` or ``"auto"`` (chunked on every device:
            :data:`CUDA_DEFAULT_IMPL`).

    Returns:
        ``(loss, per_exit_losses)``: a scalar fp32 tensor and a ``(K,)`` fp32 tensor; both are
        differentiable w.r.t. ``hidden``, ``norm_weights`` and ``lm_head_weight``.

    Raises:
        ValueError: unknown ``impl``; shapes that disagree (K, D, N), mismatched dtypes or devices;
            labels outside ``[0, V)`` that are not ``ignore_index``.
        RuntimeError: ``impl="triton"`` on CPU without ``TRITON_INTERPRET=1``.
    """
    check_exit_head_loss_args(hidden, lm_head_weight, labels, norm_weights)
    chosen = resolve_impl(impl, hidden.device, cuda_default=CUDA_DEFAULT_IMPL)
    weights = exit_weights_tensor(exit_weights, hidden.shape[0], hidden.device)
    check_label_range(labels, lm_head_weight.shape[-2], ignore_index)
    if chosen == "naive":
        return exit_head_loss_reference(
            hidden, lm_head_weight, labels, norm_weights, eps, weights, ignore_index
        )
    if chosen == "chunked":
        return exit_head_loss_chunked(
            hidden, lm_head_weight, labels, norm_weights, eps, weights, ignore_index
        )
    check_triton_usable(hidden.device)
    from triton_kernels.ops.exit_head_loss_triton import exit_head_loss_triton

    return exit_head_loss_triton(hidden, lm_head_weight, labels, norm_weights, eps, weights, ignore_index)


def exit_head_loss_reference(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    norm_weights: torch.Tensor | None = None,
    eps: float = 1e-6,
    exit_weights: Sequence[float] | torch.Tensor | None = None,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference (``impl="naive"``): per exit, full logits and ``F.cross_entropy``; autograd backward.

    Shapes and semantics as :func:`exit_head_loss`. Memory: a K x N x V fp32 logits tensor plus the
    softmax saved for backward.
    """
    num_exits = hidden.shape[0]
    weights = exit_weights_tensor(exit_weights, num_exits, hidden.device)
    count = (labels != ignore_index).sum().clamp_min(1).float()
    per_exit = []
    for k in range(num_exits):
        y = hidden[k] if norm_weights is None else rms_norm_reference(hidden[k], norm_weights[k], eps)
        head = lm_head_weight if lm_head_weight.dim() == 2 else lm_head_weight[k]
        logits = F.linear(y, head).float()
        ce_sum = F.cross_entropy(logits, labels.long(), ignore_index=ignore_index, reduction="sum")
        per_exit.append(ce_sum / count)
    per_exit_losses = torch.stack(per_exit)
    return (per_exit_losses * weights).sum(), per_exit_losses


def exit_head_loss_chunked(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    norm_weights: torch.Tensor | None = None,
    eps: float = 1e-6,
    exit_weights: Sequence[float] | torch.Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked pure-torch path (``impl="chunked"``); shapes and semantics as :func:`exit_head_loss`.

    Args:
        chunk_size: tokens per chunk (all K exits of those tokens are processed together); default
            :func:`default_chunk_size`. Beyond the gradients themselves, the extra memory is one reused
            ``K * chunk_size * V`` fp32 buffer (plus one in the input dtype when that is not fp32).
            When every token fits in one chunk (N <= chunk_size) the forward's buffer, holding the
            logits, is kept for the backward, which then skips the head matmul that recomputes them
            (3 instead of 4 N x V x D matmuls per exit; the same values, so the same results bit for
            bit); the forward then needs a second such buffer for the softmax sums, for its duration.
    """
    num_exits, _, _ = hidden.shape
    vocab_size = lm_head_weight.shape[-2]
    weights = exit_weights_tensor(exit_weights, num_exits, hidden.device)
    if chunk_size is None:
        chunk_size = default_chunk_size(num_exits, vocab_size, hidden.device.type)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return ChunkedExitHeadLoss.apply(
        hidden, lm_head_weight, labels, norm_weights, weights, eps, ignore_index, chunk_size
    )


def _normed_chunk(h: torch.Tensor, norm_weights: torch.Tensor | None, eps: float):
    """RMSNorm of a K x C x D chunk; returns (y, x32, rstd, normed) (the last three None without norm)."""
    if norm_weights is None:
        return h, None, None, None
    x32 = h.float()
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    normed = (x32 * rstd).to(h.dtype)  # Qwen3RMSNorm: cast back to the input dtype before the weight
    return norm_weights[:, None, :] * normed, x32, rstd, normed


class _LogitsBuffer:
    """One reusable K x chunk x V fp32 buffer (plus one in the input dtype when that is not fp32).

    Reusing it keeps the chunk loop from allocating, and page-faulting in, a fresh multi-MiB tensor
    per chunk (large CPU allocations are mmap-ed and returned to the OS on free).
    """

    def __init__(self, num_exits: int, chunk_size: int, vocab_size: int, dtype: torch.dtype, device):
        size = num_exits * chunk_size * vocab_size
        self.fp32 = torch.empty(size, dtype=torch.float32, device=device)
        self.native = None if dtype == torch.float32 else torch.empty(size, dtype=dtype, device=device)

    def logits(self, y: torch.Tensor, lm_head_weight: torch.Tensor) -> torch.Tensor:
        """K x C x D normalised states -> K x C x V fp32 logits, written into the buffer."""
        num_exits, chunk, dim = y.shape
        vocab_size = lm_head_weight.shape[-2]
        size = num_exits * chunk * vocab_size
        target = self.fp32 if self.native is None else self.native
        out = target[:size].view(num_exits, chunk, vocab_size)
        if lm_head_weight.dim() == 2:
            # Shared head: one matmul for all K exits, so the weight streams through the cache once.
            torch.mm(
                y.reshape(num_exits * chunk, dim),
                lm_head_weight.t(),
                out=out.view(num_exits * chunk, vocab_size),
            )
        else:
            torch.bmm(y, lm_head_weight.transpose(1, 2), out=out)
        if self.native is None:
            return out
        return self.fp32[:size].view(num_exits, chunk, vocab_size).copy_(out)

    def to_native(self, values: torch.Tensor) -> torch.Tensor:
        """fp32 chunk -> the input dtype, in the second buffer (identity for fp32 inputs)."""
        if self.native is None:
            return values
        return self.native[: values.numel()].view(values.shape).copy_(values)


class ChunkedExitHeadLoss(torch.autograd.Function):
    """Autograd Function of the chunked path: forward keeps only lse (K x N), backward recomputes logits.

    Inputs (positional): hidden ``(K, N, D)``, lm_head_weight ``(V, D)`` or ``(K, V, D)``, labels ``(N,)``,
    norm_weights ``(K, D)`` or None, exit_weights ``(K,)`` fp32, eps, ignore_index, chunk_size.
    Outputs: loss (scalar fp32), per_exit_losses ``(K,)`` fp32; both may receive gradients.
    """

    @staticmethod
    def forward(
        ctx, hidden, lm_head_weight, labels, norm_weights, exit_weights, eps, ignore_index, chunk_size
    ):
        num_exits, num_tokens, _ = hidden.shape
        valid = labels != ignore_index
        safe_labels = torch.where(valid, labels, 0).long()
        count = valid.sum().clamp_min(1).float()
        loss_sums = torch.zeros(num_exits, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(num_exits, num_tokens, dtype=torch.float32, device=hidden.device)
        buffer = _LogitsBuffer(
            num_exits, min(chunk_size, num_tokens), lm_head_weight.shape[-2], hidden.dtype, hidden.device
        )
        # One chunk holds every token: its logits stay in the buffer for the backward (no recompute).
        keep = num_tokens <= chunk_size and any(ctx.needs_input_grad[:4])
        with torch.no_grad():
            for start in range(0, num_tokens, chunk_size):
                stop = min(num_tokens, start + chunk_size)
                y = _normed_chunk(hidden[:, start:stop], norm_weights, eps)[0]
                logits = buffer.logits(y, lm_head_weight)
                target = logits.gather(2, safe_labels[start:stop].view(1, -1, 1).expand(num_exits, -1, 1))
                row_max = logits.amax(2, keepdim=True)
                # In place unless kept: the chunk buffer becomes exp(z - max); no second K x C x V tensor.
                shifted = torch.sub(logits, row_max) if keep else logits.sub_(row_max)
                chunk_lse = (row_max + shifted.exp_().sum(2, keepdim=True).log()).squeeze(2)
                del shifted
                lse[:, start:stop] = chunk_lse
                loss_sums += ((chunk_lse - target.squeeze(2)) * valid[start:stop]).sum(1)
        per_exit_losses = loss_sums / count
        loss = (per_exit_losses * exit_weights).sum()
        ctx.save_for_backward(hidden, lm_head_weight, labels, norm_weights, exit_weights, lse, count)
        ctx.eps, ctx.ignore_index, ctx.chunk_size = eps, ignore_index, chunk_size
        ctx.kept = buffer if keep else None  # its fp32 part holds the logits z of the one chunk
        return loss, per_exit_losses

    @staticmethod
    def backward(ctx, grad_loss, grad_per_exit):
        hidden, lm_head_weight, labels, norm_weights, exit_weights, lse, count = ctx.saved_tensors
        need_hidden, need_head, _, need_norm = ctx.needs_input_grad[:4]
        num_exits, num_tokens, dim = hidden.shape
        vocab_size = lm_head_weight.shape[-2]
        dtype = hidden.dtype
        shared = lm_head_weight.dim() == 2

        # d loss / d CE_k, then d CE_k / d (row loss) = 1 / count.
        upstream = torch.zeros_like(exit_weights)
        if grad_loss is not None:
            upstream = upstream + grad_loss.float() * exit_weights
        if grad_per_exit is not None:
            upstream = upstream + grad_per_exit.float()
        scale = upstream / count

        valid = labels != ctx.ignore_index
        safe_labels = torch.where(valid, labels, 0).long()
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_head32 = (
            torch.zeros(lm_head_weight.shape, dtype=torch.float32, device=hidden.device)
            if need_head
            else None
        )
        grad_norm32 = (
            torch.zeros(num_exits, dim, dtype=torch.float32, device=hidden.device)
            if need_norm and norm_weights is not None
            else None
        )
        norm32 = norm_weights.float()[:, None, :] if norm_weights is not None else None
        kept, ctx.kept = ctx.kept, None  # used once: a second backward (retain_graph) recomputes
        chunk_rows = min(ctx.chunk_size, num_tokens)
        buffer = (
            kept
            if kept is not None
            else _LogitsBuffer(num_exits, chunk_rows, vocab_size, dtype, hidden.device)
        )

        for start in range(0, num_tokens, ctx.chunk_size):
            stop = min(num_tokens, start + ctx.chunk_size)
            chunk = stop - start
            y, x32, rstd, normed = _normed_chunk(hidden[:, start:stop], norm_weights, ctx.eps)
            # dlogits = s * (softmax - onehot), s = scale_k on valid rows and 0 elsewhere, built in place
            # in the recomputed logits buffer. |s| is folded into the exponent, exp(z - lse + log|s|),
            # which saves a pass over the buffer; log 0 = -inf gives exact zeros on ignored rows.
            row_scale = scale[:, None] * valid[start:stop].float()[None, :]  # K x C
            shift = lse[:, start:stop] - row_scale.abs().log()
            if kept is not None:  # the forward's logits of this (only) chunk
                logits = buffer.fp32[: num_exits * chunk * vocab_size].view(num_exits, chunk, vocab_size)
            else:
                logits = buffer.logits(y, lm_head_weight)
            dlogits = logits.sub_(shift[:, :, None]).exp_()
            if bool((row_scale < 0).any()):
                dlogits.mul_(row_scale.sign()[:, :, None])
            dlogits.scatter_add_(
                2, safe_labels[start:stop].view(1, -1, 1).expand(num_exits, -1, 1), (-row_scale)[:, :, None]
            )
            dlogits_in = buffer.to_native(dlogits)

            if grad_head32 is not None:
                # fp32 accumulation across chunks; per chunk the matmul runs in the input dtype.
                if shared:
                    flat_d = dlogits_in.reshape(num_exits * chunk, vocab_size).t()
                    flat_y = y.reshape(num_exits * chunk, dim)
                    if dtype == torch.float32:
                        grad_head32.addmm_(flat_d, flat_y)
                    else:
                        grad_head32.add_(torch.mm(flat_d, flat_y))
                elif dtype == torch.float32:
                    grad_head32.baddbmm_(dlogits_in.transpose(1, 2), y)
                else:
                    grad_head32.add_(torch.bmm(dlogits_in.transpose(1, 2), y))

            if grad_hidden is None and grad_norm32 is None:
                continue
            if shared:
                grad_y = torch.mm(dlogits_in.reshape(num_exits * chunk, vocab_size), lm_head_weight)
                grad_y = grad_y.view(num_exits, chunk, dim)
            else:
                grad_y = torch.bmm(dlogits_in, lm_head_weight)
            del dlogits, dlogits_in
            if norm_weights is None:
                if grad_hidden is not None:
                    grad_hidden[:, start:stop] = grad_y
                continue
            grad_y32 = grad_y.float()
            if grad_norm32 is not None:
                grad_norm32 += (grad_y32 * normed.float()).sum(1)
            if grad_hidden is not None:
                # RMSNorm backward: dx = rstd * (g - xn * mean(g * xn)), g = dy * w, xn = x * rstd.
                grad_normed = grad_y32 * norm32
                xn = x32 * rstd
                mean_gx = (grad_normed * xn).mean(-1, keepdim=True)
                grad_hidden[:, start:stop] = (rstd * (grad_normed - xn * mean_gx)).to(dtype)

        grad_head = grad_head32.to(lm_head_weight.dtype) if grad_head32 is not None else None
        grad_norm = grad_norm32.to(norm_weights.dtype) if grad_norm32 is not None else None
        return grad_hidden, grad_head, None, grad_norm, None, None, None, None
