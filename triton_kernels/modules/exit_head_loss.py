"""``ExitHeadLoss``: module form of :func:`triton_kernels.ops.exit_head_loss.exit_head_loss`.

Holds the loss configuration (exit weights, eps, ignore_index, impl); the weights it applies (norms,
head) belong to the model and are passed to ``forward``, so one instance serves any model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from triton_kernels.ops.exit_head_loss import exit_head_loss


class ExitHeadLoss(nn.Module):
    """Weighted sum of per-exit cross-entropy losses over a shared (or per-exit) LM head.

    Args:
        exit_weights: K floats weighting each exit's loss; None: all 1.
        eps: RMSNorm epsilon of the exit norms.
        ignore_index: label value without loss.
        impl: ``"auto"``, ``"triton"``, ``"chunked"`` or ``"naive"``.
    """

    def __init__(
        self,
        exit_weights: Sequence[float] | torch.Tensor | None = None,
        eps: float = 1e-6,
        ignore_index: int = -100,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        self.eps = eps
        self.ignore_index = ignore_index
        self.impl = impl
        weights = (
            None if exit_weights is None else torch.as_tensor(exit_weights, dtype=torch.float32).reshape(-1)
        )
        self.register_buffer("exit_weights", weights, persistent=False)

    def forward(
        self,
        hidden: torch.Tensor,
        lm_head_weight: torch.Tensor,
        labels: torch.Tensor,
        norm_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: hidden ``(K, N, D)``, lm_head_weight ``(V, D)`` or ``(K, V, D)``, labels ``(N,)``,
        norm_weights ``(K, D)`` or None. Returns ``(loss, per_exit_losses)``: scalar and ``(K,)`` fp32."""
        return exit_head_loss(
            hidden,
            lm_head_weight,
            labels,
            norm_weights=norm_weights,
            eps=self.eps,
            exit_weights=self.exit_weights,
            ignore_index=self.ignore_index,
            impl=self.impl,
        )

    def extra_repr(self) -> str:
        return f"eps={self.eps}, ignore_index={self.ignore_index}, impl={self.impl!r}"
