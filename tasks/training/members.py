"""Member bookkeeping: parameter counts, the training device, and the "other members unchanged" check.

Library module: `snapshot_members` / `members_unchanged` compare every frozen tensor by sha256 and every
other member's logits with `torch.equal`; `device_for_training` picks CUDA when available, else CPU.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from tasks.training import distributed

if TYPE_CHECKING:  # heavy imports stay inside the functions (the `ruyi` CLI must start instantly)
    import torch


log = logging.getLogger("ruyi")


# --- small shared helpers of the three stages ------------------------------------------------------
def count_params(params: Iterable[Any]) -> int:
    return sum(int(p.numel()) for p in params)


def device_for_training():
    import torch

    ctx = distributed.context()
    if ctx is not None:  # a data-parallel worker: its own device (tasks/training/distributed.py)
        return torch.device(ctx.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's bytes (any dtype): compares tensors bit for bit without keeping copies."""
    import torch

    return hashlib.sha256(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def snapshot_members(
    model, exit_layers: Sequence[int], batch: torch.Tensor, exclude: Sequence[str] = ()
) -> tuple[dict[str, str], dict[int, torch.Tensor]]:
    """Digests of every parameter not named in `exclude` and the logits of `exit_layers` on `batch`
    (B x T ids), to check later that training left those members bit-identical (`members_unchanged`)."""
    import torch

    excluded = set(exclude)
    digests = {n: tensor_digest(p) for n, p in model.named_parameters() if n not in excluded}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = {d: model(batch, exit_layer=d, use_cache=False).logits.clone() for d in exit_layers}
    model.train(was_training)
    return digests, logits


def members_unchanged(
    model,
    snapshot: tuple[dict[str, str], dict[int, torch.Tensor]],
    batch: torch.Tensor,
    exclude: Sequence[str] = (),
) -> tuple[bool, list[str]]:
    """Compares `model` with `snapshot_members(...)`: every snapshotted parameter not in `exclude` by
    digest, the members' logits on `batch` with torch.equal. Returns (all equal, what differs)."""
    import torch

    digests, logits = snapshot
    excluded = set(exclude)
    current = dict(model.named_parameters())
    changed = [
        n
        for n, h in digests.items()
        if n not in excluded and (n not in current or tensor_digest(current[n]) != h)
    ]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        changed += [
            f"logits of exit {d}"
            for d, ref in logits.items()
            if not torch.equal(model(batch, exit_layer=d, use_cache=False).logits, ref)
        ]
    model.train(was_training)
    return not changed, changed
