"""Where each part of a family lives under a megatron TP x PP split (pure Python, no megatron import).

Pipeline layout (PP stages of equal size, `per = num_hidden_layers / pp`):
  - backbone layers `[s*per, (s+1)*per)` (0-based) live on stage `s`; the token embedding on stage 0;
  - member `d` (its branch layers, DaE blocks, norm and head) lives on the stage that owns its exit
    layer, backbone layer `d` (1-based): `stage(d) = (d - 1) // per`. Its branch input is the hidden
    state after `backbone_depth(d) = d - b` backbone layers, which that stage must have: either it
    computes that layer or it receives it from the previous stage (`d - b >= stage(d) * per`). With
    Ruyi2's b = 1 this always holds; larger branches can make a split impossible (a ValueError);
  - the deepest member is the stock GPTModel head of the last stage (`decoder.final_layernorm`,
    `output_layer`); with `shared_heads` every member uses that one head, so all exits must then be
    on the last stage.

Tensor parallelism: attention heads and query groups, the FFN width and the vocabulary are split in
TP equal parts (no vocabulary padding), so each must be divisible by TP.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SplitLayout:
    """The placement of one family under a TP x PP split (see module docstring)."""

    tp: int
    pp: int
    num_layers: int
    exit_layers: tuple[int, ...]
    backbone_depths: tuple[int, ...]

    @property
    def layers_per_stage(self) -> int:
        return self.num_layers // self.pp

    def stage_start(self, stage: int) -> int:
        """0-based index of the first backbone layer of `stage`."""
        return stage * self.layers_per_stage

    def stage_of_layer(self, layer: int) -> int:
        """The stage of 0-based backbone layer `layer`."""
        return layer // self.layers_per_stage

    def exit_stage(self, exit_layer: int) -> int:
        """The stage that holds member `exit_layer` (the one owning its 1-based exit layer)."""
        return (exit_layer - 1) // self.layers_per_stage

    def exits_on_stage(self, stage: int) -> list[int]:
        return [d for d in self.exit_layers if self.exit_stage(d) == stage]

    def backbone_depth(self, exit_layer: int) -> int:
        return self.backbone_depths[self.exit_layers.index(exit_layer)]

    def to_json(self) -> dict:
        return {
            "tp": self.tp,
            "pp": self.pp,
            "num_layers": self.num_layers,
            "layers_per_stage": self.layers_per_stage,
            "stage_layers": {str(s): [self.stage_start(s), self.stage_start(s + 1)] for s in range(self.pp)},
            "exit_stage": {str(d): self.exit_stage(d) for d in self.exit_layers},
        }


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}: must be an integer >= 1")
    return value


def check_split(config, tp: int = 1, pp: int = 1) -> SplitLayout:
    """Validates a TP x PP split of a `FamilialConfig` and returns its layout.

    Raises:
        ValueError: naming the parameter that does not divide (heads, query groups, FFN width,
            vocabulary, layers) or the exit that cannot be placed, or a family feature the megatron
            backend does not hold (low-rank factors, sliding window, attention bias).
    """
    tp, pp = _positive_int("tp", tp), _positive_int("pp", pp)
    heads, groups = config.num_attention_heads, config.num_key_value_heads
    checks = [
        ("num_attention_heads", heads),
        ("num_key_value_heads (query groups)", groups),
        ("intermediate_size", config.intermediate_size),
        ("vocab_size", config.vocab_size),
    ]
    for name, value in checks:
        if value % tp:
            raise ValueError(
                f"tp={tp} does not divide {name}={value}: each tensor-parallel rank needs an equal share"
            )
    if heads % groups:
        raise ValueError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={groups}")
    if config.num_hidden_layers % pp:
        raise ValueError(
            f"pp={pp} does not divide num_hidden_layers={config.num_hidden_layers}: every pipeline "
            "stage holds the same number of backbone layers"
        )
    if config.lowrank_ranks:
        raise ValueError(
            f"lowrank_ranks={config.lowrank_ranks!r}: the megatron backend holds dense layers only "
            "(convert before DaE decomposition)"
        )
    if getattr(config, "attention_bias", False):
        raise ValueError("attention_bias=True: the megatron backend builds Qwen3 layers without biases")
    if getattr(config, "use_sliding_window", False):
        raise ValueError("use_sliding_window=True is not supported by the megatron backend")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default" or set(rope) - {"rope_type", "rope_theta"}:
        raise ValueError(
            f"rope_parameters={rope!r}: only the default RoPE is supported by the megatron backend"
        )
    layout = SplitLayout(
        tp=tp,
        pp=pp,
        num_layers=config.num_hidden_layers,
        exit_layers=tuple(config.exit_layers),
        backbone_depths=tuple(config.backbone_depth(d) for d in config.exit_layers),
    )
    for d in config.exit_layers:
        stage = layout.exit_stage(d)
        if layout.backbone_depth(d) < layout.stage_start(stage):
            raise ValueError(
                f"exit_layers: member {d} cannot be placed with pp={pp}: it lives on stage {stage} "
                f"(layers {layout.stage_start(stage) + 1}..{layout.stage_start(stage + 1)}) but branches "
                f"after backbone layer {layout.backbone_depth(d)} "
                f"(exit_branch_layers={config.exit_branch_layers}), which that stage never sees"
            )
    if config.shared_heads and any(layout.exit_stage(d) != pp - 1 for d in config.exit_layers):
        raise ValueError(
            f"shared_heads=True with pp={pp}: the shared head lives on the last stage, but exits "
            f"{[d for d in config.exit_layers if layout.exit_stage(d) != pp - 1]} are on earlier stages"
        )
    return layout


__all__ = ["SplitLayout", "check_split"]
