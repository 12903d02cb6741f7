"""Confidence-based dynamic early exit: each new token comes from the shallowest confident member.

    from ruyi_model.generation import dynamic_generate
    out = dynamic_generate(model, input_ids, max_new_tokens=64, threshold=0.9)   # input_ids: 1 x T
    out.sequences, out.exit_layers, out.tokens_per_member, out.tokens_per_second

Greedy, batch 1; `kv_fill="recompute"` (exact) or `"copy"` (CALM-style). Served as the `dynamic` tier;
measured by `benchmarks/experiments/early_exit.py`. Algorithm and choices: docs/choices.md#dynamic-exit.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.masking_utils import create_causal_mask
from transformers.models.qwen3.modeling_qwen3 import rotate_half

from ruyi_model.modeling import FamilialForCausalLM, LowRankLinear

CRITERIA = ("max_prob", "entropy")
KV_FILLS = ("recompute", "copy")


@dataclass
class DynamicGenerationOutput:
    """What `dynamic_generate` returns (batch size 1; `n` = number of new tokens).

    Attributes:
        sequences: 1 x (T + n) LongTensor: the input (left padding included) and the new tokens.
        exit_layers: 1 x n LongTensor: the member (exit depth) that emitted each new token.
        confidences: 1 x n float32: the emitting member's criterion value (max probability or entropy).
        layers_run: 1 x n LongTensor: decoder layers run for the current position at each step (the
            first step of "copy" prefills every layer of every member).
        layer_rows: 1 x n LongTensor: layer-position forwards of each step (pending positions included).
        copied_kv: 1 x n LongTensor: skipped layers whose K/V were filled by projection ("copy").
        tokens_per_member: `{exit_layer: count}` for every member of the family (zeros included).
        seconds: wall time of the whole call (prefill included).
        first_token_seconds: wall time until the first new token (time to first token).
        threshold, criterion, kv_fill: the settings used.
        past_key_values: the `DynamicCache` (one slot per decoder layer, see modeling.py); with
            "recompute" the slots of deeper layers may be shorter (pending positions not yet computed).
    """

    sequences: torch.LongTensor
    exit_layers: torch.LongTensor
    confidences: torch.Tensor
    layers_run: torch.LongTensor
    layer_rows: torch.LongTensor
    copied_kv: torch.LongTensor
    tokens_per_member: dict[int, int]
    seconds: float
    first_token_seconds: float
    threshold: float
    criterion: str
    kv_fill: str
    past_key_values: DynamicCache | None = None

    @property
    def num_new_tokens(self) -> int:
        return int(self.exit_layers.shape[1])

    @property
    def tokens_per_second(self) -> float:
        return self.num_new_tokens / self.seconds if self.seconds > 0 else float("inf")


@dataclass
class _DecodeStep:
    """One token of a dynamic decode (`_DynamicDecoder.step`) and what it cost."""

    token: int
    exit_layer: int  # the member that emitted it
    value: float  # that member's criterion value (max probability or entropy)
    layers_run: int  # decoder layers run for the current position
    layer_rows: int  # layer-position forwards (pending positions and prompt included)
    copied_kv: int  # K/V projections of skipped layers ("copy")


@dataclass
class _Trace:
    """The steps of one dynamic decode and the time to its first token (from the call's start)."""

    steps: list[_DecodeStep]
    first_token_seconds: float = 0.0


@dataclass
class _Member:
    """Static facts about one member used by the decoder."""

    exit_layer: int
    backbone_depth: int
    layers: list[nn.Module]  # the member's own layers: branch layer(s) then DaE blocks
    norm: nn.Module
    head: nn.Module


class _DynamicDecoder:
    """Incremental state of one dynamic decode: the cache, the pending hidden states, the members.

    `stash` (1 x n x D) holds, for the positions `[stash_start, t]` not yet run through every backbone
    layer, each position's hidden state at the depth it reached (depth of position p = number of
    backbone layers whose cache slot holds p; a slot always holds a prefix of the positions).
    """

    def __init__(
        self, model: FamilialForCausalLM, threshold: float, criterion: str, kv_fill: str, confidence_impl: str
    ):
        cfg = model.config
        self.model, self.cfg = model, cfg
        self.threshold, self.criterion, self.kv_fill = threshold, criterion, kv_fill
        self.confidence_impl = confidence_impl
        self.num_layers = cfg.num_hidden_layers
        self.backbone = list(model.model.layers)
        for i, layer in enumerate(self.backbone):
            if layer.self_attn.layer_idx != i:
                raise ValueError(
                    f"backbone layer {i} uses cache slot {layer.self_attn.layer_idx}; expected {i}"
                )
        self.members = [
            _Member(
                d,
                cfg.backbone_depth(d),
                list(model.exits[str(d)].layers),
                model.exits[str(d)].norm,
                model.exit_head(d),
            )
            for d in cfg.exit_layers
        ]
        self.cache = DynamicCache()
        while len(self.cache.layers) < model.num_cache_slots:
            self.cache.layers.append(DynamicLayer())
        self.stash: torch.Tensor | None = None
        self.stash_start = 0
        self._context_memo: dict[tuple[str, int], object] = {}  # per step: positions, rotary, masks
        self._rows = 0
        self._calls = 0

    # --- helpers -----------------------------------------------------------------------------
    def filled(self, slot: int) -> int:
        return self.cache.layers[slot].get_seq_length()

    def _positions(self, first: int, t: int, like: torch.Tensor):
        """Position ids (1 x q) and rotary (cos, sin) for queries at positions [first, t]."""
        key = ("pos", first)
        if key not in self._context_memo:
            position_ids = torch.arange(first, t + 1, device=like.device).unsqueeze(0)
            queries = like.new_empty(1, t + 1 - first, like.shape[-1])
            self._context_memo[key] = (position_ids, self.model.model.rotary_emb(queries, position_ids))
        return self._context_memo[key]

    def _mask(self, first: int, t: int, like: torch.Tensor, slot: int):
        """The causal mask of queries [first, t] against a slot holding `first` positions.

        Built by transformers for the configured attention implementation (None when sdpa can use
        its own causal path); with B = 1 and no padding it depends on `first` and `t` only.
        """
        key = ("mask", first)
        if key not in self._context_memo:
            position_ids, _ = self._positions(first, t, like)
            queries = like.new_empty(1, t + 1 - first, like.shape[-1])
            self._context_memo[key] = create_causal_mask(
                config=self.cfg,
                inputs_embeds=queries,
                attention_mask=None,
                past_key_values=self.cache,
                position_ids=position_ids,
                layer_idx=slot,
            )
        return self._context_memo[key]

    def _run_layer(self, layer: nn.Module, x: torch.Tensor, first: int, t: int) -> torch.Tensor:
        slot = layer.self_attn.layer_idx
        if self.filled(slot) != first:
            raise RuntimeError(
                f"internal error: slot {slot} holds {self.filled(slot)} positions, expected {first}"
            )
        position_ids, pos_emb = self._positions(first, t, x)
        mask = self._mask(first, t, x, slot)
        self._rows += x.shape[1]
        self._calls += 1
        return layer(
            x,
            attention_mask=mask,
            position_embeddings=pos_emb,
            position_ids=position_ids,
            past_key_values=self.cache,
            use_cache=True,
        )

    def _advance_backbone(self, start: int, stop: int, t: int) -> None:
        """Runs backbone layers [start, stop) over every position each of them has not seen yet."""
        for i in range(start, stop):
            first = self.filled(i)
            if first < self.stash_start:
                raise RuntimeError(
                    f"internal error: backbone layer {i} needs position {first}, "
                    f"which is no longer stashed (stash starts at {self.stash_start})"
                )
            offset = first - self.stash_start
            out = self._run_layer(self.backbone[i], self.stash[:, offset:], first, t)
            self.stash[:, offset:] = out

    def _member_hidden(self, member: _Member, t: int) -> torch.Tensor:
        """Runs the member's own layers over its unseen positions; returns its output at t (1 x D)."""
        b = member.backbone_depth
        if not member.layers:
            return self.stash[:, t - self.stash_start].clone()
        first = self.filled(member.layers[0].self_attn.layer_idx)
        # The inputs are the backbone hidden states at depth b: positions [first, t] must have
        # passed backbone layer b-1 and not yet layer b (member layers always run together).
        passed_b_minus_1 = b == 0 or self.filled(b - 1) > t
        not_past_b = b == self.num_layers or self.filled(b) <= first
        if first < self.stash_start or not passed_b_minus_1 or not not_past_b:
            raise RuntimeError(
                f"internal error: inputs of member {member.exit_layer} at depth {b} are not available"
            )
        x = self.stash[:, first - self.stash_start :]
        for layer in member.layers:
            x = self._run_layer(layer, x, first, t)
        return x[:, -1]

    def _confidence(self, member: _Member, hidden: torch.Tensor) -> tuple[int, float, bool]:
        """(greedy token, criterion value, passes) of `member` for hidden (1 x D) before its norm."""
        from triton_kernels import exit_confidence

        head, norm = member.head, member.norm
        if isinstance(head, LowRankLinear):
            # The model computes B @ (A @ norm(h)); run its first factor, then fuse the last one.
            z = nn.functional.linear(norm(hidden), head.weight_a)
            token, max_prob, entropy = exit_confidence(
                z.contiguous(), None, head.weight_b, impl=self.confidence_impl
            )
        else:
            token, max_prob, entropy = exit_confidence(
                hidden.contiguous(),
                norm.weight,
                head.weight,
                eps=norm.variance_epsilon,
                impl=self.confidence_impl,
            )
        if self.criterion == "max_prob":
            value = float(max_prob[0])
            passes = value >= self.threshold
        else:
            value = float(entropy[0])
            passes = value <= self.threshold
        return int(token[0]), value, passes

    def _project_kv(self, layer: nn.Module, hidden: torch.Tensor, t: int) -> None:
        """CALM propagation: K/V of `layer` at position t from `hidden` (1 x 1 x D) as its input."""
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        shape = (*x.shape[:-1], -1, attn.head_dim)
        keys = attn.k_norm(attn.k_proj(x).view(shape)).transpose(1, 2)
        values = attn.v_proj(x).view(shape).transpose(1, 2)
        _, (cos, sin) = self._positions(t, t, hidden)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        keys = keys * cos + rotate_half(keys) * sin  # as transformers' apply_rotary_pos_emb
        self.cache.update(keys, values, attn.layer_idx)

    def _copy_fill(self, exit_index: int, t: int) -> int:
        """Fills position t of every layer skipped after member `exit_index`; returns how many."""
        member = self.members[exit_index]
        source = self.stash[:, t - self.stash_start : t - self.stash_start + 1]  # 1 x 1 x D at depth b
        skipped = self.backbone[member.backbone_depth :]
        for deeper in self.members[exit_index + 1 :]:
            skipped = skipped + deeper.layers
        for layer in skipped:
            if self.filled(layer.self_attn.layer_idx) != t:
                raise RuntimeError(f"internal error: slot {layer.self_attn.layer_idx} is not at position {t}")
            self._project_kv(layer, source, t)
        return len(skipped)

    # --- one decoding step ----------------------------------------------------------------------
    def step(self, new_ids: torch.LongTensor, t: int, full_prefill: bool) -> _DecodeStep:
        """Predicts the token after position t; `new_ids` (1 x n) are positions [t-n+1, t], not yet seen."""
        self._context_memo.clear()
        self._rows = self._calls = 0
        emb = self.model.model.embed_tokens(new_ids)  # 1 x n x D, depth 0
        self.stash = emb if self.stash is None else torch.cat([self.stash, emb], dim=1)
        depth, chosen = 0, None
        for k, member in enumerate(self.members):
            self._advance_backbone(depth, member.backbone_depth, t)
            depth = member.backbone_depth
            hidden = self._member_hidden(member, t)
            if chosen is None:
                token, value, passes = self._confidence(member, hidden)
                if passes or k == len(self.members) - 1:
                    chosen = (token, k, value)
            if chosen is not None and not full_prefill:
                break
        token, k, value = chosen
        layers_run = self._calls
        copied = self._copy_fill(k, t) if self.kv_fill == "copy" and not full_prefill else 0
        # Positions that have passed every backbone layer are no longer needed.
        done = self.filled(self.num_layers - 1)
        if done > self.stash_start:
            self.stash = self.stash[:, done - self.stash_start :]
            self.stash_start = done
        return _DecodeStep(token, self.members[k].exit_layer, value, layers_run, self._rows, copied)


def _check_threshold(threshold, criterion: str) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise ValueError(f"threshold must be a number, got {threshold!r}")
    threshold = float(threshold)
    if math.isnan(threshold) or threshold < 0:
        raise ValueError(
            f"threshold={threshold!r} is out of range for criterion={criterion!r}: it must be >= 0 "
            "(max_prob: 0 = always exit at the shallowest member, > 1 = never exit early; "
            "entropy in nats: inf = always exit at the shallowest member)"
        )
    return threshold


def _eos_set(eos_token_id, model: FamilialForCausalLM) -> set[int]:
    if eos_token_id is None:
        eos_token_id = getattr(model.generation_config, "eos_token_id", None)
    if eos_token_id is None:
        return set()
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
        raise ValueError(f"eos_token_id must be an int or a list of ints, got {eos_token_id!r}")
    return {int(i) for i in ids}


def _strip_left_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> int:
    """Number of left-padding positions of the single row; other masks are errors."""
    if attention_mask is None:
        return 0
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}"
        )
    row = attention_mask[0].tolist()
    if any(v not in (0, 1) for v in row):
        raise ValueError("attention_mask must hold only 0 and 1")
    pad = row.index(1) if 1 in row else len(row)
    if pad == len(row):
        raise ValueError("attention_mask masks every input position; nothing to condition on")
    if 0 in row[pad:]:
        raise ValueError(
            "attention_mask has zeros after the first 1: only left padding is supported "
            "(batch size 1 needs no padding at all)"
        )
    return pad


def dynamic_generate(
    model: FamilialForCausalLM,
    input_ids: torch.LongTensor,
    max_new_tokens: int,
    threshold: float,
    criterion: str = "max_prob",
    attention_mask: torch.Tensor | None = None,
    eos_token_id: int | list[int] | None = None,
    kv_fill: str = "recompute",
    confidence_impl: str = "auto",
) -> DynamicGenerationOutput:
    """Greedy decoding where each token comes from the shallowest member confident enough.

    The algorithm and both KV fill strategies: docs/choices.md#dynamic-exit.

    Args:
        model: a `FamilialForCausalLM` (any family shape: branch layers, DaE blocks, low-rank or
            shared heads). Put it in eval mode: dropout is not switched off here (as in `generate`).
        input_ids: 1 x T prompt token ids (batch size 1 only).
        max_new_tokens: at most this many new tokens (>= 1).
        threshold: the confidence threshold (>= 0): a member emits when its max softmax probability is
            >= threshold ("max_prob") or its entropy in nats is <= threshold ("entropy").
        criterion: "max_prob" or "entropy".
        attention_mask: optional 1 x T 0/1 mask; only left padding is allowed (it is stripped).
        eos_token_id: token id(s) that end the sequence (kept in the output); default
            `model.generation_config.eos_token_id`; None there too = run to `max_new_tokens`.
        kv_fill: "recompute" (exact KV, pending positions computed later in batches) or "copy"
            (CALM: K/V of skipped layers projected from the hidden state at the exit point).
        confidence_impl: `triton_kernels.exit_confidence` implementation ("auto": triton on CUDA,
            chunked torch elsewhere).

    Returns:
        DynamicGenerationOutput: sequences (1 x (T + n)), exit_layers (1 x n), per-token costs,
        tokens_per_member, timings and the cache.

    Raises:
        ValueError: batch size other than 1, bad threshold / criterion / kv_fill / max_new_tokens /
            attention_mask / eos_token_id, token ids outside the vocabulary.
    """
    threshold = _check_arguments(model, input_ids, max_new_tokens, threshold, criterion, kv_fill)
    pad = _strip_left_padding(input_ids, attention_mask)
    eos = _eos_set(eos_token_id, model)

    device = model.model.embed_tokens.weight.device
    prompt = input_ids[:, pad:].to(device=device, dtype=torch.long)
    start = time.perf_counter()
    with torch.inference_mode():
        decoder = _DynamicDecoder(model, threshold, criterion, kv_fill, confidence_impl)
        trace = _decode(decoder, prompt, max_new_tokens, eos, start)
    seconds = time.perf_counter() - start

    def row(attr: str, dtype):
        return torch.tensor([[getattr(s, attr) for s in trace.steps]], dtype=dtype)

    exits = [s.exit_layer for s in trace.steps]
    new = row("token", torch.long).to(input_ids.device)
    return DynamicGenerationOutput(
        sequences=torch.cat([input_ids.to(torch.long), new], dim=1),
        exit_layers=row("exit_layer", torch.long),
        confidences=row("value", torch.float32),
        layers_run=row("layers_run", torch.long),
        layer_rows=row("layer_rows", torch.long),
        copied_kv=row("copied_kv", torch.long),
        tokens_per_member={d: exits.count(d) for d in model.config.exit_layers},
        seconds=seconds,
        first_token_seconds=trace.first_token_seconds,
        threshold=threshold,
        criterion=criterion,
        kv_fill=kv_fill,
        past_key_values=decoder.cache,
    )


def _check_arguments(model, input_ids, max_new_tokens, threshold, criterion: str, kv_fill: str) -> float:
    """Validates `dynamic_generate`'s arguments (see its Raises); returns the threshold as a float."""
    if not isinstance(model, FamilialForCausalLM):
        raise ValueError(f"dynamic_generate needs a FamilialForCausalLM, got {type(model).__name__}")
    if criterion not in CRITERIA:
        raise ValueError(f"criterion={criterion!r} is unknown; use one of {CRITERIA}")
    if kv_fill not in KV_FILLS:
        raise ValueError(f"kv_fill={kv_fill!r} is unknown; use one of {KV_FILLS}")
    threshold = _check_threshold(threshold, criterion)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if (
        not isinstance(input_ids, torch.Tensor)
        or input_ids.dim() != 2
        or input_ids.dtype not in (torch.long, torch.int)
    ):
        raise ValueError(
            "input_ids must be a 2-D integer tensor of shape 1 x T, got "
            f"{getattr(input_ids, 'shape', type(input_ids).__name__)}"
        )
    if input_ids.shape[0] != 1:
        raise ValueError(
            f"dynamic_generate supports batch size 1 only (input_ids has shape {tuple(input_ids.shape)}): "
            "rows would exit at different members; call it once per sequence"
        )
    if input_ids.shape[1] < 1:
        raise ValueError("input_ids is empty: at least one prompt token is needed")
    vocab = model.config.vocab_size
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
        raise ValueError(f"input_ids hold ids outside the vocabulary [0, {vocab})")
    return threshold


def _decode(
    decoder: _DynamicDecoder, prompt: torch.LongTensor, max_new_tokens: int, eos: set[int], start: float
) -> _Trace:
    """Up to `max_new_tokens` steps after `prompt` (1 x T, on the model's device), stopping after an eos
    token; `start` is the call's start time (for the time to first token)."""
    trace = _Trace(steps=[])
    new_ids, t = prompt, prompt.shape[1] - 1
    for i in range(max_new_tokens):
        step = decoder.step(new_ids, t, full_prefill=(decoder.kv_fill == "copy" and i == 0))
        if i == 0:
            trace.first_token_seconds = time.perf_counter() - start
        trace.steps.append(step)
        if step.token in eos:
            break
        new_ids = torch.tensor([[step.token]], dtype=torch.long, device=prompt.device)
        t += 1
    return trace


__all__ = ["dynamic_generate", "DynamicGenerationOutput", "CRITERIA", "KV_FILLS"]
