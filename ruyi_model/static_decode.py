"""Batched incremental decoding of one member over a preallocated KV cache: the rollouts' lean path.

`FamilialForCausalLM.forward` with a `DynamicCache` costs, per decoded token and layer, a
concatenation of the whole K and V cache (`torch.cat`) and the Python of the transformers modules
(masks, hooks, kwargs). With the tiny default's width (128) on a CPU those dominate the arithmetic.
`StaticMemberDecoder` takes over after the prompt's prefill (which stays the model's own forward): it
copies the member's filled cache slots into buffers sized for the whole completion, writes each new
K/V in place, fuses the q/k/v and gate/up projections into one matmul each, and runs the member's
layers as plain tensor code around the model's own norms, rotary embedding and head. It computes
what the model computes, up to the rounding of the fused matmuls and of its attention (a masked softmax
over the filled positions, where the model uses torch's SDPA): tested against the model's forward
within float tolerance, and token for token against `sample_completions`' model path.

Supported: the text family's Qwen3 decoder layers (full attention, SiLU MLP), with `nn.Linear` or
`LowRankLinear` projections (SVD-compressed blocks run their two factors). Anything else raises a
ValueError that names it. The decoder snapshots the fused weights when it is built: build one per
rollout (a training step changes the weights).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb

from ruyi_model.modeling import FamilialForCausalLM, LowRankLinear


class _Projection:
    """One or more projections of the same input, run as one matmul when they are all dense."""

    def __init__(self, modules: list[nn.Module], where: str):
        for m in modules:
            if not isinstance(m, (nn.Linear, LowRankLinear)):
                raise ValueError(
                    f"{where}: {type(m).__name__} projections are not supported by the static decoder"
                )
        self.sizes = [m.out_features for m in modules]
        self.modules = modules
        dense = all(isinstance(m, nn.Linear) for m in modules)
        biases = [m.bias for m in modules] if dense else []
        if dense and (all(b is None for b in biases) or all(b is not None for b in biases)):
            with torch.no_grad():
                self.weight = (
                    torch.cat([m.weight for m in modules], 0) if len(modules) > 1 else modules[0].weight
                )
                self.bias = None if biases[0] is None else torch.cat(biases, 0)
        else:
            self.weight = self.bias = None

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.weight is not None:
            y = F.linear(x, self.weight, self.bias)
            return list(y.split(self.sizes, -1)) if len(self.sizes) > 1 else [y]
        return [m(x) for m in self.modules]


class _Layer:
    def __init__(self, layer: nn.Module, where: str):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        needed = ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")
        if attn is None or mlp is None or not all(hasattr(attn, a) for a in needed):
            raise ValueError(f"{where}: {type(layer).__name__} is not a Qwen3 decoder layer")
        if getattr(attn, "sliding_window", None) is not None:
            raise ValueError(f"{where}: sliding-window attention is not supported by the static decoder")
        self.slot = attn.layer_idx
        self.scaling = attn.scaling
        self.head_dim = attn.head_dim
        self.ln1, self.ln2 = layer.input_layernorm, layer.post_attention_layernorm
        self.q_norm, self.k_norm = attn.q_norm, attn.k_norm
        self.qkv = _Projection([attn.q_proj, attn.k_proj, attn.v_proj], where)
        self.o = _Projection([attn.o_proj], where)
        self.gate_up = _Projection([mlp.gate_proj, mlp.up_proj], where)
        self.down = _Projection([mlp.down_proj], where)


class StaticMemberDecoder:
    """Decodes one token per row and step for member `exit_layer`, continuing a prefilled cache.

    Args:
        model: the family (eval mode; no gradients are taken).
        exit_layer: the member that filled `cache`.
        cache: the `DynamicCache` of the member's prefill, N rows x P positions (left padding allowed).
        prefill_mask: N x P, 1 for real tokens, 0 for padding (the prefill's attention mask).
        capacity: the most positions a row will hold (P + the most new tokens).
    """

    def __init__(
        self,
        model: FamilialForCausalLM,
        exit_layer: int,
        cache,
        prefill_mask: torch.Tensor,
        capacity: int,
    ):
        if not isinstance(model, FamilialForCausalLM):
            raise ValueError(
                f"the static decoder runs a FamilialForCausalLM member, got {type(model).__name__}"
            )
        cfg = model.config
        d = cfg.check_exit(exit_layer)
        if cfg.hidden_act != "silu":
            raise ValueError(
                f"the static decoder supports hidden_act 'silu', the model has {cfg.hidden_act!r}"
            )
        self.layers = [
            _Layer(layer, f"member {d} layer {i}") for i, layer in enumerate(model.member_layers(d))
        ]
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        branch = model.exits[str(d)]
        self.norm = branch.norm
        self.head = model.exit_head(d)
        self.embed = model.model.embed_tokens
        self.rotary = model.model.rotary_emb
        n, p = prefill_mask.shape
        if capacity < p:
            raise ValueError(f"capacity {capacity} is below the prefill's {p} positions")
        self.keys, self.values = [], []
        for layer in self.layers:
            entry = cache.layers[layer.slot]
            k, v = entry.keys, entry.values
            if k is None or k.shape[0] != n or k.shape[2] != p:
                got = None if k is None else tuple(k.shape)
                raise ValueError(
                    f"cache slot {layer.slot} holds {got}; expected {n} rows x {p} positions from the "
                    f"prefill of member {d}"
                )
            buf_k = k.new_zeros(n, k.shape[1], capacity, k.shape[3])
            buf_v = v.new_zeros(n, v.shape[1], capacity, v.shape[3])
            buf_k[:, :, :p] = k
            buf_v[:, :, :p] = v
            self.keys.append(buf_k)
            self.values.append(buf_v)
        self.valid = torch.ones(n, capacity, dtype=torch.bool, device=prefill_mask.device)
        self.valid[:, :p] = prefill_mask.bool()
        self.length = p
        self.capacity = capacity

    @property
    def rows(self) -> int:
        return self.valid.shape[0]

    def select_rows(self, index: torch.Tensor) -> None:
        """Keeps only the rows `index` (positions into the current rows), as the cache's
        `batch_select_indices`."""
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]
        self.valid = self.valid.index_select(0, index)

    @torch.no_grad()
    def step(self, token_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Appends one token per row; returns the member's next-token logits (rows x V).

        Args:
            token_ids: (rows,) the tokens to append.
            position_ids: (rows, 1) their rotary positions.
        """
        n, t = token_ids.shape[0], self.length
        if n != self.rows:
            raise ValueError(f"{n} tokens for {self.rows} rows")
        if t >= self.capacity:
            raise ValueError(f"the decoder is full ({self.capacity} positions)")
        x = self.embed(token_ids[:, None])  # n x 1 x D
        cos, sin = self.rotary(x, position_ids)  # n x 1 x hd
        h, kv = self.heads, self.kv_heads
        masked = ~self.valid[:, None, None, : t + 1]
        for i, layer in enumerate(self.layers):
            hd = layer.head_dim
            q, k, v = layer.qkv(layer.ln1(x))
            q = layer.q_norm(q.view(n, 1, h, hd)).transpose(1, 2)
            k = layer.k_norm(k.view(n, 1, kv, hd)).transpose(1, 2)
            v = v.view(n, 1, kv, hd).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            self.keys[i][:, :, t : t + 1] = k
            self.values[i][:, :, t : t + 1] = v
            # grouped-query attention: the h // kv query heads of a group read one K/V head
            scores = torch.matmul(
                q.reshape(n, kv, h // kv, hd), self.keys[i][:, :, : t + 1].transpose(-1, -2)
            )
            scores = (scores * layer.scaling).masked_fill(masked, float("-inf"))
            low = scores.dtype in (torch.float16, torch.bfloat16)  # softmax in float32 at least
            probs = torch.softmax(scores.float() if low else scores, -1).to(v.dtype)
            attn = torch.matmul(probs, self.values[i][:, :, : t + 1]).reshape(n, 1, h * hd)
            x = x + layer.o(attn)[0]
            gate, up = layer.gate_up(layer.ln2(x))
            x = x + layer.down(F.silu(gate) * up)[0]
        self.length = t + 1
        return self.head(self.norm(x))[:, -1]
