"""Fused early-exit head kernels for familial (shared-backbone, early-exit) language models.

Public API (see :mod:`triton_kernels.ops` for the design notes):

- :func:`exit_head_loss`: RMSNorm -> LM head -> cross-entropy for K exits at once, weighted sum of the
  per-exit losses, without ever holding an N x V logits tensor.
- :func:`exit_confidence`: RMSNorm -> LM head -> (argmax, max softmax prob, entropy) for one exit, in
  one pass over the vocabulary, no logits written.
- :class:`ExitHeadLoss`, :class:`ExitConfidence`: thin ``nn.Module`` wrappers.

Imports are lazy (PEP 562 ``__getattr__``): ``import triton_kernels`` imports neither torch nor triton,
and triton is imported only when ``impl="triton"`` is actually used (``impl="auto"`` on a CUDA tensor).
That keeps ``ruyi --help`` instant and lets the CPU paths run where triton cannot.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["exit_head_loss", "exit_confidence", "ExitHeadLoss", "ExitConfidence", "IMPLS"]

# name -> (module, attribute): resolved on first access only.
_LAZY = {
    "exit_head_loss": ("triton_kernels.ops.exit_head_loss", "exit_head_loss"),
    "exit_confidence": ("triton_kernels.ops.exit_confidence", "exit_confidence"),
    "ExitHeadLoss": ("triton_kernels.modules.exit_head_loss", "ExitHeadLoss"),
    "ExitConfidence": ("triton_kernels.modules.exit_confidence", "ExitConfidence"),
    "IMPLS": ("triton_kernels.ops.utils", "IMPLS"),
}

if TYPE_CHECKING:  # pragma: no cover - static analysers only
    from triton_kernels.modules.exit_confidence import ExitConfidence
    from triton_kernels.modules.exit_head_loss import ExitHeadLoss
    from triton_kernels.ops.exit_confidence import exit_confidence
    from triton_kernels.ops.exit_head_loss import exit_head_loss
    from triton_kernels.ops.utils import IMPLS


def __getattr__(name: str) -> Any:
    try:
        module_name, attribute = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'triton_kernels' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module_name), attribute)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
