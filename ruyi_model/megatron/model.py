"""`FamilialGPTModel`: the familial Qwen3 model on megatron-core (TP / PP), same weights and loss as HF.

A megatron-core `GPTModel` (local layer spec `get_gpt_layer_local_spec(qk_layernorm=True,
normalization="RMSNorm")`: RMSNorm, q/k-norm, SwiGLU, GQA, RoPE, untied output, no TE/apex) whose
backbone is the family's backbone, plus, per member, an `ExitBranch` (its branch layers and DaE blocks
as megatron `TransformerLayer`s, its RMSNorm and vocab-parallel head) on the pipeline stage that owns
its exit layer (ruyi_model.megatron.layout). The deepest member is the stock GPTModel head
(`decoder.final_layernorm`, `output_layer`). Weights come from `convert_hf_to_mcore` shards.

Forward (one pipeline stage; `input_ids`/`position_ids` are used on the first stage only):
  - without labels: the last stage returns the deepest member's logits (B x T x V, gathered over TP);
    other stages return their hidden states (T x B x D) for the next stage. `exit_logits={}` collects
    every member of this stage: `{d: B x T x V}`;
  - with labels (already shifted: `labels[:, t]` is the target of position t, as megatron's GPT data
    gives them) and `loss_mask`: the multi-exit loss `sum_k w_k CE_k` (Ruyi2 Eq. 1, weights
    `exit_loss_weights`, default the config's). The last stage returns the per-token loss
    `sum_{k on this stage} w_k ce_k` (B x T; `familial_loss_func` averages it over `loss_mask`, like a
    stock GPT loss); members on earlier stages average their CE over `loss_mask` themselves and attach
    `sum w_k CE_k` to the stage output (the MoE/MTP aux-loss trick), so the pipeline backward carries
    their gradient; `set_exit_loss_scale(1 / num_microbatches)` matches the schedule's averaging.
    Each member's CE_k (detached) is in `model.exit_losses` after the forward.
`model.recompute_layers = True` recomputes every decoder layer's activations in the backward pass
(only layer inputs are kept while training: what long sequences need without fused attention).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from ruyi_model.config import FamilialConfig
from ruyi_model.megatron.cpu_shim import apply_cpu_shim, cuda_available
from ruyi_model.megatron.layout import SplitLayout, check_split


def family_layer_spec() -> ModuleSpec:
    """megatron-core's own local (no TE/apex) Qwen3 decoder layer spec."""
    return get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm")


def transformer_config(
    cfg: FamilialConfig, tp: int = 1, pp: int = 1, dtype: torch.dtype = torch.float32, **overrides
) -> TransformerConfig:
    """The megatron `TransformerConfig` of a family's Qwen3 backbone under a TP x PP split."""
    check_split(cfg, tp, pp)
    kw = dict(
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_key_value_heads,
        kv_channels=cfg.head_dim,
        ffn_hidden_size=cfg.intermediate_size,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.rms_norm_eps,
        qk_layernorm=True,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=float(cfg.attention_dropout),
        init_method_std=cfg.initializer_range,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=False,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=not cuda_available(),
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        cross_entropy_loss_fusion=False,
    )
    kw.update(overrides)
    return TransformerConfig(**kw)


class _ExitLossAttach(torch.autograd.Function):
    """Returns `hidden` unchanged; its backward also sends `scale` as the gradient of `loss`."""

    scale: float = 1.0

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, loss: torch.Tensor):
        ctx.save_for_backward(loss)
        return hidden

    @staticmethod
    def backward(ctx, grad_hidden: torch.Tensor):
        (loss,) = ctx.saved_tensors
        return grad_hidden, torch.full_like(loss, _ExitLossAttach.scale)


def set_exit_loss_scale(scale: float) -> None:
    """Gradient scale of the members on non-last pipeline stages (1 / num_microbatches under the
    megatron schedules, which divide the last stage's loss the same way)."""
    _ExitLossAttach.scale = float(scale)


class ExitBranch(MegatronModule):
    """What one member owns on its stage: branch layers + DaE blocks, RMSNorm and (unless shared) head.

    The deepest member's norm and head are the GPTModel's own, so its branch holds only DaE blocks."""

    def __init__(
        self,
        config: TransformerConfig,
        spec: ModuleSpec,
        num_layers: int,
        with_head: bool,
        vocab_size: int,
        pg_collection,
    ):
        super().__init__(config=config)
        # layer_number only keys megatron's inference caches (not used by the family): any valid number.
        self.layers = torch.nn.ModuleList(
            build_module(spec, config=config, layer_number=1, pg_collection=pg_collection)
            for _ in range(num_layers)
        )
        if with_head:
            self.final_layernorm = build_module(
                spec.submodules.input_layernorm,
                config=config,
                hidden_size=config.hidden_size,
                eps=config.layernorm_epsilon,
            )
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                config.hidden_size,
                vocab_size,
                config=config,
                init_method=config.init_method,
                bias=False,
                skip_bias_add=False,
                gather_output=False,
                tp_group=pg_collection.tp,
            )


class FamilialGPTModel(GPTModel):
    """The family on one pipeline stage (see module docstring)."""

    def __init__(
        self,
        family_config: FamilialConfig,
        config: TransformerConfig,
        pre_process: bool = True,
        post_process: bool = True,
        pp_rank: int = 0,
        max_sequence_length: int | None = None,
    ):
        layout = check_split(
            family_config, config.tensor_model_parallel_size, config.pipeline_model_parallel_size
        )
        spec = family_layer_spec()
        rope = family_config.rope_parameters or {}
        super().__init__(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=family_config.vocab_size,
            max_sequence_length=max_sequence_length or family_config.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=False,
            position_embedding_type="rope",
            rotary_base=rope.get("rope_theta", 10000.0),
        )
        self.family_config = family_config
        self.layout: SplitLayout = layout
        self.pp_rank = pp_rank
        self.stage_start = layout.stage_start(pp_rank)
        if len(self.decoder.layers) != layout.layers_per_stage:
            raise ValueError(
                f"megatron built {len(self.decoder.layers)} layers on stage {pp_rank}, the split says "
                f"{layout.layers_per_stage}"
            )
        self.stage_exits = layout.exits_on_stage(pp_rank)
        self.deepest = family_config.exit_layers[-1]
        self.exits = torch.nn.ModuleDict()
        for d in self.stage_exits:
            n = family_config.branch_layers(d) + family_config.num_dae_blocks(d)
            with_head = d != self.deepest
            if n or with_head:
                self.exits[str(d)] = ExitBranch(
                    config,
                    spec,
                    n,
                    with_head and not family_config.shared_heads,
                    family_config.vocab_size,
                    self.pg_collection,
                )
                if with_head and family_config.shared_heads:
                    self.exits[str(d)].final_layernorm = build_module(
                        spec.submodules.input_layernorm,
                        config=config,
                        hidden_size=config.hidden_size,
                        eps=config.layernorm_epsilon,
                    )
        self.exit_loss_weights = list(family_config.exit_loss_weights)
        self.exit_losses: dict[int, torch.Tensor] = {}
        #: Full activation recomputation of every decoder layer (backbone, branches, DaE blocks).
        self.recompute_layers = False

    # --- pieces of a member -----------------------------------------------------------------------
    def _member_tail(self, d: int):
        branch = self.exits[str(d)] if str(d) in self.exits else None
        layers = list(branch.layers) if branch is not None else []
        if d == self.deepest:
            return layers, self.decoder.final_layernorm, self.output_layer
        head = self.output_layer if self.family_config.shared_heads else branch.output_layer
        return layers, branch.final_layernorm, head

    def _run_layer(self, layer, hidden, attention_mask, rotary_pos_emb) -> torch.Tensor:
        """One decoder layer; with `recompute_layers` (training) its activations are recomputed in the
        backward pass (torch.utils.checkpoint: only the layer input is kept)."""

        def run(h):
            return layer(hidden_states=h, attention_mask=attention_mask, rotary_pos_emb=rotary_pos_emb)[0]

        if self.recompute_layers and self.training and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(run, hidden, use_reentrant=False)
        return run(hidden)

    def _run_member(self, d, hidden, attention_mask, rotary_pos_emb) -> torch.Tensor:
        layers, norm, head = self._member_tail(d)
        for layer in layers:
            hidden = self._run_layer(layer, hidden, attention_mask, rotary_pos_emb)
        logits, _ = head(norm(hidden))
        return logits  # T x B x V/tp

    # --- forward ----------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
        exit_logits: dict | None = None,
        exit_loss_weights: list[float] | None = None,
        **unused,
    ) -> torch.Tensor:
        """See the module docstring. `attention_mask`: megatron's boolean mask (True = masked), default
        causal."""
        if unused:
            raise TypeError(f"FamilialGPTModel.forward got unsupported arguments {sorted(unused)}")
        if self.pre_process:
            hidden = self.embedding(input_ids=input_ids, position_ids=position_ids)
        else:
            hidden = self.decoder.input_tensor
            if hidden is None:
                raise ValueError(
                    f"stage {self.pp_rank} needs its input tensor (set_input_tensor) from the previous stage"
                )
        seq = hidden.shape[0]
        if attention_mask is None:
            attention_mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool, device=hidden.device), 1)[
                None, None
            ]
        rotary = self.rotary_pos_emb(seq)
        weights = list(self.exit_loss_weights if exit_loss_weights is None else exit_loss_weights)
        if len(weights) != len(self.family_config.exit_layers):
            raise ValueError(
                f"exit_loss_weights needs {len(self.family_config.exit_layers)} values, got {weights}"
            )
        weight_of = dict(zip(self.family_config.exit_layers, weights))
        branch_at: dict[int, list[int]] = {}
        for d in self.stage_exits:
            branch_at.setdefault(self.layout.backbone_depth(d), []).append(d)
        logits_of: dict[int, torch.Tensor] = {}
        n_local = len(self.decoder.layers)
        for j in range(n_local + 1):
            for d in branch_at.get(self.stage_start + j, []):
                if d != self.deepest:
                    logits_of[d] = self._run_member(d, hidden, attention_mask, rotary)
            if j < n_local:
                hidden = self._run_layer(self.decoder.layers[j], hidden, attention_mask, rotary)
        if self.post_process:
            logits_of[self.deepest] = self._run_member(self.deepest, hidden, attention_mask, rotary)

        if labels is None:
            if exit_logits is not None:
                for d, lg in logits_of.items():
                    exit_logits[d] = _gather_vocab(lg).transpose(0, 1).contiguous()
            if self.post_process:
                return (
                    exit_logits[self.deepest]
                    if exit_logits is not None
                    else _gather_vocab(logits_of[self.deepest]).transpose(0, 1).contiguous()
                )
            return hidden

        if labels.shape != input_shape_bt(hidden):
            raise ValueError(
                f"labels has shape {tuple(labels.shape)}, expected B x T = {input_shape_bt(hidden)}"
            )
        if labels.min() < 0:
            raise ValueError(
                "labels must be token ids (megatron style: already shifted); leave positions out of "
                "the loss with loss_mask, not with -100"
            )
        if loss_mask is None:
            loss_mask = torch.ones_like(labels, dtype=torch.float32)
        loss_mask = loss_mask.float()
        denom = loss_mask.sum().clamp(min=1.0)
        self.exit_losses = {}
        per_token_last = None
        attached = None
        for d, lg in logits_of.items():
            ce = self.compute_language_model_loss(labels, lg)  # B x T
            self.exit_losses[d] = (ce.detach() * loss_mask).sum() / denom
            if self.post_process:
                term = weight_of[d] * ce
                per_token_last = term if per_token_last is None else per_token_last + term
            else:
                term = weight_of[d] * (ce * loss_mask).sum() / denom
                attached = term if attached is None else attached + term
        if self.post_process:
            return per_token_last
        if attached is not None:
            hidden = _ExitLossAttach.apply(hidden, attached)
        return hidden


def input_shape_bt(hidden: torch.Tensor) -> torch.Size:
    """B x T of a T x B x D hidden state."""
    return torch.Size((hidden.shape[1], hidden.shape[0]))


def _gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return logits
    return tensor_parallel.gather_from_tensor_model_parallel_region(logits)


def familial_loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """`loss_func` for megatron's pipeline schedules: the masked mean of the last stage's per-token
    multi-exit loss. Returns (loss, {"lm loss": detached copy}) (the schedule divides `loss` in place)."""
    mask = loss_mask.float().reshape(-1)
    loss = (output_tensor.float().reshape(-1) * mask).sum() / mask.sum().clamp(min=1.0)
    return loss, {"lm loss": loss.detach().clone()}


def build_model(
    cfg: FamilialConfig, dtype: torch.dtype = torch.float32, **config_overrides
) -> FamilialGPTModel:
    """This rank's stage of the family (megatron's parallel_state must be initialised: `init_parallel`)."""
    apply_cpu_shim()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    config = transformer_config(cfg, tp, pp, dtype, **config_overrides)
    return FamilialGPTModel(
        cfg,
        config,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        pp_rank=pp_rank,
    )


def load_model(
    mcore_dir: str | Path, dtype: torch.dtype | None = None, **config_overrides
) -> FamilialGPTModel:
    """Builds this rank's stage and loads its shard of a `convert_hf_to_mcore` checkpoint (strictly:
    every tensor filled, none left over). The split of the checkpoint must match parallel_state's."""
    from ruyi_model.megatron.convert import load_rank_state_dict, read_split

    desc, cfg, layout = read_split(mcore_dir)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if (tp, pp) != (layout.tp, layout.pp):
        raise ValueError(
            f"{mcore_dir} is split tp={layout.tp}, pp={layout.pp}; this process group is tp={tp}, pp={pp}"
        )
    sd = load_rank_state_dict(
        mcore_dir,
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_pipeline_model_parallel_rank(),
    )
    if dtype is None:
        dtype = next(iter(sd.values())).dtype
    model = build_model(cfg, dtype=dtype, **config_overrides)
    result = model.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("._extra_state")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{mcore_dir}: shard does not fill the model: missing {missing[:8]}, "
            f"unexpected {list(result.unexpected_keys)[:8]}"
        )
    return model


def init_parallel(tp: int = 1, pp: int = 1, seed: int = 0) -> None:
    """megatron's model-parallel groups and RNG states on an initialised torch.distributed (gloo on CPU)."""
    import torch.distributed as dist

    from ruyi_model.megatron.cpu_shim import install_cpu_rng_tracker

    if not dist.is_initialized():
        raise RuntimeError(
            "init_parallel needs torch.distributed initialised (e.g. init_process_group('gloo'))"
        )
    apply_cpu_shim()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    install_cpu_rng_tracker(seed)


__all__ = [
    "FamilialGPTModel",
    "ExitBranch",
    "family_layer_spec",
    "transformer_config",
    "build_model",
    "load_model",
    "init_parallel",
    "familial_loss_func",
    "set_exit_loss_scale",
]
