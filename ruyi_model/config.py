"""`FamilialConfig`: a Qwen3 config plus the shape of the family (exits, branches, DaE, low rank).

Every architectural switch of the family is a field here, so `from_pretrained` rebuilds exactly the
module structure a checkpoint was saved with (including DaE blocks and decomposed matrices).
"""

from __future__ import annotations

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
        num_layers = self.num_hidden_layers
        if self.exit_layers is None:
            self.exit_layers = [num_layers]
        self.exit_layers = [int(d) for d in self.exit_layers]
        if self.dae_blocks is None:
            self.dae_blocks = [0] * len(self.exit_layers)
        if self.exit_loss_weights is None:
            self.exit_loss_weights = [1.0] * len(self.exit_layers)
        if self.lowrank_ranks is None:
            self.lowrank_ranks = {}
        self.validate_family()

    def validate_family(self) -> None:
        """Checks the family fields; raises ValueError naming the field and the bad value."""
        num_layers, exits = self.num_hidden_layers, self.exit_layers

        def bad(field: str, value, why: str) -> ValueError:
            return ValueError(f"FamilialConfig.{field}={value!r}: {why}")

        if not exits:
            raise bad("exit_layers", exits, "needs at least one exit")
        if any(b <= a for a, b in zip(exits, exits[1:])):
            raise bad("exit_layers", exits, "must be strictly increasing")
        if exits[0] < 1 or exits[-1] != num_layers:
            raise bad("exit_layers", exits, f"each must be in 1..{num_layers} and the last must equal "
                                           f"num_hidden_layers={num_layers}")
        if self.exit_branch_layers < 0:
            raise bad("exit_branch_layers", self.exit_branch_layers, "must be >= 0")
        if exits[0] < self.exit_branch_layers and exits[0] != num_layers:
            raise bad("exit_branch_layers", self.exit_branch_layers,
                      f"a member of depth {exits[0]} cannot own {self.exit_branch_layers} branch layers")
        if len(self.exit_loss_weights) != len(exits):
            raise bad("exit_loss_weights", self.exit_loss_weights, f"needs one weight per exit ({len(exits)})")
        if any(w < 0 for w in self.exit_loss_weights):
            raise bad("exit_loss_weights", self.exit_loss_weights, "weights must be >= 0")
        if len(self.dae_blocks) != len(exits) or any(n < 0 for n in self.dae_blocks):
            raise bad("dae_blocks", self.dae_blocks, f"needs one count >= 0 per exit ({len(exits)})")
        if any(r < 1 for r in self.lowrank_ranks.values()):
            raise bad("lowrank_ranks", self.lowrank_ranks, "ranks must be >= 1")
        if self.loss_impl not in LOSS_IMPLS:
            raise bad("loss_impl", self.loss_impl, f"must be one of {LOSS_IMPLS}")
        if self.tie_word_embeddings:
            raise bad("tie_word_embeddings", True, "the familial model keeps untied heads (Ruyi2); "
                      "from_qwen3 unties a tied source model")
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

    def check_exit(self, exit_layer: int) -> int:
        if exit_layer not in self.exit_layers:
            raise ValueError(f"exit_layer={exit_layer!r} is not an exit of this family; exits: {self.exit_layers}")
        return exit_layer


__all__ = ["FamilialConfig"]
