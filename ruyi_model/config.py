"""`FamilialConfig`: a Qwen3 config plus the shape of the family (exits, branches, DaE, low rank).

Every architectural switch of the family is a field here, so `from_pretrained` rebuilds exactly the
module structure a checkpoint was saved with (including DaE blocks and decomposed matrices).
"""

from __future__ import annotations

import math
import numbers

from huggingface_hub.dataclasses import strict
from transformers import Qwen3Config

LOSS_IMPLS = ("auto", "naive", "chunked", "triton")


@strict
class FamilialConfig(Qwen3Config):
    r"""Configuration of a familial (early-exit, shared-backbone) Qwen3 model, after Ruyi2.

    The member of depth `d` runs backbone layers `1..d-b` (b = `exit_branch_layers`, 0 for the
    deepest member), then `b` decoder layers of its own (its *branch*), then its `dae_blocks` added
    blocks, its own RMSNorm and its own LM head. With b = 1 that is Ruyi2's layout; with b = 0 the
    exits are plain norm + head (EE-LLM / LayerSkip). Every member is a stock Qwen3 model of
    `d + dae_blocks` layers.

    Args (beyond `Qwen3Config`):
        exit_layers: member depths, strictly increasing, each in `1..num_hidden_layers`, the last equal
            to `num_hidden_layers`. Default: only the deepest member.
        exit_branch_layers: decoder layers owned by each non-deepest member (Ruyi2: 1).
        shared_heads: one LM head shared by all members instead of one per member.
        exit_loss_weights: the weights `w_k` of the multi-exit loss `sum_k w_k * CE_k` (Ruyi2 Eq. 1),
            one per exit. Default: all 1.
        dae_blocks: blocks appended per exit by DaE expansion, one count per exit. Default: all 0.
        lowrank_ranks: `{module path: rank}` of linear layers replaced by low-rank factors
            (`ruyi_model.decompose`), e.g. `{"exits.2.layers.1.mlp.down_proj": 24}`.
        loss_impl: implementation of the multi-exit loss (`triton_kernels.exit_head_loss`):
            "auto", "naive", "chunked" or "triton".
    """

    model_type = "ruyi_familial"

    exit_layers: list[int] | None = None
    exit_branch_layers: int = 1
    shared_heads: bool = False
    exit_loss_weights: list[float] | None = None
    dae_blocks: list[int] | None = None
    lowrank_ranks: dict[str, int] | None = None
    loss_impl: str = "auto"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.exit_layers is None:
            self.exit_layers = [self.num_hidden_layers]
        if self.dae_blocks is None:
            self.dae_blocks = [0] * len(self.exit_layers)
        if self.exit_loss_weights is None:
            self.exit_loss_weights = [1.0] * len(self.exit_layers)
        if self.lowrank_ranks is None:
            self.lowrank_ranks = {}
        self.validate_family()
        # Canonical JSON-friendly forms. Lossless: validate_family accepted only integers here
        # (numpy integers included) and real numbers for the weights; nothing is truncated.
        self.exit_layers = [int(d) for d in self.exit_layers]
        self.exit_branch_layers = int(self.exit_branch_layers)
        self.dae_blocks = [int(n) for n in self.dae_blocks]
        self.exit_loss_weights = [float(w) for w in self.exit_loss_weights]
        self.lowrank_ranks = {path: int(r) for path, r in self.lowrank_ranks.items()}

    def validate_family(self) -> None:
        """Checks the family fields; raises ValueError naming the field and the bad value.

        Types are checked here, not coerced: the fields are string annotations (postponed), which
        `@strict` does not type-check, and `int(2.5)` or `bool("no")` would silently change the family.
        Also run by `validate()` (e.g. in `save_pretrained`, which wraps the error in huggingface_hub's
        StrictDataclassClassValidationError), so a field edited after init is re-checked there.
        """
        num_layers, exits = self.num_hidden_layers, self.exit_layers

        def bad(field: str, value, why: str) -> ValueError:
            return ValueError(f"FamilialConfig.{field}={value!r}: {why}")

        def int_list(field: str, value) -> None:
            if not isinstance(value, (list, tuple)) or not all(_is_int(v) for v in value):
                raise bad(field, value, "must be a list of integers (not floats or bools)")

        int_list("exit_layers", exits)
        if not exits:
            raise bad("exit_layers", exits, "needs at least one exit")
        if any(b <= a for a, b in zip(exits, exits[1:])):
            raise bad("exit_layers", exits, "must be strictly increasing")
        if exits[0] < 1 or exits[-1] != num_layers:
            raise bad(
                "exit_layers",
                exits,
                f"each must be in 1..{num_layers} and the last must equal num_hidden_layers={num_layers}",
            )
        if not _is_int(self.exit_branch_layers):
            raise bad(
                "exit_branch_layers", self.exit_branch_layers, "must be an integer (not a float or bool)"
            )
        if self.exit_branch_layers < 0:
            raise bad("exit_branch_layers", self.exit_branch_layers, "must be >= 0")
        if exits[0] < self.exit_branch_layers and exits[0] != num_layers:
            raise bad(
                "exit_branch_layers",
                self.exit_branch_layers,
                f"a member of depth {exits[0]} cannot own {self.exit_branch_layers} branch layers",
            )
        if not isinstance(self.shared_heads, bool):
            raise bad("shared_heads", self.shared_heads, "must be a bool (True or False)")
        weights = self.exit_loss_weights
        if not isinstance(weights, (list, tuple)) or not all(_is_real(w) for w in weights):
            raise bad("exit_loss_weights", weights, "must be a list of numbers (not bools or strings)")
        if len(weights) != len(exits):
            raise bad("exit_loss_weights", weights, f"needs one weight per exit ({len(exits)})")
        if not all(math.isfinite(w) and w >= 0 for w in weights):
            raise bad("exit_loss_weights", weights, "weights must be finite and >= 0")
        int_list("dae_blocks", self.dae_blocks)
        if len(self.dae_blocks) != len(exits) or any(n < 0 for n in self.dae_blocks):
            raise bad("dae_blocks", self.dae_blocks, f"needs one count >= 0 per exit ({len(exits)})")
        ranks = self.lowrank_ranks
        if not isinstance(ranks, dict) or not all(
            isinstance(k, str) and _is_int(r) for k, r in ranks.items()
        ):
            raise bad("lowrank_ranks", ranks, "must map module paths (str) to integer ranks")
        if any(r < 1 for r in ranks.values()):
            raise bad("lowrank_ranks", ranks, "ranks must be >= 1")
        if self.shared_heads and "lm_head" in ranks:
            # The shared head is every member's head: factoring it changes all members at once, which
            # DaE never does (decompose(include_head=True) refuses shared heads for the same reason).
            raise bad(
                "lowrank_ranks",
                ranks,
                "names the shared 'lm_head', but with shared_heads=True that head "
                "belongs to every member; only per-member heads (exits.<d>.lm_head) can be low rank",
            )
        if not isinstance(self.loss_impl, str) or self.loss_impl not in LOSS_IMPLS:
            raise bad("loss_impl", self.loss_impl, f"must be one of {LOSS_IMPLS}")
        if self.tie_word_embeddings:
            raise bad(
                "tie_word_embeddings",
                True,
                "the familial model keeps untied heads (Ruyi2); from_qwen3 unties a tied source model",
            )
        if self.use_sliding_window:
            raise bad("use_sliding_window", True, "sliding-window attention is not supported by the family")

    # --- derived structure (one home for the layout rules) ---------------------------------
    def branch_layers(self, exit_layer: int) -> int:
        """Decoder layers owned by member `exit_layer` before its DaE blocks."""
        return 0 if exit_layer == self.num_hidden_layers else self.exit_branch_layers

    def backbone_depth(self, exit_layer: int) -> int:
        """How many shared backbone layers member `exit_layer` runs."""
        return exit_layer - self.branch_layers(exit_layer)

    def num_dae_blocks(self, exit_layer: int) -> int:
        return self.dae_blocks[self.exit_layers.index(exit_layer)]

    def member_num_layers(self, exit_layer: int) -> int:
        """Layers of member `exit_layer` as a standalone Qwen3 model (DaE blocks included)."""
        return exit_layer + self.num_dae_blocks(exit_layer)

    def check_exit(self, exit_layer) -> int:
        """`exit_layer` as a plain int if it is an exit of this family, else ValueError.

        Python, numpy and 0-d torch integers are accepted; floats and bools are errors (truncating
        2.9 to member 2 would silently run another member)."""
        import torch  # lazily: the config module stays importable without torch at CLI start-up

        if (
            isinstance(exit_layer, torch.Tensor)
            and exit_layer.ndim == 0
            and not exit_layer.dtype.is_floating_point
            and not exit_layer.dtype.is_complex
            and exit_layer.dtype != torch.bool
        ):
            exit_layer = exit_layer.item()
        if not _is_int(exit_layer):
            raise ValueError(
                f"exit_layer={exit_layer!r} must be an integer member depth (not a float, bool or "
                f"tensor); exits: {self.exit_layers}"
            )
        if exit_layer not in self.exit_layers:
            raise ValueError(
                f"exit_layer={exit_layer!r} is not an exit of this family; exits: {self.exit_layers}"
            )
        return int(exit_layer)


def _is_int(value) -> bool:
    """A true integer: int or numpy integer, but not bool (an Integral in Python) or an integral float."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    """A real number (int or float, numpy included), but not bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


__all__ = ["FamilialConfig"]
