"""`FamilialForCausalLM`: one Qwen3 backbone, a family of members, one per exit (Ruyi2).

The member of depth `d` runs backbone layers `[0, d-b)`, then its own branch layer(s) and DaE blocks,
then its norm and head: exactly a stock `Qwen3ForCausalLM` of `d + dae_blocks` layers. Training
(`labels`, `exit_layer=None`) computes `sum_k w_k CE_k` in one backbone pass through
`triton_kernels.exit_head_loss`; `exit_layer=d` runs one member. Layout, KV-cache slots and why:
docs/choices.md#model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import GenerationMixin, Qwen3Config, Qwen3ForCausalLM
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3RMSNorm, Qwen3RotaryEmbedding

from ruyi_model.config import FamilialConfig

_CACHE_OWNER_ATTR = "_ruyi_exit_layer"


class LowRankLinear(nn.Module):
    """`y = x @ (B @ A).T` with `A`: rank x in, `B`: out x rank; replaces a bias-free nn.Linear."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.weight_a = nn.Parameter(torch.empty(rank, in_features))
        self.weight_b = nn.Parameter(torch.empty(out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(nn.functional.linear(x, self.weight_a), self.weight_b)

    def dense_weight(self) -> torch.Tensor:
        """The equivalent dense weight, out x in (multiplied in fp32)."""
        return (self.weight_b.float() @ self.weight_a.float()).to(self.weight_a.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class FamilialBackbone(nn.Module):
    """The shared part: token embedding, backbone decoder layers and rotary embedding."""

    def __init__(self, config: FamilialConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(Qwen3DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.rotary_emb = Qwen3RotaryEmbedding(config=config)


class ExitBranch(nn.Module):
    """What one member owns: branch layers + DaE blocks (`layers`), its norm and (unless shared) head."""

    def __init__(
        self,
        config: FamilialConfig,
        exit_layer: int,
        first_slot: int,
        layer_cls: type[nn.Module] = Qwen3DecoderLayer,
        layer_config=None,
        norm_cls: type[nn.Module] = Qwen3RMSNorm,
    ):
        """`layer_cls(layer_config or config, layer_idx)` builds each layer and `norm_cls` the norm: the
        vision-language family (ruyi_model.vl) passes its Qwen3-VL text decoder layer, config and norm."""
        super().__init__()
        n_branch, n_dae = config.branch_layers(exit_layer), config.num_dae_blocks(exit_layer)
        layers = []
        for k in range(n_branch + n_dae):
            # Any valid layer_idx builds the layer (it only selects layer_types); the cache slot is set after.
            layer = layer_cls(layer_config or config, layer_idx=min(exit_layer, config.num_hidden_layers) - 1)
            layer.self_attn.layer_idx = first_slot + k
            if k >= n_branch:
                # DaE zero-residual blocks: identity at first (Ruyi2 4.4). Marked here, zeroed in
                # _init_weights so that neither post_init nor from_pretrained's init of missing keys
                # clobbers it.
                layer.self_attn.o_proj._ruyi_zero_init = True
                layer.mlp.down_proj._ruyi_zero_init = True
            layers.append(layer)
        self.layers = nn.ModuleList(layers)
        self.norm = norm_cls(config.hidden_size, eps=config.rms_norm_eps)
        if not config.shared_heads:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)


@dataclass
class FamilialCausalLMOutput(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus, in multi-exit training, each member's loss.

    Attributes:
        exit_losses: `{exit_layer: CE_k}` (detached), or None.
        exit_layer: the member that produced `logits` (None in multi-exit training, where `logits` is
            None: use `exit_layer=d` to get a member's logits).
    """

    exit_losses: dict[int, torch.Tensor] | None = None
    exit_layer: int | None = None


def strict_from_pretrained(load, path, config_name: str, *args, strict: bool = True, **kwargs):
    """Runs a `from_pretrained` (`load`, the parent class's bound method) and, when `strict`, turns
    transformers' logged missing / unexpected / mismatched tensors into a ValueError naming them and
    the checkpoint (shared by the text and the VL family classes)."""
    want_info = kwargs.pop("output_loading_info", False)
    if strict:
        # Load mismatched shapes instead of raising transformers' generic error, so that ours names them.
        kwargs.setdefault("ignore_mismatched_sizes", True)
    model, info = load(path, *args, output_loading_info=True, **kwargs)
    problems = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {k: v for k, v in problems.items() if v}
    if strict and problems:
        detail = "; ".join(f"{k}: {v[:8]}{' ...' if len(v) > 8 else ''}" for k, v in problems.items())
        raise ValueError(f"checkpoint {path} does not match its {config_name}: {detail}")
    return (model, info) if want_info else model


class FamilialForCausalLM(PreTrainedModel, GenerationMixin):
    """A Hugging Face causal LM holding a whole family of Qwen3 members (docs/choices.md#model)."""

    config_class = FamilialConfig
    config: FamilialConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Qwen3DecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False

    def __init__(self, config: FamilialConfig):
        super().__init__(config)
        self.model = FamilialBackbone(config)
        slot = config.num_hidden_layers
        self.exits = nn.ModuleDict()
        for d in config.exit_layers:
            self.exits[str(d)] = ExitBranch(config, d, first_slot=slot)
            slot += len(self.exits[str(d)].layers)
        self.num_cache_slots = slot
        if config.shared_heads:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        for path, rank in config.lowrank_ranks.items():
            self._set_lowrank(path, rank)
        self.post_init()

    # --- structure helpers -----------------------------------------------------------------
    def _set_lowrank(self, path: str, rank: int) -> LowRankLinear:
        parent_path, _, name = path.rpartition(".")
        try:
            parent = self.get_submodule(parent_path)
            old = getattr(parent, name)
        except AttributeError:
            raise ValueError(f"lowrank_ranks names {path!r}, which is not a module of this family") from None
        if isinstance(old, LowRankLinear):
            in_f, out_f = old.in_features, old.out_features
        elif isinstance(old, nn.Linear) and old.bias is None:
            in_f, out_f = old.in_features, old.out_features
        else:
            raise ValueError(f"lowrank_ranks names {path!r}, which is not a bias-free linear layer")
        new = LowRankLinear(in_f, out_f, rank)
        setattr(parent, name, new)
        return new

    def exit_head(self, exit_layer: int) -> nn.Linear | LowRankLinear:
        return self.lm_head if self.config.shared_heads else self.exits[str(exit_layer)].lm_head

    def member_layers(self, exit_layer: int) -> list[nn.Module]:
        """The decoder layers member `exit_layer` runs, in order (a stock Qwen3 model's `layers`)."""
        self.config.check_exit(exit_layer)
        return list(self.model.layers[: self.config.backbone_depth(exit_layer)]) + list(
            self.exits[str(exit_layer)].layers
        )

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.exit_head(self.config.exit_layers[-1])

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, LowRankLinear):
            std = self.config.initializer_range
            init.normal_(module.weight_a, mean=0.0, std=std)
            init.normal_(module.weight_b, mean=0.0, std=std)
        if getattr(module, "_ruyi_zero_init", False):
            if isinstance(module, LowRankLinear):
                init.zeros_(module.weight_b)
            else:
                init.zeros_(module.weight)

    # --- forward ---------------------------------------------------------------------------
    def _prepare_cache(self, cache: Cache | None, use_cache: bool, exit_layer: int) -> Cache | None:
        if use_cache and cache is None:
            cache = DynamicCache()
        if cache is None:
            return None
        owner = getattr(cache, _CACHE_OWNER_ATTR, None)
        if owner is not None and owner != exit_layer:
            raise ValueError(
                f"this KV cache was filled by member exit_layer={owner}; member {exit_layer} "
                "needs a cache of its "
                "own (members never share cache entries). Pass a fresh DynamicCache or past_key_values=None."
            )
        if not isinstance(cache, DynamicCache):
            raise ValueError(f"FamilialForCausalLM supports DynamicCache only, got {type(cache).__name__}")
        # generate() pre-sizes its cache to num_hidden_layers; the exits' layers need their own slots.
        while len(cache.layers) < self.num_cache_slots:
            cache.layers.append(DynamicLayer())
        setattr(cache, _CACHE_OWNER_ATTR, exit_layer)
        return cache

    def _embed_and_mask(
        self, input_ids, inputs_embeds, attention_mask, position_ids, cache, first_slot, labels
    ):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if isinstance(attention_mask, dict):
            raise ValueError(
                "static/compiled caches are not supported by FamilialForCausalLM; use DynamicCache"
            )
        past = cache.layers[first_slot].get_seq_length() if cache is not None else 0
        _check_shapes(input_ids, inputs_embeds, attention_mask, labels, past)
        h = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if position_ids is None:
            position_ids = (torch.arange(h.shape[1], device=h.device) + past).unsqueeze(0)
        # The mask is sized from the member's own first cache slot: the shallowest member may never
        # fill slot 0, and the default would silently build a wrong mask under left padding.
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=h,
            attention_mask=attention_mask,
            past_key_values=cache,
            position_ids=position_ids,
            layer_idx=first_slot,
        )
        pos_emb = self.model.rotary_emb(h, position_ids)
        return h, mask, position_ids, pos_emb

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        exit_layer: int | None = None,
        exit_loss_weights: list[float] | torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> FamilialCausalLMOutput:
        """Runs one member, or (with `labels` and no `exit_layer`) trains the whole family.

        Args:
            input_ids: B x T token ids (or `inputs_embeds`: B x T x D).
            attention_mask: B x (past + T) 0/1 padding mask (past = tokens already in the member's KV
                cache), or an already prepared 4D mask, passed through as in transformers.
            labels: B x T (the shape of `input_ids`); shifted inside (pass `labels=input_ids`); -100 is
                ignored.
            exit_layer: the member to run (an int; numpy / 0-d torch integers are accepted, floats and
                bools are errors); None = the deepest (so `generate()` works unchanged), except with
                `labels`, where None means the multi-exit loss over every member.
            exit_loss_weights: per-exit weights of the multi-exit loss (default `config.exit_loss_weights`).
            logits_to_keep: as in transformers (`generate` passes 1).

        Returns:
            FamilialCausalLMOutput: `loss`, `logits` (B x T' x V, of member `exit_layer`),
            `past_key_values`, and in multi-exit training `exit_losses`.

        `labels` without `exit_layer` gives the multi-exit result in eval mode too, not the deepest
        member's loss: `loss` is the weighted `sum_k w_k * CE_k`, `exit_losses` maps each member to its
        CE_k and `logits` is None. For one member's loss (and logits), pass `exit_layer=d`.
        """
        if labels is not None and exit_layer is None:
            return self._multi_exit_loss(
                input_ids, inputs_embeds, attention_mask, position_ids, labels, exit_loss_weights, **kwargs
            )
        # check_exit, not int(): int(2.9) or int(True) would silently run another member.
        d = self.config.exit_layers[-1] if exit_layer is None else self.config.check_exit(exit_layer)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.training and self.is_activation_checkpointing:  # (the property scans every module)
            use_cache = False
        cache = self._prepare_cache(past_key_values, bool(use_cache), d)
        layers = self.member_layers(d)
        first_slot = layers[0].self_attn.layer_idx
        h, mask, position_ids, pos_emb = self._embed_and_mask(
            input_ids, inputs_embeds, attention_mask, position_ids, cache, first_slot, labels
        )
        for layer in layers:
            h = layer(
                h,
                attention_mask=mask,
                position_embeddings=pos_emb,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=use_cache,
                **kwargs,
            )
        h = self.exits[str(d)].norm(h)
        if isinstance(logits_to_keep, int):
            h = h[:, -logits_to_keep:, :] if logits_to_keep > 0 else h
        else:
            h = h[:, logits_to_keep, :]
        logits = self.exit_head(d)(h)
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs
            )
        return FamilialCausalLMOutput(
            loss=loss, logits=logits, past_key_values=cache if use_cache else None, exit_layer=d
        )

    def _multi_exit_loss(
        self, input_ids, inputs_embeds, attention_mask, position_ids, labels, exit_loss_weights, **kwargs
    ) -> FamilialCausalLMOutput:
        cfg = self.config
        h, mask, position_ids, pos_emb = self._embed_and_mask(
            input_ids, inputs_embeds, attention_mask, position_ids, None, 0, labels
        )
        layer_kw = dict(
            attention_mask=mask,
            position_embeddings=pos_emb,
            position_ids=position_ids,
            past_key_values=None,
            use_cache=False,
            **kwargs,
        )
        # Members are computed from one backbone pass: each branches off where its backbone part ends.
        branch_at: dict[int, list[int]] = {}
        for d in cfg.exit_layers:
            branch_at.setdefault(cfg.backbone_depth(d), []).append(d)
        finals: dict[int, torch.Tensor] = {}
        for i in range(cfg.num_hidden_layers + 1):
            for d in branch_at.get(i, []):
                x = h
                for layer in self.exits[str(d)].layers:
                    x = layer(x, **layer_kw)
                finals[d] = x
            if i < cfg.num_hidden_layers:
                h = self.model.layers[i](h, **layer_kw)
        if cfg.shared_heads:
            head_w = _dense_weight(self.lm_head)  # one V x D head for every member
        else:
            head_w = [_dense_weight(self.exit_head(d)) for d in cfg.exit_layers]
        weights = cfg.exit_loss_weights if exit_loss_weights is None else exit_loss_weights
        loss, exit_losses = multi_exit_head_loss(
            {d: finals[d] for d in cfg.exit_layers},
            labels,
            norm_weights=[self.exits[str(d)].norm.weight for d in cfg.exit_layers],
            head_weights=head_w,
            eps=cfg.rms_norm_eps,
            exit_weights=weights,
            impl=cfg.loss_impl,
        )
        return FamilialCausalLMOutput(loss=loss, logits=None, exit_losses=exit_losses)

    # --- loading -----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, strict: bool = True, **kwargs):
        """As `PreTrainedModel.from_pretrained`, but a checkpoint with missing, extra or mismatched
        tensors is an error (transformers only logs it and initialises missing weights randomly)."""
        return strict_from_pretrained(
            super().from_pretrained,
            pretrained_model_name_or_path,
            "FamilialConfig",
            *args,
            strict=strict,
            **kwargs,
        )

    @classmethod
    def from_qwen3(
        cls,
        model_or_path: Qwen3ForCausalLM | str | Path,
        exit_layers: list[int],
        exit_branch_layers: int = 1,
        shared_heads: bool = False,
        exit_loss_weights: list[float] | None = None,
        **config_overrides,
    ) -> FamilialForCausalLM:
        """Builds a family from a stock Qwen3 checkpoint the way Ruyi2 did.

        The backbone is copied; member d's branch layers are copies of backbone layers
        `d-b .. d-1` (b = `exit_branch_layers`, Ruyi2: the layer after the exit point); every exit's
        norm and head are copies of the final norm and head (a tied source head is untied). The
        deepest member then equals the source model exactly.
        """
        if isinstance(model_or_path, (str, Path)):
            src = Qwen3ForCausalLM.from_pretrained(model_or_path, dtype=torch.float32)
        elif isinstance(model_or_path, Qwen3ForCausalLM):
            src = model_or_path
        else:
            raise TypeError(
                "from_qwen3 expects a Qwen3ForCausalLM or a checkpoint path, "
                f"got {type(model_or_path).__name__}"
            )
        src_cfg: Qwen3Config = src.config
        cfg_dict = src_cfg.to_dict()
        for k in ("model_type", "architectures", "layer_types", "transformers_version", "auto_map"):
            cfg_dict.pop(k, None)
        cfg_dict.update(
            exit_layers=list(exit_layers),
            exit_branch_layers=exit_branch_layers,
            shared_heads=shared_heads,
            exit_loss_weights=exit_loss_weights,
            tie_word_embeddings=False,
            **config_overrides,
        )
        config = FamilialConfig(**cfg_dict)
        # Built directly in the source dtype, as from_pretrained does: `cls(config).to(bf16)` would also
        # cast the rotary inv_freq buffers, which the stock model keeps in fp32 (~3e-3 logit drift).
        model = cls._from_config(config, dtype=src.dtype)
        src_sd = src.state_dict()
        with torch.no_grad():
            # The rotary buffers are not in the state dict: take the source's as they are (dtype included),
            # so the RoPE tables, and therefore the deepest member, are the source's exactly.
            for name, buf in src.model.rotary_emb.named_buffers(recurse=False):
                setattr(model.model.rotary_emb, name, buf.detach().clone())
            model.model.embed_tokens.weight.copy_(src_sd["model.embed_tokens.weight"])
            for i, layer in enumerate(model.model.layers):
                layer.load_state_dict(src.model.layers[i].state_dict())
            head = src_sd.get("lm_head.weight", src_sd["model.embed_tokens.weight"])
            for d in config.exit_layers:
                branch = model.exits[str(d)]
                depth = config.backbone_depth(d)
                for k in range(config.branch_layers(d)):
                    branch.layers[k].load_state_dict(src.model.layers[depth + k].state_dict())
                branch.norm.weight.copy_(src.model.norm.weight)
                if not shared_heads:
                    branch.lm_head.weight.copy_(head)
            if shared_heads:
                model.lm_head.weight.copy_(head)
        model.generation_config = copy.deepcopy(src.generation_config)
        return model


def multi_exit_head_loss(
    finals: dict[int, torch.Tensor],
    labels: torch.Tensor,
    norm_weights: list[torch.Tensor],
    head_weights: torch.Tensor | list[torch.Tensor],
    eps: float,
    exit_weights,
    impl: str,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """The exit heads' part of the multi-exit loss, through `triton_kernels.exit_head_loss`.

    Args:
        finals: `{exit_layer: B x T x D}` each member's last hidden state before its norm, in exit order.
        labels: B x T, unshifted (position t predicts token t+1, as transformers' ForCausalLMLoss).
        norm_weights / head_weights: each member's RMSNorm weight and V x D head (one tensor if shared).
        exit_weights: the weights `w_k` (one per exit).

    Returns:
        `(sum_k w_k * CE_k, {exit_layer: CE_k detached})`. Shared by the text and vision-language families.
    """
    from triton_kernels import exit_head_loss

    exits = list(finals)
    shift_labels = nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1)
    hidden = torch.stack([finals[d].reshape(-1, finals[d].shape[-1]) for d in exits])
    head_w = head_weights if isinstance(head_weights, torch.Tensor) else torch.stack(list(head_weights))
    weights = torch.as_tensor(exit_weights, dtype=torch.float32, device=hidden.device)
    if weights.numel() != len(exits):
        raise ValueError(f"exit_loss_weights needs {len(exits)} values, got {weights.numel()}")
    loss, per_exit = exit_head_loss(
        hidden,
        head_w,
        shift_labels,
        norm_weights=torch.stack(list(norm_weights)),
        eps=eps,
        exit_weights=weights,
        impl=impl,
    )
    return loss, {d: per_exit[k].detach() for k, d in enumerate(exits)}


def _dense_weight(head: nn.Linear | LowRankLinear) -> torch.Tensor:
    """The out x in weight of a head, dense or low rank (the multi-exit loss kernel takes dense heads)."""
    return head.dense_weight() if isinstance(head, LowRankLinear) else head.weight


def _check_shapes(input_ids, inputs_embeds, attention_mask, labels, past: int) -> None:
    """attention_mask must be B x (past + T) and labels B x T: a wrong size would otherwise be broadcast
    or sliced by the mask builder / loss without an error."""
    name, x = ("input_ids", input_ids) if input_ids is not None else ("inputs_embeds", inputs_embeds)
    if x.ndim != (2 if input_ids is not None else 3):
        raise ValueError(
            f"{name} has shape {tuple(x.shape)}: expected B x T" + (" x D" if input_ids is None else "")
        )
    batch, seq = x.shape[0], x.shape[1]
    if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim != 4:  # 4D: prepared, passed through
        want = (batch, past + seq)
        if tuple(attention_mask.shape) != want:
            cached = f" plus {past} cached tokens" if past else ""
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but {name} has shape "
                f"{tuple(x.shape)}{cached}: it must be B x (past + T) = {want}"
            )
    if labels is not None and tuple(labels.shape) != (batch, seq):
        raise ValueError(
            f"labels has shape {tuple(labels.shape)} but {name} has shape {tuple(x.shape)}: "
            f"labels must be B x T = {(batch, seq)}"
        )


__all__ = ["FamilialForCausalLM", "FamilialCausalLMOutput", "LowRankLinear"]
