"""`FamilialVLForConditionalGeneration`: a vision-language family (Ruyi2.5) on Qwen3-VL.

One vision tower and merger (with its deepstack mergers) feed one familial text backbone. Member `d` is
exactly a stock `Qwen3VLForConditionalGeneration` with `d` text layers: backbone layers `[0, d-b)`, its
own branch layer(s), norm and head (the text family's rule, `FamilialConfig`'s layout). The deepest
member is the stock model itself (`model.language_model.norm`, `lm_head`): the stock class loads a
family checkpoint as its deepest member. Training (`labels`, no `exit_layer`) computes
`sum_k w_k CE_k` from one backbone pass through `triton_kernels.exit_head_loss`; `exit_layer=d` runs
one member (forward, KV cache, `generate` with images). Deepstack, cache slots and why:
docs/choices.md#vision-language-family.

    fam = FamilialVLForConditionalGeneration.from_qwen3_vl(stock_or_path, exit_layers=[1, 2, 4])
    fam(**processor(text=..., images=..., return_tensors="pt"), exit_layer=2).logits
    member = member_to_qwen3_vl(fam, 2)        # a stock Qwen3VLForConditionalGeneration
"""

from __future__ import annotations

import copy
import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.qwen3_vl.modeling_qwen3_vl import (
    Qwen3VLTextDecoderLayer,
    Qwen3VLTextModel,
    Qwen3VLTextRMSNorm,
)

from ruyi_model.config import LOSS_IMPLS, FamilialConfig
from ruyi_model.export import member_dir_name, save_with, write_export
from ruyi_model.modeling import (
    _CACHE_OWNER_ATTR,
    ExitBranch,
    FamilialCausalLMOutput,
    multi_exit_head_loss,
    strict_from_pretrained,
)
from ruyi_model.vl_processor import Qwen3VLImageOnlyProcessor

log = logging.getLogger(__name__)

FAMILY_FIELDS = ("exit_layers", "exit_branch_layers", "shared_heads", "exit_loss_weights", "loss_impl")


@strict
class FamilialVLConfig(Qwen3VLConfig):
    r"""A `Qwen3VLConfig` plus the shape of the family, with the text family's layout rules.

    Args (beyond `Qwen3VLConfig`; counted in text layers, `text_config.num_hidden_layers` = L):
        exit_layers: member depths, strictly increasing, each in `1..L`, the last equal to L.
        exit_branch_layers: text decoder layers owned by each non-deepest member (Ruyi2: 1).
        shared_heads: one LM head shared by all members instead of one per member.
        exit_loss_weights: the weights `w_k` of the multi-exit loss, one per exit (default all 1).
        loss_impl: "auto", "naive", "chunked" or "triton" (`triton_kernels.exit_head_loss`).

    `layout()` is the equivalent text `FamilialConfig` (same exits, branches and heads, no DaE blocks
    or low-rank factors): every layout rule (`backbone_depth`, `branch_layers`, `check_exit`) and every
    check of the family fields is the text family's.
    """

    model_type = "ruyi_familial_vl"

    exit_layers: list[int] | None = None
    exit_branch_layers: int = 1
    shared_heads: bool = False
    exit_loss_weights: list[float] | None = None
    loss_impl: str = "auto"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.exit_layers is None:
            self.exit_layers = [self.text_config.num_hidden_layers]
        if self.exit_loss_weights is None:
            self.exit_loss_weights = [1.0] * len(self.exit_layers)
        layout = self.layout()  # validates the family fields (the text family's checks)
        self.exit_layers = list(layout.exit_layers)
        self.exit_branch_layers = layout.exit_branch_layers
        self.exit_loss_weights = list(layout.exit_loss_weights)
        self.validate_vl_family()

    def layout(self) -> FamilialConfig:
        """The text `FamilialConfig` with this family's exits (cached; raises ValueError if invalid)."""
        tc = self.text_config
        weights = self.exit_loss_weights
        key = (
            tc.num_hidden_layers,
            tc.hidden_size,
            tc.vocab_size,
            float(tc.rms_norm_eps),
            _frozen(self.exit_layers),
            self.exit_branch_layers,
            self.shared_heads,
            _frozen(weights),
            self.loss_impl,
        )
        try:
            hash(key)
        except TypeError:  # e.g. a numpy array: checked (and rejected) without the cache
            build = _layout.__wrapped__
        else:
            build = _layout
        try:
            return build(*key)
        except ValueError as e:
            raise ValueError(str(e).replace("FamilialConfig.", "FamilialVLConfig.")) from None

    def validate_vl_family(self) -> None:
        """What the family needs of the Qwen3-VL config (stock transformers checks none of it)."""
        self.layout()
        if self.tie_word_embeddings:
            raise ValueError(
                "FamilialVLConfig.tie_word_embeddings=True: the family keeps untied heads; "
                "from_qwen3_vl unties a tied source model"
            )
        vc, tc = self.vision_config, self.text_config
        idx = list(vc.deepstack_visual_indexes)
        if any(not isinstance(i, int) or isinstance(i, bool) for i in idx) or any(
            b <= a for a, b in zip(idx, idx[1:])
        ):
            raise ValueError(
                f"vision_config.deepstack_visual_indexes={idx}: must be strictly increasing integers"
            )
        if idx and (idx[0] < 0 or idx[-1] >= vc.depth):
            raise ValueError(
                f"vision_config.deepstack_visual_indexes={idx}: each must be a vision block in "
                f"0..{vc.depth - 1} (vision depth {vc.depth}); others silently yield no feature"
            )
        if len(idx) > tc.num_hidden_layers:
            raise ValueError(
                f"vision_config.deepstack_visual_indexes={idx}: {len(idx)} deepstack features but only "
                f"{tc.num_hidden_layers} text layers to receive them (the extra ones would be dropped)"
            )
        if vc.out_hidden_size != tc.hidden_size:
            raise ValueError(
                f"vision_config.out_hidden_size={vc.out_hidden_size} must equal "
                f"text_config.hidden_size={tc.hidden_size} (the merger feeds the text embeddings)"
            )
        if self.loss_impl not in LOSS_IMPLS:  # (layout() checked it; kept explicit for validate())
            raise ValueError(f"FamilialVLConfig.loss_impl={self.loss_impl!r}: must be one of {LOSS_IMPLS}")

    # --- the text family's layout rules ---------------------------------------------------------
    def check_exit(self, exit_layer) -> int:
        return self.layout().check_exit(exit_layer)

    def backbone_depth(self, exit_layer: int) -> int:
        return self.layout().backbone_depth(exit_layer)

    def branch_layers(self, exit_layer: int) -> int:
        return self.layout().branch_layers(exit_layer)

    def member_deepstack_indexes(self, exit_layer: int) -> list[int]:
        """The vision blocks whose deepstack features member `exit_layer` receives: the first
        `min(d, n)` (feature k is added after text layer k, and the member has d text layers)."""
        d = self.check_exit(exit_layer)
        return list(self.vision_config.deepstack_visual_indexes)[:d]


def _frozen(value):
    """A hashable cache key that keeps each element's type: 1.0 == 1 and hash(1.0) == hash(1), so a
    plain tuple would let a cached valid layout answer for exit_layers=[1.0, 4]."""
    if isinstance(value, (list, tuple)):
        return ("seq", type(value), tuple((type(v), v) for v in value))
    return value


def _thawed(value):
    if isinstance(value, tuple) and value and value[0] == "seq":
        return value[1](v for _, v in value[2])
    return value


@functools.lru_cache(maxsize=128, typed=True)
def _layout(num_layers, hidden, vocab, eps, exits, branch, shared, weights, impl) -> FamilialConfig:
    return FamilialConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=hidden,
        rms_norm_eps=eps,
        exit_layers=_thawed(exits),
        exit_branch_layers=branch,
        shared_heads=shared,
        exit_loss_weights=_thawed(weights),
        loss_impl=impl,
        tie_word_embeddings=False,
    )


@dataclass
class FamilialVLTextOutput(BaseModelOutputWithPast):
    """The familial text model's output: each requested member's last hidden state before its norm."""

    member_hidden: dict[int, torch.Tensor] | None = None


@dataclass(frozen=True)
class _MemberPlan:
    """Which layers to run: `trunk` backbone layers, then at backbone depth i the branches `at[i]`
    (`(exit_layer, branch layers)`; an empty branch is a member that ends in the backbone)."""

    trunk: int
    at: dict[int, list[tuple[int, list[nn.Module]]]]


class FamilialVLTextModel(Qwen3VLTextModel):
    """Qwen3-VL's text model, able to run one member or every member from one pass (`ruyi_plan`).

    Without a plan it is the stock text model (the deepest member, normed). With one it returns each
    planned member's hidden state before its norm; deepstack feature k is added after the member's
    text layer k, whether that layer is a backbone or a branch layer, as in the member's stock export.
    """

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        visual_pos_masks=None,
        deepstack_visual_embeds=None,
        ruyi_plan: _MemberPlan | None = None,
        **kwargs,
    ):
        if ruyi_plan is None:
            return super().forward(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                inputs_embeds=inputs_embeds,
                use_cache=use_cache,
                visual_pos_masks=visual_pos_masks,
                deepstack_visual_embeds=deepstack_visual_embeds,
                **kwargs,
            )
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        # Positions as the stock text model reads them: [4,B,T] = text row + t/h/w rows (generate and
        # Qwen3VLModel pass them); a 2D or missing one is the 1D text position on every row.
        if position_ids is None:
            past = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = (torch.arange(h.shape[1], device=h.device) + past).view(1, 1, -1)
            position_ids = position_ids.expand(4, h.shape[0], -1)
        elif position_ids.ndim == 2:
            position_ids = position_ids[None].expand(4, *position_ids.shape)
        if position_ids.shape[0] == 4:
            text_pos, mrope_pos = position_ids[0], position_ids[1:]
        else:
            text_pos, mrope_pos = None, position_ids
        # Natural cache slots: every member's layers are its stock indexes 0..d-1, so slot 0 is
        # always filled and the default mask sizing (slot 0) is right for every member.
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=h,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=text_pos,
        )
        pos_emb = self.rotary_emb(h, mrope_pos)
        deepstack = deepstack_visual_embeds or []
        layer_kw = dict(
            attention_mask=mask,
            position_ids=text_pos,
            past_key_values=past_key_values,
            position_embeddings=pos_emb,
            **kwargs,
        )

        def run(x, layer, index):  # index: the layer's position in the member (its stock index)
            x = layer(x, **layer_kw)
            if index < len(deepstack):
                x = self._deepstack_process(x, visual_pos_masks, deepstack[index])
            return x

        member_hidden = {}
        for i in range(ruyi_plan.trunk + 1):
            for d, branch in ruyi_plan.at.get(i, []):
                x = h
                for k, layer in enumerate(branch):
                    x = run(x, layer, i + k)
                member_hidden[d] = x
            if i < ruyi_plan.trunk:
                h = run(h, self.layers[i], i)
        return FamilialVLTextOutput(
            last_hidden_state=None, past_key_values=past_key_values, member_hidden=member_hidden
        )


class FamilialVLForConditionalGeneration(Qwen3VLForConditionalGeneration):
    """A Hugging Face image-text-to-text model holding a whole family of Qwen3-VL members.

    Modules: the stock `model.visual` (shared tower, merger, deepstack mergers), `model.language_model`
    (shared embedding and backbone layers, plus the deepest member's norm), `lm_head` (the deepest
    member's head, or every member's with `shared_heads`), and `exits.<d>` for each shallower member:
    its branch layer(s), norm and (unless shared) head.

    Deepstack: member `d` receives the deepstack features of `config.member_deepstack_indexes(d)`, i.e.
    feature k (k < d) is added after its text layer k, including its branch layer at position d-1.
    That is what a stock `d`-layer Qwen3-VL computes, and its export keeps only those indexes (the
    other deepstack mergers are not part of the member), so the export is a faithful stock model.
    """

    config_class = FamilialVLConfig
    config: FamilialVLConfig

    def __init__(self, config: FamilialVLConfig):
        super().__init__(config)
        # The stock text model, able to run members (same parameters, same names).
        self.model.language_model = FamilialVLTextModel(config.text_config)
        layout = config.layout()
        self.exits = nn.ModuleDict()
        for d in config.exit_layers[:-1]:
            self.exits[str(d)] = ExitBranch(
                layout,
                d,
                first_slot=layout.backbone_depth(d),  # natural slots: the member's stock indexes
                layer_cls=Qwen3VLTextDecoderLayer,
                layer_config=config.text_config,
                norm_cls=Qwen3VLTextRMSNorm,
            )
        self.post_init()

    # --- structure ---------------------------------------------------------------------------
    def member_layers(self, exit_layer: int) -> list[nn.Module]:
        """The text decoder layers member `exit_layer` runs, in order (a stock model's `layers`)."""
        d = self.config.check_exit(exit_layer)
        trunk = list(self.model.language_model.layers[: self.config.backbone_depth(d)])
        return trunk + (list(self.exits[str(d)].layers) if str(d) in self.exits else [])

    def member_norm(self, exit_layer: int) -> nn.Module:
        d = self.config.check_exit(exit_layer)
        return self.exits[str(d)].norm if str(d) in self.exits else self.model.language_model.norm

    def exit_head(self, exit_layer: int) -> nn.Linear:
        d = self.config.check_exit(exit_layer)
        if self.config.shared_heads or str(d) not in self.exits:
            return self.lm_head
        return self.exits[str(d)].lm_head

    def _plan(self, exit_layer: int | None) -> _MemberPlan:
        cfg = self.config
        members = cfg.exit_layers if exit_layer is None else [exit_layer]
        at: dict[int, list] = {}
        for d in members:
            branch = list(self.exits[str(d)].layers) if str(d) in self.exits else []
            at.setdefault(cfg.backbone_depth(d), []).append((d, branch))
        return _MemberPlan(trunk=max(at), at=at)

    def _claim_cache(self, cache: Cache | None, use_cache: bool, exit_layer: int) -> Cache | None:
        """The member's KV cache: one cache serves one member (its layers use their stock slots)."""
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config.text_config)
        if cache is None:
            return None
        if not isinstance(cache, DynamicCache):
            raise ValueError(
                f"FamilialVLForConditionalGeneration supports DynamicCache only, got {type(cache).__name__}"
            )
        owner = getattr(cache, _CACHE_OWNER_ATTR, None)
        if owner is not None and owner != exit_layer:
            raise ValueError(
                f"this KV cache was filled by member exit_layer={owner}; member {exit_layer} needs a "
                "cache of its own (members never share cache entries). Pass a fresh DynamicCache or "
                "past_key_values=None."
            )
        setattr(cache, _CACHE_OWNER_ATTR, exit_layer)
        return cache

    def _encode(self, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, mm_encoder_outputs):
        """Vision features, computed once per forward (every member of a pass shares them)."""
        enc = dict(mm_encoder_outputs or {})
        for key, pixels, grid in (
            ("image", pixel_values, image_grid_thw),
            ("video", pixel_values_videos, video_grid_thw),
        ):
            if pixels is None:
                continue
            if enc.get(key) is not None:
                raise ValueError(f"pass either the {key} pixels or mm_encoder_outputs[{key!r}], not both")
            if grid is None:
                raise ValueError(f"{key} pixels need their grid ({key}_grid_thw)")
            enc[key] = self.model.get_image_features(pixels, grid, return_dict=True)
        return enc

    # --- forward -----------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.IntTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs: dict | None = None,
        use_cache: bool | None = None,
        exit_layer: int | None = None,
        exit_loss_weights: list[float] | torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> FamilialCausalLMOutput:
        """Runs one member, or (with `labels` and no `exit_layer`) trains the whole family.

        Args: as `Qwen3VLForConditionalGeneration.forward` (images as `pixel_values` + `image_grid_thw`
        + `mm_token_type_ids` from the processor, or precomputed `mm_encoder_outputs`), plus
            exit_layer: the member to run (an int; floats and bools are errors); None = the deepest
                (so `generate()` works unchanged), except with `labels`, where None means the
                multi-exit loss over every member.
            exit_loss_weights: per-exit weights of the multi-exit loss (default `config.exit_loss_weights`).

        Returns:
            FamilialCausalLMOutput: `loss`, `logits` (of member `exit_layer`), `past_key_values`, and in
            multi-exit training `exit_losses` (`{d: CE_k}`) with `logits=None`. `labels` are unshifted
            (pass -100 at image and padding positions: the loss does not mask image tokens itself).
        """
        cfg = self.config
        multi = labels is not None and exit_layer is None
        if multi:
            if past_key_values is not None:
                raise ValueError("the multi-exit loss runs without a KV cache; pass exit_layer=d to use one")
            d, use_cache, cache = None, False, None
        else:
            # check_exit, not int(): int(2.9) or int(True) would silently run another member.
            d = cfg.exit_layers[-1] if exit_layer is None else cfg.check_exit(exit_layer)
            use_cache = cfg.text_config.use_cache if use_cache is None else use_cache
            if self.training and self.is_activation_checkpointing:
                use_cache = False
            cache = self._claim_cache(past_key_values, bool(use_cache), d)
        enc = self._encode(
            pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, mm_encoder_outputs
        )
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            inputs_embeds=inputs_embeds,
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            mm_token_type_ids=mm_token_type_ids,
            mm_encoder_outputs=enc or None,
            use_cache=use_cache,
            ruyi_plan=self._plan(d),
            **kwargs,
        )
        hidden = out.member_hidden
        if multi:
            seq = hidden[cfg.exit_layers[-1]].shape[:2]
            if tuple(labels.shape) != tuple(seq):
                raise ValueError(f"labels has shape {tuple(labels.shape)}: it must be B x T = {tuple(seq)}")
            hidden = {e: hidden[e] for e in cfg.exit_layers}  # exit order, as the weights
            head_w = self.lm_head.weight if cfg.shared_heads else [self.exit_head(e).weight for e in hidden]
            loss, exit_losses = multi_exit_head_loss(
                hidden,
                labels,
                norm_weights=[self.member_norm(e).weight for e in hidden],
                head_weights=head_w,
                eps=cfg.text_config.rms_norm_eps,
                exit_weights=cfg.exit_loss_weights if exit_loss_weights is None else exit_loss_weights,
                impl=cfg.loss_impl,
            )
            return FamilialCausalLMOutput(loss=loss, logits=None, exit_losses=exit_losses)
        h = slice_logits_to_keep(self.member_norm(d)(hidden[d]), logits_to_keep)
        logits = self.exit_head(d)(h)
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=cfg.text_config.vocab_size, **kwargs
            )
        return FamilialCausalLMOutput(
            loss=loss, logits=logits, past_key_values=cache if use_cache else None, exit_layer=d
        )

    # --- loading -----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, strict: bool = True, **kwargs):
        """As `PreTrainedModel.from_pretrained`, but a checkpoint with missing, extra or mismatched
        tensors is an error (transformers only logs it and initialises missing weights randomly)."""
        return strict_from_pretrained(
            super().from_pretrained,
            pretrained_model_name_or_path,
            "FamilialVLConfig",
            *args,
            strict=strict,
            **kwargs,
        )

    @classmethod
    def from_qwen3_vl(
        cls,
        model_or_path: Qwen3VLForConditionalGeneration | str | Path,
        exit_layers: list[int],
        exit_branch_layers: int = 1,
        shared_heads: bool = False,
        exit_loss_weights: list[float] | None = None,
        **config_overrides,
    ) -> FamilialVLForConditionalGeneration:
        """Builds a family from a stock Qwen3-VL checkpoint the way Ruyi2 builds a text family.

        The vision tower, embedding and text layers are copied; member d's branch layers are copies of
        text layers `d-b .. d-1`; every exit's norm and head are copies of the final norm and head (a
        tied source head is untied). The deepest member then equals the source exactly.
        """
        if isinstance(model_or_path, (str, Path)):
            src = Qwen3VLForConditionalGeneration.from_pretrained(model_or_path, dtype=torch.float32)
        elif isinstance(model_or_path, Qwen3VLForConditionalGeneration) and not isinstance(
            model_or_path, FamilialVLForConditionalGeneration
        ):
            src = model_or_path
        else:
            raise TypeError(
                "from_qwen3_vl expects a stock Qwen3VLForConditionalGeneration or a checkpoint path, "
                f"got {type(model_or_path).__name__}"
            )
        fields = src.config.to_dict()
        for k in ("model_type", "architectures", "transformers_version", "auto_map", "_name_or_path"):
            fields.pop(k, None)
        fields.update(
            exit_layers=list(exit_layers),
            exit_branch_layers=exit_branch_layers,
            shared_heads=shared_heads,
            exit_loss_weights=exit_loss_weights,
            tie_word_embeddings=False,
            **config_overrides,
        )
        config = FamilialVLConfig(**fields)
        model = cls._from_config(config, dtype=src.dtype)
        model.set_attn_implementation(src.config._attn_implementation)
        state = dict(src.state_dict())
        state["lm_head.weight"] = src.get_output_embeddings().weight  # untied copy of a tied head
        with torch.no_grad():
            missing, unexpected = model.load_state_dict(state, strict=False)
            extra = [k for k in missing if not k.startswith("exits.")]
            if extra or unexpected:
                raise ValueError(
                    f"from_qwen3_vl: the source does not match the family (missing {extra[:8]}, "
                    f"unexpected {list(unexpected)[:8]})"
                )
            # Non-persistent buffers (rotary tables) are the source's as they are (dtype included).
            src_buffers = dict(src.named_buffers())
            for name, buf in model.named_buffers():
                if name in src_buffers and name not in state:
                    buf.copy_(src_buffers[name])
            src_layers = src.model.language_model.layers
            for d in config.exit_layers[:-1]:
                branch, depth = model.exits[str(d)], config.backbone_depth(d)
                for k, layer in enumerate(branch.layers):
                    layer.load_state_dict(src_layers[depth + k].state_dict())
                branch.norm.weight.copy_(src.model.language_model.norm.weight)
                if not shared_heads:
                    branch.lm_head.weight.copy_(state["lm_head.weight"])
        model.generation_config = copy.deepcopy(src.generation_config)
        return model


# --- member -> stock Qwen3-VL ---------------------------------------------------------------------
def member_qwen3_vl_config(model: FamilialVLForConditionalGeneration, exit_layer: int) -> Qwen3VLConfig:
    """The stock `Qwen3VLConfig` of member `exit_layer`: `d` text layers and the deepstack indexes the
    member receives (`config.member_deepstack_indexes(d)`), untied head."""
    cfg = model.config
    d = cfg.check_exit(exit_layer)
    fields = cfg.to_dict()
    for key in (*FAMILY_FIELDS, "model_type", "architectures", "transformers_version", "_name_or_path"):
        fields.pop(key, None)
    fields["text_config"] = {**fields["text_config"], "num_hidden_layers": d}
    fields["vision_config"] = {
        **fields["vision_config"],
        "deepstack_visual_indexes": cfg.member_deepstack_indexes(d),
    }
    fields["tie_word_embeddings"] = False
    qcfg = Qwen3VLConfig(**fields)
    qcfg._attn_implementation = cfg._attn_implementation
    return qcfg


def member_vl_state_dict(model: FamilialVLForConditionalGeneration, exit_layer: int) -> dict:
    """Member `exit_layer`'s weights under stock `Qwen3VLForConditionalGeneration` names (detached,
    shared with `model`): the vision tower with its first `len(member_deepstack_indexes(d))` deepstack
    mergers, the embedding, its text layers, norm and head."""
    d = model.config.check_exit(exit_layer)
    n_ds = len(model.config.member_deepstack_indexes(d))
    sd = {}
    for key, tensor in model.model.visual.state_dict().items():
        parts = key.split(".")
        if parts[0] == "deepstack_merger_list" and int(parts[1]) >= n_ds:
            continue
        sd[f"model.visual.{key}"] = tensor.detach()
    lm = model.model.language_model
    sd["model.language_model.embed_tokens.weight"] = lm.embed_tokens.weight.detach()
    for i, layer in enumerate(model.member_layers(d)):
        for key, tensor in layer.state_dict().items():
            sd[f"model.language_model.layers.{i}.{key}"] = tensor.detach()
    sd["model.language_model.norm.weight"] = model.member_norm(d).weight.detach()
    sd["lm_head.weight"] = model.exit_head(d).weight.detach()
    return sd


def member_to_qwen3_vl(model: FamilialVLForConditionalGeneration, exit_layer: int):
    """Member `exit_layer` as a standalone stock `Qwen3VLForConditionalGeneration` (same dtype and
    device, eval mode). Raises RuntimeError if its weights do not fill the stock model (strict load)."""
    qcfg = member_qwen3_vl_config(model, exit_layer)
    device = next(model.parameters()).device
    q = Qwen3VLForConditionalGeneration._from_config(qcfg, dtype=model.dtype).to(device)
    q.load_state_dict(member_vl_state_dict(model, exit_layer), strict=True)
    for name, buf in q.named_buffers():  # rotary tables: the family's as they are
        buf.copy_(model.get_buffer(name))
    q.generation_config = copy.deepcopy(model.generation_config)
    return q.eval()


def member_vl_num_parameters(model: FamilialVLForConditionalGeneration, exit_layer: int) -> int:
    """Parameters member `exit_layer` runs as a standalone model (= its stock export's count)."""
    return sum(t.numel() for t in member_vl_state_dict(model, exit_layer).values())


def export_vl_exits(model: FamilialVLForConditionalGeneration, out_dir: str | Path, processor) -> dict:
    """`ruyi_model.export.export_exits` for a vision-language family (call that): every member as a
    stock Qwen3-VL with the processor beside it, the family, and the manifest (written last, atomically;
    layout and fields as the text export's, plus `modality`, deepstack indexes and vision counts)."""
    if processor is not None and not (
        hasattr(processor, "save_pretrained") and hasattr(processor, "image_processor")
    ):
        raise TypeError(
            "export_exits: a vision-language family needs its processor (tokenizer + image processor, "
            f"e.g. ruyi_model.build_vl_processor), got {type(processor).__name__}"
        )
    cfg = model.config

    def export_member(tmp: Path, d: int) -> dict:
        q = member_to_qwen3_vl(model, d)
        save_with(q, processor, tmp / member_dir_name(d))
        return {
            "dir": member_dir_name(d),
            "exit_layer": d,
            "num_hidden_layers": q.config.text_config.num_hidden_layers,
            "deepstack_visual_indexes": list(q.config.vision_config.deepstack_visual_indexes),
            "dae_blocks": 0,
            "num_parameters": sum(p.numel() for p in q.parameters()),
            "vision_parameters": sum(p.numel() for p in q.model.visual.parameters()),
            "architecture": type(q).__name__,
            "factored": None,
        }

    return write_export(
        model,
        out_dir,
        export_member,
        processor,
        family={
            "num_hidden_layers": cfg.text_config.num_hidden_layers,
            "vision_depth": cfg.vision_config.depth,
            "deepstack_visual_indexes": list(cfg.vision_config.deepstack_visual_indexes),
            "exit_branch_layers": cfg.exit_branch_layers,
            "shared_heads": cfg.shared_heads,
            "dae_blocks": [0] * len(cfg.exit_layers),
            "lowrank_ranks": {},
        },
        extra={
            "modality": "vision-language",
            "tokenizer": processor is not None,
            "processor": processor is not None,
        },
    )


# Importing this module registers the family with the Auto classes (and, through vl_processor, the
# image-only processor for stock Qwen3-VL configs, i.e. the exported members).
AutoConfig.register(FamilialVLConfig.model_type, FamilialVLConfig, exist_ok=True)
AutoModelForImageTextToText.register(FamilialVLConfig, FamilialVLForConditionalGeneration, exist_ok=True)
AutoProcessor.register(FamilialVLConfig, Qwen3VLImageOnlyProcessor, exist_ok=True)


__all__ = [
    "FamilialVLConfig",
    "FamilialVLForConditionalGeneration",
    "FamilialVLTextModel",
    "member_qwen3_vl_config",
    "member_vl_state_dict",
    "member_to_qwen3_vl",
    "member_vl_num_parameters",
    "export_vl_exits",
]
