"""Fused early-exit head kernels for familial (shared-backbone, early-exit) language models.

- `exit_head_loss`: RMSNorm -> LM head -> cross-entropy for K exits at once, weighted sum, without ever
  holding an N x V logits tensor.
- `exit_confidence`: RMSNorm -> LM head -> (argmax, max softmax prob, entropy) for one exit, no logits.
- `ExitHeadLoss`, `ExitConfidence`: thin `nn.Module` wrappers.

Imports are lazy: `import triton_kernels` imports neither torch nor triton. Design: docs/choices.md#kernels.
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
