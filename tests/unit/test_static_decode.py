"""The static decoder (ruyi_model/static_decode.py) against the family's own forward with its
DynamicCache, step by step: every member, DaE blocks, GQA / MQA / MHA, left padding, dropped rows,
low-rank (SVD-compressed) projections and heads, shared heads; and what it refuses."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicCache

from ruyi_model import FamilialConfig, FamilialForCausalLM
from ruyi_model.static_decode import StaticMemberDecoder
from tests.unit.test_modeling import VOCAB, qwen3_fields


def _family(exits, dae=None, shared=False, lowrank=None, seed=0, **shape) -> FamilialForCausalLM:
    torch.manual_seed(seed)
    cfg = FamilialConfig(
        **qwen3_fields(**shape),
        exit_layers=exits,
        dae_blocks=dae or [0] * len(exits),
        shared_heads=shared,
        lowrank_ranks=lowrank or {},
    )
    fam = FamilialForCausalLM(cfg).eval()
    with torch.no_grad():  # DaE blocks start as the identity: give them (and everything) weights that matter
        for name, p in fam.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.3)
    return fam


def _padded_batch(n: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (n, width), generator=g)
    mask = torch.ones(n, width, dtype=torch.long)
    for row in range(n):
        pad = row % 3  # rows with 0, 1 and 2 left pads
        ids[row, :pad], mask[row, :pad] = 0, 0
    return ids, mask


def _compare(fam, d, steps=6, n=5, width=7, drop_at=3, seed=0):
    """Decodes `steps` tokens at member d both ways (drawing the next token from the model's own
    logits); at step `drop_at` two rows leave the batch. Returns the largest logit difference."""
    ids, mask = _padded_batch(n, width, seed)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        cache = DynamicCache()
        out = fam(
            input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, exit_layer=d
        )
        decoder = StaticMemberDecoder(fam, d, cache, mask, capacity=width + steps)
        ref_cache = DynamicCache()
        fam(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=ref_cache,
            exit_layer=d,
        )
        logits = out.logits[:, -1]
        attn, pos = mask.clone(), positions[:, -1:] + 1
        worst = 0.0
        for step in range(steps):
            if step == drop_at:
                keep = torch.tensor([0, 2, 4][: max(1, logits.shape[0] - 2)])
                decoder.select_rows(keep)
                for layer in ref_cache.layers:
                    layer.batch_select_indices(keep)
                attn, pos, logits = attn[keep], pos[keep], logits[keep]
            tok = logits.argmax(-1)
            attn = torch.cat([attn, torch.ones(attn.shape[0], 1, dtype=attn.dtype)], 1)
            ref = fam(
                input_ids=tok[:, None],
                attention_mask=attn,
                position_ids=pos,
                past_key_values=ref_cache,
                exit_layer=d,
            ).logits[:, -1]
            got = decoder.step(tok, pos)
            assert got.shape == ref.shape
            worst = max(worst, float((got - ref).abs().max()))
            logits, pos = ref, pos + 1
    return worst


SHAPES = [
    # (exits, DaE blocks, shared heads, low-rank modules, shape)
    ([1, 3, 5], [2, 0, 0], False, None, {}),  # the tiny default's form: DaE blocks on the smallest member
    ([2, 5], [0, 1], True, None, {"heads": 6, "kv": 3, "hidden": 48}),  # shared head, GQA 2:1
    ([1, 4], [1, 0], False, None, {"num_layers": 4, "heads": 4, "kv": 4}),  # MHA
    ([1, 6], [0, 0], False, None, {"num_layers": 6, "heads": 4, "kv": 1}),  # MQA
    (
        [1, 3, 5],
        [2, 0, 0],
        False,
        {  # what compress leaves: factored block projections and head
            "exits.1.layers.1.self_attn.q_proj": 3,
            "exits.1.layers.1.mlp.down_proj": 4,
            "exits.1.layers.2.mlp.gate_proj": 5,
            "exits.1.lm_head": 6,
        },
        {},
    ),
]


@pytest.mark.parametrize("exits,dae,shared,lowrank,shape", SHAPES)
def test_every_member_decodes_as_the_model_with_its_dynamic_cache(exits, dae, shared, lowrank, shape):
    fam = _family(exits, dae, shared, lowrank, **shape)
    for d in exits:
        assert _compare(fam, d) < 1e-4, d


def test_float64_agrees_to_rounding():
    """In float64 the two paths agree to 1e-12: what differs is rounding, not arithmetic."""
    fam = _family([1, 3, 5], [2, 0, 0]).double()
    for d in (1, 5):
        assert _compare(fam, d) < 1e-10, d


def test_refusals_name_what_is_wrong():
    fam = _family([1, 3, 5], [2, 0, 0])
    ids, mask = _padded_batch(2, 4, 0)
    cache = DynamicCache()
    with torch.no_grad():
        fam(input_ids=ids, attention_mask=mask, past_key_values=cache, exit_layer=1)
    with pytest.raises(ValueError, match="capacity 3 is below the prefill's 4 positions"):
        StaticMemberDecoder(fam, 1, cache, mask, capacity=3)
    with pytest.raises(
        ValueError, match="cache slot .* expected 2 rows x 4 positions from the prefill of member 3"
    ):
        StaticMemberDecoder(fam, 3, cache, mask, capacity=8)  # member 3 never filled its slots
    with pytest.raises(ValueError, match="not an exit|exit_layer"):
        StaticMemberDecoder(fam, 2, cache, mask, capacity=8)
    decoder = StaticMemberDecoder(fam, 1, cache, mask, capacity=5)
    with pytest.raises(ValueError, match="3 tokens for 2 rows"):
        decoder.step(torch.tensor([3, 4, 5]), torch.tensor([[4], [4], [4]]))
    decoder.step(torch.tensor([3, 4]), torch.tensor([[4], [4]]))
    with pytest.raises(ValueError, match="the decoder is full \\(5 positions\\)"):
        decoder.step(torch.tensor([3, 4]), torch.tensor([[5], [5]]))

    fam.member_layers(1)[
        0
    ].self_attn.sliding_window = 4  # the family refuses such configs; a layer could carry one
    with pytest.raises(ValueError, match="member 1 layer 0: sliding-window attention is not supported"):
        StaticMemberDecoder(fam, 1, cache, mask, capacity=8)

    from transformers import Qwen3Config, Qwen3ForCausalLM

    stock = Qwen3ForCausalLM(Qwen3Config(**qwen3_fields())).eval()
    with pytest.raises(ValueError, match="runs a FamilialForCausalLM member, got Qwen3ForCausalLM"):
        StaticMemberDecoder(stock, 1, cache, mask, capacity=8)
