"""Confidence-based dynamic early exit (ruyi_model.generation) against the model's own decoding.

Oracles: `FamilialForCausalLM.generate(..., exit_layer=d, do_sample=False)` (itself tested against
stock Qwen3 in test_modeling.py) for the never/always-trigger equivalences, and full forward passes
of every member for the "recompute" strategy at any threshold (its KV is exact, so each token must be
the argmax of the first member whose full-pass confidence passes) and for its KV cache contents.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache

from ruyi_model import FamilialConfig, FamilialForCausalLM, expand
from ruyi_model.generation import DynamicGenerationOutput, _DynamicDecoder, dynamic_generate
from ruyi_model.modeling import LowRankLinear

VOCAB = 97
PROMPT_LEN = 6
NEW_TOKENS = 10
HEAD_SCALE = 30.0  # random heads give near-uniform softmaxes; scaled heads give varied confidences


def make_family(
    exits, branch=1, shared=False, num_layers=5, seed=0, lowrank=None, dae=None
) -> FamilialForCausalLM:
    """A tiny random family; `dae` = {exit: blocks} adds DaE blocks (made non-identity)."""
    torch.manual_seed(seed)
    cfg = FamilialConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=67,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        exit_layers=exits,
        exit_branch_layers=branch,
        shared_heads=shared,
        lowrank_ranks=lowrank or {},
    )
    model = FamilialForCausalLM(cfg)
    for d, blocks in (dae or {}).items():
        model = expand(model, d, blocks)
    with torch.no_grad():
        for head in {id(model.exit_head(d)): model.exit_head(d) for d in exits}.values():  # shared: once
            (head.weight_b if isinstance(head, LowRankLinear) else head.weight).mul_(HEAD_SCALE)
        for d in exits:
            # DaE blocks start as identities; give them weights so that they matter.
            for layer in model.exits[str(d)].layers[model.config.branch_layers(d) :]:
                layer.self_attn.o_proj.weight.normal_(0, 0.1)
                layer.mlp.down_proj.weight.normal_(0, 0.1)
    return model.eval()


FAMILIES = {
    "ruyi_branch1": dict(exits=[1, 3, 5]),
    "no_branch": dict(exits=[2, 5], branch=0),
    "shared_heads_every_depth": dict(exits=[1, 2, 3, 4, 5], shared=True),
    "dae_blocks": dict(exits=[2, 4, 5], dae={2: 2, 5: 1}),
    "lowrank_head": dict(exits=[2, 5], lowrank={"exits.2.lm_head": 6, "exits.2.layers.0.mlp.down_proj": 5}),
}


@pytest.fixture(scope="module")
def families():
    return {name: make_family(**kw) for name, kw in FAMILIES.items()}


def prompt(seed=1, length=PROMPT_LEN) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def greedy(model, ids, exit_layer, new_tokens=NEW_TOKENS, eos=None) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(
            ids,
            max_new_tokens=new_tokens,
            do_sample=False,
            exit_layer=exit_layer,
            pad_token_id=0,
            eos_token_id=eos,
        )


def full_pass_confidence(model, sequence: torch.Tensor, d: int, start: int):
    """argmax, max prob and entropy of member d at positions [start, len-1) of a full forward pass."""
    with torch.no_grad():
        logits = model(sequence[:, :-1], exit_layer=d).logits[0, start:].float()
    logp = torch.log_softmax(logits, -1)
    return logits.argmax(-1), logp.amax(-1).exp(), -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("kv_fill", ["recompute", "copy"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_never_trigger_equals_deepest_member_greedy(families, name, kv_fill):
    model = families[name]
    ids = prompt()
    out = dynamic_generate(model, ids, NEW_TOKENS, threshold=1.01, kv_fill=kv_fill, eos_token_id=[])
    deepest = model.config.exit_layers[-1]
    assert torch.equal(out.sequences, greedy(model, ids, deepest))
    assert out.exit_layers.tolist() == [[deepest] * NEW_TOKENS]
    assert out.tokens_per_member[deepest] == NEW_TOKENS and sum(out.tokens_per_member.values()) == NEW_TOKENS
    assert out.copied_kv.sum() == 0


@pytest.mark.parametrize("kv_fill", ["recompute", "copy"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_always_trigger_equals_shallowest_member_greedy(families, name, kv_fill):
    model = families[name]
    ids = prompt(seed=2)
    shallowest = model.config.exit_layers[0]
    expected = greedy(model, ids, shallowest)
    for criterion, threshold in (("max_prob", 0.0), ("entropy", math.inf)):
        out = dynamic_generate(
            model, ids, NEW_TOKENS, threshold=threshold, criterion=criterion, kv_fill=kv_fill, eos_token_id=[]
        )
        assert torch.equal(out.sequences, expected), criterion
        assert out.tokens_per_member[shallowest] == NEW_TOKENS
        # Only the shallowest member runs after the first step.
        assert (out.layers_run[0, 1:] == len(model.member_layers(shallowest))).all()


def _pick_threshold(values: torch.Tensor, q: float) -> float:
    """A threshold at quantile q of `values`, halfway between two observed values (never on one)."""
    v = values.sort().values
    i = min(max(1, int(q * len(v))), len(v) - 1)
    return float((v[i - 1] + v[i]) / 2)


@pytest.mark.parametrize("criterion", ["max_prob", "entropy"])
@pytest.mark.parametrize(
    "name", ["ruyi_branch1", "no_branch", "dae_blocks", "lowrank_head", "shared_heads_every_depth"]
)
def test_recompute_equals_full_pass_oracle_at_any_threshold(families, name, criterion):
    """With exact KV, every token is the argmax of the first member whose full-pass confidence passes."""
    model = families[name]
    exits = model.config.exit_layers
    new_tokens = 14
    out, threshold = _mixed_run(
        model, "recompute", criterion=criterion, seed=3, new_tokens=new_tokens, need_deepest=False
    )
    seq = out.sequences
    oracle = {d: full_pass_confidence(model, seq, d, PROMPT_LEN - 1) for d in exits}
    for j in range(new_tokens):
        for d in exits:
            tok, mp, ent = (x[j] for x in oracle[d])
            value = float(mp if criterion == "max_prob" else ent)
            passes = value >= threshold if criterion == "max_prob" else value <= threshold
            if passes or d == exits[-1]:
                break
            assert abs(value - threshold) > 1e-4, "threshold too close to a confidence: pick another one"
        assert abs(value - threshold) > 1e-4 or d == exits[-1]
        assert int(out.exit_layers[0, j]) == d, (
            f"token {j}: emitted by {int(out.exit_layers[0, j])}, oracle {d}"
        )
        assert int(seq[0, PROMPT_LEN + j]) == int(tok), f"token {j}"
        assert out.confidences[0, j].item() == pytest.approx(value, abs=1e-4)


def _mixed_run(
    model, kv_fill, criterion="max_prob", seed=4, new_tokens=14, need_deepest=True
) -> tuple[DynamicGenerationOutput, float]:
    """A decode where several members emit (the only interesting case), and its threshold.

    With `need_deepest`, the deepest member must be among them (so deep layers catch up pending
    positions).

    Thresholds are taken between observed confidences of the shallowest member along the deepest
    member's greedy path, trying quantiles around the median until the decode mixes members.
    """
    exits = model.config.exit_layers
    ids = prompt(seed=seed)
    ref = greedy(model, ids, exits[-1], new_tokens)
    _, max_prob, entropy = full_pass_confidence(model, ref, exits[0], PROMPT_LEN - 1)
    values = max_prob if criterion == "max_prob" else entropy
    for q in (0.5, 0.35, 0.65, 0.2, 0.8, 0.1, 0.9):
        threshold = _pick_threshold(values, q)
        out = dynamic_generate(
            model, ids, new_tokens, threshold=threshold, criterion=criterion, kv_fill=kv_fill, eos_token_id=[]
        )
        used = [d for d, n in out.tokens_per_member.items() if n]
        if len(used) >= 2 and (exits[-1] in used or not need_deepest):
            return out, threshold
    raise AssertionError(f"no threshold mixes early and deep exits: {out.tokens_per_member}")


@pytest.mark.parametrize("name", ["ruyi_branch1", "dae_blocks"])
def test_recompute_kv_equals_full_pass_of_each_member(families, name):
    """After a mixed-exit decode, every slot holds exactly the K/V of a full pass (pending positions
    aside)."""
    model = families[name]
    out, _ = _mixed_run(model, "recompute")
    seq = out.sequences[:, :-1]  # the last emitted token has not been processed yet
    cache = out.past_key_values
    total = seq.shape[1]
    lengths = {}
    for d in model.config.exit_layers:
        with torch.no_grad():
            ref = model(seq, exit_layer=d, past_key_values=DynamicCache(), use_cache=True).past_key_values
        for layer in model.member_layers(d):
            slot = layer.self_attn.layer_idx
            n = cache.layers[slot].get_seq_length()
            lengths[slot] = n
            assert 0 < n <= total
            for got, want in (
                (cache.layers[slot].keys, ref.layers[slot].keys),
                (cache.layers[slot].values, ref.layers[slot].values),
            ):
                torch.testing.assert_close(got, want[:, :, :n], atol=2e-5, rtol=1e-5)
    # The shallowest member's slots saw every position; the deepest backbone layer was caught up past the
    # prompt, and positions that exited early after its last catch-up are still pending there.
    assert all(
        lengths[layer.self_attn.layer_idx] == total
        for layer in model.member_layers(model.config.exit_layers[0])
    )
    last = model.config.num_hidden_layers - 1
    assert PROMPT_LEN < lengths[last] <= total
    trailing_early = 0
    for d in reversed(out.exit_layers[0].tolist()):  # step j processed position PROMPT_LEN - 1 + j
        if d == model.config.exit_layers[-1]:
            break
        trailing_early += 1
    assert lengths[last] == total - trailing_early


@pytest.mark.parametrize("kv_fill", ["recompute", "copy"])
@pytest.mark.parametrize("name", ["ruyi_branch1", "dae_blocks", "no_branch"])
def test_member_attribution_and_costs_are_consistent(families, name, kv_fill):
    model = families[name]
    cfg = model.config
    out, _ = _mixed_run(model, kv_fill)
    n = out.num_new_tokens
    exits = out.exit_layers[0].tolist()
    assert out.sequences.shape == (1, PROMPT_LEN + n)
    assert out.tokens_per_member == {d: exits.count(d) for d in cfg.exit_layers}
    assert sum(out.tokens_per_member.values()) == n
    assert out.seconds > 0 and 0 < out.first_token_seconds <= out.seconds
    own = {d: len(model.exits[str(d)].layers) for d in cfg.exit_layers}
    for j, d in enumerate(exits):
        k = cfg.exit_layers.index(d)
        evaluated = cfg.exit_layers[: k + 1]
        expected_layers = cfg.backbone_depth(d) + sum(own[e] for e in evaluated)
        if kv_fill == "copy" and j == 0:  # the first step prefills every layer of every member
            expected_layers = cfg.num_hidden_layers + sum(own.values())
        assert out.layers_run[0, j] == expected_layers
        assert out.layer_rows[0, j] >= out.layers_run[0, j]
        skipped = (
            cfg.num_hidden_layers - cfg.backbone_depth(d) + sum(own[e] for e in cfg.exit_layers[k + 1 :])
        )
        expected_copied = skipped if kv_fill == "copy" and j > 0 else 0
        assert out.copied_kv[0, j] == expected_copied
    if kv_fill == "copy":
        # Every slot holds every processed position: nothing is ever pending.
        total = out.sequences.shape[1] - 1
        assert all(layer.get_seq_length() == total for layer in out.past_key_values.layers)
        # Steps after the first run only the path of the emitting member.
        assert (out.layer_rows[0, 1:] == out.layers_run[0, 1:]).all()


def test_copy_projection_equals_stock_attention_kv(families):
    """The "copy" K/V of a skipped layer are exactly what the stock Qwen3 layer caches for that input."""
    model = families["dae_blocks"]
    decoder = _DynamicDecoder(model, 0.5, "max_prob", "copy", "auto")
    hidden = torch.randn(1, 1, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    t = 3
    with torch.no_grad():
        for layer in list(model.model.layers) + list(model.exits["2"].layers):
            slot = layer.self_attn.layer_idx
            pad = torch.zeros(1, 2, t, 8)
            decoder.cache.update(pad, pad, slot)  # positions 0..t-1 already there
            decoder._project_kv(layer, hidden, t)
            ref_cache = DynamicCache()
            position_ids = torch.tensor([[t]])
            layer(
                hidden,
                attention_mask=None,
                position_ids=position_ids,
                past_key_values=ref_cache,
                use_cache=True,
                position_embeddings=model.model.rotary_emb(hidden, position_ids),
            )
            torch.testing.assert_close(
                decoder.cache.layers[slot].keys[:, :, t:], ref_cache.layers[slot].keys, atol=0, rtol=0
            )
            torch.testing.assert_close(
                decoder.cache.layers[slot].values[:, :, t:], ref_cache.layers[slot].values, atol=0, rtol=0
            )


@pytest.mark.parametrize("kv_fill", ["recompute", "copy"])
def test_eos_stops_like_generate(families, kv_fill):
    model = families["ruyi_branch1"]
    ids = prompt(seed=5)
    full = greedy(model, ids, 5)
    eos = int(full[0, PROMPT_LEN + 3])
    expected = greedy(model, ids, 5, eos=eos)
    out = dynamic_generate(model, ids, NEW_TOKENS, threshold=2.0, kv_fill=kv_fill, eos_token_id=eos)
    assert torch.equal(out.sequences, expected)
    assert int(out.sequences[0, -1]) == eos and out.num_new_tokens <= 4


def test_left_padding_is_stripped(families):
    model = families["ruyi_branch1"]
    ids = prompt(seed=6)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], dim=1)
    plain = dynamic_generate(model, ids, 6, threshold=0.6, eos_token_id=[])
    out = dynamic_generate(model, padded, 6, threshold=0.6, attention_mask=mask, eos_token_id=[])
    assert torch.equal(out.sequences[:, 3:], plain.sequences)
    assert torch.equal(out.exit_layers, plain.exit_layers)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(threshold=-0.1), "out of range"),
        (dict(threshold=float("nan")), "out of range"),
        (dict(threshold="0.5"), "must be a number"),
        (dict(threshold=0.5, criterion="margin"), "criterion='margin' is unknown"),
        (dict(threshold=0.5, kv_fill="zeros"), "kv_fill='zeros' is unknown"),
        (dict(threshold=0.5, max_new_tokens=0), "max_new_tokens"),
        (dict(threshold=0.5, input_ids=torch.zeros(2, 4, dtype=torch.long)), "batch size 1"),
        (dict(threshold=0.5, input_ids=torch.zeros(4, dtype=torch.long)), "2-D"),
        (dict(threshold=0.5, input_ids=torch.full((1, 4), VOCAB)), "outside the vocabulary"),
        (dict(threshold=0.5, attention_mask=torch.tensor([[1, 1, 0, 1]])), "only left padding"),
        (dict(threshold=0.5, attention_mask=torch.tensor([[1, 1, 1]])), "shape"),
        (dict(threshold=0.5, eos_token_id="eos"), "eos_token_id"),
    ],
)
def test_bad_arguments_raise(families, kwargs, match):
    args = dict(model=families["ruyi_branch1"], input_ids=torch.tensor([[1, 2, 3, 4]]), max_new_tokens=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        dynamic_generate(**args)


def test_not_a_family_raises():
    with pytest.raises(ValueError, match="FamilialForCausalLM"):
        dynamic_generate(torch.nn.Linear(2, 2), torch.tensor([[1]]), 1, threshold=0.5)


def test_pad_left_aligns_every_prompt_on_the_last_column():
    """The one left-padder of evaluate's batched greedy decoding and rl's sampler
    (`tasks.training.rl_algos.encode_chat_prompts`)."""
    from ruyi_model.decoding import pad_left

    ids, mask = pad_left([[5, 6, 7], [8], (9, 10)], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 9, 10]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert ids.dtype == mask.dtype == torch.long
    with pytest.raises(ValueError, match="no rows"):
        pad_left([], pad_id=0)
