"""Shared helpers: argument checks, the RMSNorm reference, impl resolution, Triton environment checks.

torch only: nothing here imports triton.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

#: Accepted values of the ``impl`` argument.
IMPLS = ("auto", "triton", "chunked", "naive")


def resolve_impl(impl: str, device: torch.device, cuda_default: str = "triton") -> str:
    """Maps ``impl`` to a concrete implementation.

    Args:
        impl: one of :data:`IMPLS`.
        device: device of the inputs; ``"auto"`` picks ``cuda_default`` on CUDA and ``"chunked"``
            elsewhere.
        cuda_default: what ``"auto"`` runs on CUDA (each op's measured best; benchmarks/RESULTS.md).

    Returns:
        ``"triton"``, ``"chunked"`` or ``"naive"``.

    Raises:
        ValueError: ``impl`` is not one of :data:`IMPLS`.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return cuda_default if device.type == "cuda" else "chunked"
    return impl


def check_triton_usable(device: torch.device) -> None:
    """Raises a clear error when the Triton path cannot run on ``device``.

    On CPU, Triton only runs in its interpreter, which must be switched on with ``TRITON_INTERPRET=1``
    *before* ``import triton`` (the interpreter flag is read at import time).
    """
    if device.type == "cuda":
        return
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                "impl='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 before "
                "triton is imported, or use impl='chunked' (the CPU default)"
            )
        return
    raise RuntimeError(f"impl='triton' supports CUDA tensors (or CPU with TRITON_INTERPRET=1), got {device}")


def triton_interpreting() -> bool:
    """True when Triton kernels run in the interpreter (CPU)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm with the exact numerics of transformers' ``Qwen3RMSNorm``.

    ``x32 = x.float(); x32 * rsqrt(mean(x32**2, -1) + eps)``, cast back to ``x.dtype``, then ``* weight``.

    Args:
        x: ``(..., D)`` input.
        weight: ``(D,)`` scale, or None for no scale.
        eps: added to the mean square.

    Returns:
        ``(..., D)`` in ``x.dtype`` (in the promoted dtype if ``weight`` has another dtype).
    """
    x32 = x.float()
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return normed if weight is None else weight * normed


def exit_weights_tensor(
    exit_weights: Sequence[float] | torch.Tensor | None, num_exits: int, device: torch.device
) -> torch.Tensor:
    """Returns the per-exit loss weights as a ``(K,)`` fp32 tensor (default all ones), detached.

    Raises:
        ValueError: the number of weights is not K.
    """
    if exit_weights is None:
        return torch.ones(num_exits, dtype=torch.float32, device=device)
    weights = torch.as_tensor(exit_weights, dtype=torch.float32).detach().to(device).reshape(-1)
    if weights.numel() != num_exits:
        raise ValueError(
            f"exit_weights must have K={num_exits} entries (one per exit, hidden is K x N x D), "
            f"got {weights.numel()}"
        )
    return weights


def _shape(t: torch.Tensor) -> str:
    return " x ".join(str(s) for s in t.shape) if t.dim() else "scalar"


def check_exit_head_loss_args(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    norm_weights: torch.Tensor | None,
) -> None:
    """Validates the shapes, dtypes and devices of :func:`exit_head_loss` arguments.

    Raises:
        ValueError: naming the offending argument and the shapes involved.
    """
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        got = _shape(hidden) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise ValueError(f"hidden must be a K x N x D tensor (one slice per exit), got {got}")
    K, N, D = hidden.shape
    if K < 1:
        raise ValueError(f"hidden must hold at least one exit (K >= 1), got shape {_shape(hidden)}")
    if not hidden.is_floating_point():
        raise ValueError(f"hidden must be floating point, got {hidden.dtype}")
    if lm_head_weight.dim() == 2:
        if lm_head_weight.shape[1] != D:
            raise ValueError(
                f"lm_head_weight must be V x D with D={D} (hidden is {_shape(hidden)}), "
                f"got {_shape(lm_head_weight)}"
            )
    elif lm_head_weight.dim() == 3:
        if lm_head_weight.shape[0] != K or lm_head_weight.shape[2] != D:
            raise ValueError(
                f"per-exit lm_head_weight must be K x V x D with K={K}, D={D} (hidden is {_shape(hidden)}), "
                f"got {_shape(lm_head_weight)}"
            )
    else:
        raise ValueError(
            f"lm_head_weight must be V x D (shared) or K x V x D (per exit), got {_shape(lm_head_weight)}"
        )
    if lm_head_weight.shape[-2] < 1:
        raise ValueError(f"lm_head_weight has an empty vocabulary: {_shape(lm_head_weight)}")
    if labels.dim() != 1 or labels.shape[0] != N:
        raise ValueError(
            f"labels must be a 1-D tensor of N={N} token ids (hidden is {_shape(hidden)}), "
            f"got {_shape(labels)}"
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if norm_weights is not None and tuple(norm_weights.shape) != (K, D):
        raise ValueError(
            f"norm_weights must be K x D = {K} x {D} (hidden is {_shape(hidden)}), got {_shape(norm_weights)}"
        )
    _check_same(hidden, lm_head_weight=lm_head_weight, labels=labels, norm_weights=norm_weights)


def check_exit_confidence_args(
    hidden: torch.Tensor, norm_weight: torch.Tensor | None, lm_head_weight: torch.Tensor
) -> None:
    """Validates the shapes, dtypes and devices of :func:`exit_confidence` arguments.

    Raises:
        ValueError: naming the offending argument and the shapes involved.
    """
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
        got = _shape(hidden) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise ValueError(f"hidden must be a B x D tensor (hidden states at one exit), got {got}")
    if not hidden.is_floating_point():
        raise ValueError(f"hidden must be floating point, got {hidden.dtype}")
    B, D = hidden.shape
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != D or lm_head_weight.shape[0] < 1:
        raise ValueError(
            f"lm_head_weight must be V x D with D={D} (hidden is {_shape(hidden)}), "
            f"got {_shape(lm_head_weight)}"
        )
    if norm_weight is not None and tuple(norm_weight.shape) != (D,):
        raise ValueError(
            f"norm_weight must have shape (D,) = ({D},) (hidden is {_shape(hidden)}), "
            f"got {_shape(norm_weight)}"
        )
    _check_same(hidden, lm_head_weight=lm_head_weight, norm_weight=norm_weight)


def _check_same(hidden: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is None:
            continue
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
        if name != "labels" and t.dtype != hidden.dtype:
            raise ValueError(
                f"{name} has dtype {t.dtype} but hidden has {hidden.dtype}: cast both to one dtype first"
            )


def check_label_range(labels: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Raises ValueError if a non-ignored label is outside ``[0, vocab_size)``.

    This costs one host sync; it turns an out-of-bounds read in a kernel into a readable error.
    """
    valid = labels != ignore_index
    if labels.numel() and bool(((labels < 0) | (labels >= vocab_size)).logical_and(valid).any()):
        bad = labels[valid & ((labels < 0) | (labels >= vocab_size))]
        raise ValueError(
            f"labels must be in [0, {vocab_size}) or equal ignore_index={ignore_index}; "
            f"found {bad.numel()} out of range, e.g. {bad[:5].tolist()}"
        )
