"""``ExitConfidence``: module form of :func:`triton_kernels.ops.exit_confidence.exit_confidence`."""

from __future__ import annotations

import torch
from torch import nn

from triton_kernels.ops.exit_confidence import exit_confidence


class ExitConfidence(nn.Module):
    """Greedy token, max softmax probability and entropy (nats) at one exit, without B x V logits.

    Args:
        eps: RMSNorm epsilon of the exit norm.
        impl: ``"auto"``, ``"triton"``, ``"chunked"`` or ``"naive"``.
    """

    def __init__(self, eps: float = 1e-6, impl: str = "auto") -> None:
        super().__init__()
        self.eps = eps
        self.impl = impl

    def forward(
        self, hidden: torch.Tensor, norm_weight: torch.Tensor | None, lm_head_weight: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Args: hidden ``(B, D)``, norm_weight ``(D,)`` or None, lm_head_weight ``(V, D)``.
        Returns ``(token_ids, max_prob, entropy)``, each ``(B,)`` (int64, fp32, fp32)."""
        return exit_confidence(hidden, norm_weight, lm_head_weight, eps=self.eps, impl=self.impl)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, impl={self.impl!r}"
