"""The edge's de-identifying feature mapping: an information-bottleneck stochastic encoder.

`PrivacyMapping` maps edge features (any `[N, D]` tensor: pooled or merged vision-tower tokens,
flattened per clip) to released features `z` of dimension `k < D`:

    w = P ((x - shift) / scale)   P: a linear waist, D -> k (no bias); shift/scale a fixed standardisation
    h = MLP(w)                    width `hidden`
    mu, logvar = heads(h)         logvar clamped to [min_logvar, max_logvar]
    z = mu + exp(logvar / 2) * eps,   eps ~ N(0, I)

trained with a task loss plus `beta * KL(q(z|x) || N(0, I))` (the deep variational information
bottleneck, Alemi et al.); the training loop with the adversary lives in the pipeline, not here.

**Why no left inverse exists** (nothing recovers x from z, whatever the decoder):
1. *Rank.* Every path from x to z goes through the waist `P x` with `P` of shape `k x D`, `k < D`, so
   rank(P) <= k < D and its kernel has dimension >= D - k > 0. For any x and any v in ker(P),
   `x` and `x + v` give the same waist, hence the same (mu, logvar): the same output distribution.
   The map is many-to-one on a whole affine subspace through every point, so no function g has
   g(mapping(x)) = x for all x (`collision` constructs such an x + v). The Jacobian
   d mu / d x = (d mu / d w) P diag(1/scale) has rank <= k < D everywhere.
   (Without the linear waist the conclusion still holds for any continuous map R^D -> R^k, k < D, by
   Borsuk-Ulam; the waist makes the collisions explicit and testable.)
2. *Noise.* The released z is a sample, not mu: its conditional variance is at least
   `exp(min_logvar)` per coordinate, so even x's component in the row space of P is only known up to
   Gaussian noise; the KL term pushes the mutual information I(x; z) down as `beta` grows.
Irreversibility is not privacy: the row space of P may still carry identity. That is measured by
attacks (re-identification, inversion), outside this module.

Release mode: in `train()` mode `forward` samples. In `eval()` mode it samples too when
`stochastic_release=True` (the default; the noise is part of the privacy argument); with
`stochastic_release=False` it returns mu (deterministic, reproducible outputs; only argument 1 holds).
`forward(..., sample=...)` overrides both. Pass a `torch.Generator` for reproducible noise.

`FeatureContract` is what the receiving (cloud) side checks before it accepts a tensor: shape
`[N, k]`, dtype, finite values; raw pixels (integer tensors, 3+ dims) are rejected with a clear error.
This module never imports the pipeline (it is plain torch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ruyi_model.threads import one_thread


class FeatureContractError(ValueError):
    """A tensor offered to the cloud side is not a released-feature tensor of the expected kind."""


@dataclass(frozen=True)
class FeatureContract:
    """The released features' contract: `[N, dim]` (N >= 1, N <= max_rows), `dtype`, finite."""

    dim: int
    dtype: torch.dtype = torch.float32
    max_rows: int = 4096

    def check(self, tensor: object, name: str = "features") -> torch.Tensor:
        """Returns `tensor` if it satisfies the contract, else raises FeatureContractError naming why."""
        if not isinstance(tensor, torch.Tensor):
            raise FeatureContractError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
        if not (tensor.is_floating_point()):
            raise FeatureContractError(
                f"{name}: dtype {tensor.dtype} is not a feature dtype (expected {self.dtype}); "
                "integer tensors look like raw pixels, which the cloud never accepts"
            )
        if tensor.dim() != 2:
            raise FeatureContractError(
                f"{name}: expected shape [N, {self.dim}], got {list(tensor.shape)}"
                + (" (an image/video-shaped tensor: raw pixels are refused)" if tensor.dim() >= 3 else "")
            )
        if tensor.shape[1] != self.dim:
            raise FeatureContractError(f"{name}: expected {self.dim} features per row, got {tensor.shape[1]}")
        if not 1 <= tensor.shape[0] <= self.max_rows:
            raise FeatureContractError(f"{name}: {tensor.shape[0]} rows, expected 1..{self.max_rows}")
        if tensor.dtype != self.dtype:
            raise FeatureContractError(f"{name}: dtype {tensor.dtype}, expected {self.dtype}")
        if not torch.isfinite(tensor).all():
            raise FeatureContractError(f"{name}: contains NaN or infinite values")
        return tensor

    def to_dict(self) -> dict:
        return {"dim": self.dim, "dtype": str(self.dtype).removeprefix("torch."), "max_rows": self.max_rows}

    @classmethod
    def from_dict(cls, data: dict) -> FeatureContract:
        dtype = getattr(torch, str(data["dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"feature contract: unknown dtype {data['dtype']!r}")
        return cls(int(data["dim"]), dtype, int(data.get("max_rows", 4096)))


@dataclass
class MappingOutput:
    z: torch.Tensor  # the released features [N, k]
    mu: torch.Tensor
    logvar: torch.Tensor

    def kl(self) -> torch.Tensor:
        """Mean over rows of KL(N(mu, diag exp(logvar)) || N(0, I)), summed over the k dimensions."""
        return kl_to_standard_normal(self.mu, self.logvar)


def kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1.0).sum(dim=-1).mean()


class PrivacyMapping(nn.Module):
    """Stochastic IB encoder `[N, in_dim] -> [N, out_dim]`, `out_dim < in_dim` (see the module docstring)."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden: int = 128,
        *,
        min_logvar: float = -6.0,
        max_logvar: float = 2.0,
        stochastic_release: bool = True,
    ) -> None:
        super().__init__()
        if not 1 <= out_dim < in_dim:
            raise ValueError(
                f"out_dim must be in 1..in_dim-1 (a dimension reduction), got out_dim={out_dim} "
                f"for in_dim={in_dim}"
            )
        if not min_logvar < max_logvar:
            raise ValueError(f"min_logvar ({min_logvar}) must be < max_logvar ({max_logvar})")
        self.in_dim, self.out_dim = in_dim, out_dim
        self.min_logvar, self.max_logvar = float(min_logvar), float(max_logvar)
        self.stochastic_release = stochastic_release
        # elementwise input standardisation (fixed, set from training features): affine, so the
        # rank argument is unchanged
        self.register_buffer("shift", torch.zeros(in_dim))
        self.register_buffer("scale", torch.ones(in_dim))
        self.waist = nn.Linear(in_dim, out_dim, bias=False)
        self.body = nn.Sequential(nn.Linear(out_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU())
        self.mu = nn.Linear(hidden, out_dim)
        self.logvar = nn.Linear(hidden, out_dim)
        nn.init.zeros_(self.logvar.weight)
        nn.init.constant_(self.logvar.bias, -4.0)  # noise std 0.14 at the start

    @torch.no_grad()
    def set_standardization(self, features: torch.Tensor) -> None:
        """Standardise inputs with the per-feature mean and std of `features` (the training set)."""
        self.shift.copy_(features.mean(0))
        self.scale.copy_(features.std(0).clamp_min(1e-6))

    @property
    def contract(self) -> FeatureContract:
        return FeatureContract(self.out_dim, self.waist.weight.dtype)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar) of q(z | x)."""
        if x.dim() != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"PrivacyMapping expects [N, {self.in_dim}] features, got {list(x.shape)}")
        h = self.body(self.waist((x - self.shift) / self.scale))
        logvar = self.logvar(h).clamp(self.min_logvar, self.max_logvar)
        return self.mu(h), logvar

    def forward(
        self, x: torch.Tensor, *, sample: bool | None = None, generator: torch.Generator | None = None
    ) -> MappingOutput:
        mu, logvar = self.encode(x)
        if sample is None:
            sample = self.training or self.stochastic_release
        if not sample:
            return MappingOutput(mu, mu, logvar)
        eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
        return MappingOutput(mu + (0.5 * logvar).exp() * eps, mu, logvar)

    @torch.no_grad()
    def release(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """What leaves the edge: a sample of z (or mu if `stochastic_release=False`), checked."""
        z = self.forward(x, sample=self.stochastic_release, generator=generator).z
        return self.contract.check(z, "released features")

    def min_noise_std(self) -> float:
        """The floor of the released noise's standard deviation per coordinate (0 if deterministic)."""
        return math.exp(0.5 * self.min_logvar) if self.stochastic_release else 0.0

    def kernel_basis(self) -> torch.Tensor:
        """An orthonormal basis `[D - r, D]` (float64) of the kernel of the input-to-waist linear map
        `x -> P diag(1/scale) (x - shift)` (r = rank(P) <= out_dim). Moving an input along these
        directions changes nothing downstream: the output distribution is the same."""
        w = self.waist.weight.detach().double() / self.scale.double()
        with one_thread():  # the same basis at any thread count
            _, s, vh = torch.linalg.svd(w, full_matrices=True)
        rank = int((s > s.max() * 1e-10).sum())
        return vh[rank:]

    def collision(self, x: torch.Tensor, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
        """For each row of `x` a different input (at distance `scale`) with the same output
        distribution: a witness that the map is not injective, hence has no left inverse."""
        basis = self.kernel_basis()
        g = torch.Generator().manual_seed(seed)
        v = torch.randn(x.shape[0], basis.shape[0], generator=g, dtype=torch.float64) @ basis
        v = v * (scale / v.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        return (x.double() + v).to(x.dtype)
