"""FamilialForCausalLM against stock transformers Qwen3 as the oracle.

Every member of depth d must equal a stock Qwen3ForCausalLM of d layers built from the member's
weights (backbone layers, branch layer, exit norm, exit head); generation with the member's own KV
cache must equal no-cache decoding; save/load, Auto classes and from_qwen3 round trip exactly.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, Qwen3Config, Qwen3ForCausalLM
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer

from ruyi_model import FamilialConfig, FamilialForCausalLM
from ruyi_model.modeling import LowRankLinear

VOCAB = 97


def qwen3_fields(num_layers=5, heads=4, kv=2, hidden=32, head_dim=8):
    return dict(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden + 3,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )


def member_as_stock_qwen3(fam: FamilialForCausalLM, d: int) -> Qwen3ForCausalLM:
    """The oracle: a stock Qwen3ForCausalLM assembled by hand from member d's weights."""
    cfg = fam.config
    layers = fam.member_layers(d)
    q = Qwen3ForCausalLM(
        Qwen3Config(
            **{
                **qwen3_fields(),
                "vocab_size": cfg.vocab_size,
                "hidden_size": cfg.hidden_size,
                "intermediate_size": cfg.intermediate_size,
                "num_attention_heads": cfg.num_attention_heads,
                "num_key_value_heads": cfg.num_key_value_heads,
                "head_dim": cfg.head_dim,
                "num_hidden_layers": len(layers),
            }
        )
    ).eval()
    sd = {
        "model.embed_tokens.weight": fam.model.embed_tokens.weight,
        "model.norm.weight": fam.exits[str(d)].norm.weight,
        "lm_head.weight": fam.exit_head(d).weight,
    }
    for i, layer in enumerate(layers):
        for k, v in layer.state_dict().items():
            sd[f"model.layers.{i}.{k}"] = v
    q.load_state_dict(sd, strict=True)
    return q


def make_family(exits, branch=1, shared=False, seed=0, **kw) -> FamilialForCausalLM:
    torch.manual_seed(seed)
    fields = qwen3_fields(**kw)
    cfg = FamilialConfig(**fields, exit_layers=exits, exit_branch_layers=branch, shared_heads=shared)
    return FamilialForCausalLM(cfg).eval()


SHAPES = [
    # (exits, branch layers, shared heads, shape kwargs)
    ([1, 3, 5], 1, False, {}),
    ([2, 5], 0, False, {}),
    ([1, 2, 3, 4, 5], 1, True, {}),
    ([3, 7], 1, False, {"num_layers": 7, "heads": 6, "kv": 3, "hidden": 48}),  # odd layer count, GQA 2:1
    ([4], 1, False, {"num_layers": 4, "heads": 4, "kv": 4}),  # MHA, single member
    ([1, 6], 0, True, {"num_layers": 6, "heads": 4, "kv": 1}),  # MQA, exit at 1 with no branch
]


@pytest.mark.parametrize("exits,branch,shared,shape", SHAPES)
def test_every_member_equals_stock_qwen3(exits, branch, shared, shape):
    fam = make_family(exits, branch, shared, **shape)
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        for d in exits:
            ref = member_as_stock_qwen3(fam, d)(ids).logits
            got = fam(ids, exit_layer=d).logits
            assert got.shape == ref.shape
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        # default = deepest member, so HF tools work unchanged
        torch.testing.assert_close(fam(ids).logits, fam(ids, exit_layer=exits[-1]).logits, atol=0, rtol=0)


def test_member_cost_is_proportional_to_depth():
    fam = make_family([1, 3, 5])
    calls = []
    for i, layer in enumerate(fam.model.layers):
        layer.register_forward_hook(lambda *a, i=i: calls.append(("backbone", i)))
    for d in (1, 3, 5):
        for j, layer in enumerate(fam.exits[str(d)].layers):
            layer.register_forward_hook(lambda *a, d=d, j=j: calls.append((d, j)))
    with torch.no_grad():
        fam(torch.randint(0, VOCAB, (1, 4)), exit_layer=3)
    assert calls == [("backbone", 0), ("backbone", 1), (3, 0)]
    calls.clear()
    with torch.no_grad():
        fam(torch.randint(0, VOCAB, (1, 4)), exit_layer=1)
    assert calls == [(1, 0)]


def test_from_qwen3_deepest_equals_source_and_branches_copy_next_layer(tmp_path):
    torch.manual_seed(1)
    src = Qwen3ForCausalLM(Qwen3Config(**qwen3_fields(num_layers=6))).eval()
    src.save_pretrained(tmp_path / "qwen3")
    fam = FamilialForCausalLM.from_qwen3(tmp_path / "qwen3", exit_layers=[2, 4, 6]).eval()
    ids = torch.randint(0, VOCAB, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(fam(ids).logits, src(ids).logits, atol=0, rtol=0)
        # Ruyi2: member d's branch layer is initialised from backbone layer d (1-indexed), so right after
        # from_qwen3 member d equals the source truncated to d layers with the final norm and head.
        for d in (2, 4):
            truncated = member_as_stock_qwen3(fam, d)
            for k, v in truncated.model.layers.state_dict().items():
                torch.testing.assert_close(v, src.model.layers.state_dict()[k], atol=0, rtol=0)
            torch.testing.assert_close(
                fam(ids, exit_layer=d).logits, truncated(ids).logits, atol=1e-5, rtol=1e-5
            )
    # the copies are independent parameters, not aliases
    assert (
        fam.exits["2"].layers[0].mlp.up_proj.weight.data_ptr()
        != fam.model.layers[1].mlp.up_proj.weight.data_ptr()
    )


def test_from_qwen3_unties_a_tied_source():
    torch.manual_seed(2)
    src = Qwen3ForCausalLM(Qwen3Config(**qwen3_fields(num_layers=3), tie_word_embeddings=True)).eval()
    fam = FamilialForCausalLM.from_qwen3(src, exit_layers=[1, 3])
    assert fam.config.tie_word_embeddings is False
    ids = torch.randint(0, VOCAB, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(fam(ids).logits, src(ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize("exits,branch,shared", [([1, 3, 5], 1, False), ([2, 5], 0, True)])
def test_save_load_round_trip_and_auto_classes(tmp_path, exits, branch, shared):
    fam = make_family(exits, branch, shared)
    fam.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "ruyi_familial"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, FamilialForCausalLM)
    ids = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        for d in exits:
            torch.testing.assert_close(
                loaded(ids, exit_layer=d).logits, fam(ids, exit_layer=d).logits, atol=0, rtol=0
            )


def test_lowrank_structure_survives_save_load(tmp_path):
    torch.manual_seed(3)
    cfg = FamilialConfig(
        **qwen3_fields(),
        exit_layers=[2, 5],
        lowrank_ranks={"exits.2.layers.0.mlp.down_proj": 3, "exits.2.lm_head": 4},
    )
    fam = FamilialForCausalLM(cfg).eval()
    assert isinstance(fam.exits["2"].lm_head, LowRankLinear) and fam.exits["2"].lm_head.rank == 4
    fam.save_pretrained(tmp_path)
    loaded = FamilialForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, VOCAB, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(ids, exit_layer=2).logits, fam(ids, exit_layer=2).logits, atol=0, rtol=0
        )


def test_checkpoint_with_missing_or_extra_tensors_is_an_error(tmp_path):
    from safetensors.torch import load_file, save_file

    fam = make_family([1, 3, 5])
    fam.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    missing = dict(sd)
    del missing["exits.3.norm.weight"]
    save_file(missing, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing_keys.*exits\.3\.norm\.weight"):
        FamilialForCausalLM.from_pretrained(tmp_path)
    extra = dict(sd, **{"exits.9.norm.weight": torch.ones(32)})
    save_file(extra, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"unexpected_keys.*exits\.9\.norm\.weight"):
        FamilialForCausalLM.from_pretrained(tmp_path)
    bad_shape = dict(sd, **{"exits.3.norm.weight": torch.ones(31)})
    save_file(bad_shape, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises((ValueError, RuntimeError), match="norm"):
        FamilialForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("exits,branch", [([1, 3, 5], 1), ([2, 5], 0)])
def test_generate_with_member_cache_equals_no_cache(exits, branch):
    fam = make_family(exits, branch)
    ids = torch.randint(1, VOCAB, (2, 7))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding: the mask must be sized from the member's own cache slot
    for d in exits:
        with torch.no_grad():
            cached = fam.generate(
                ids, attention_mask=mask, max_new_tokens=6, do_sample=False, exit_layer=d, pad_token_id=0
            )
            plain = fam.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=6,
                do_sample=False,
                exit_layer=d,
                use_cache=False,
                pad_token_id=0,
            )
        assert torch.equal(cached, plain), f"member {d}"


def test_generate_at_member_equals_stock_generate():
    fam = make_family([2, 5])
    ids = torch.randint(1, VOCAB, (1, 5))
    with torch.no_grad():
        ours = fam.generate(ids, max_new_tokens=8, do_sample=False, exit_layer=2, pad_token_id=0)
        ref = member_as_stock_qwen3(fam, 2).generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, ref)


def test_member_cache_touches_only_its_own_slots():
    fam = make_family([1, 3, 5])
    cache = DynamicCache()
    with torch.no_grad():
        fam(torch.randint(0, VOCAB, (1, 4)), exit_layer=3, past_key_values=cache, use_cache=True)
    filled = [i for i, layer in enumerate(cache.layers) if layer.get_seq_length() > 0]
    slots = [layer.self_attn.layer_idx for layer in fam.member_layers(3)]
    assert filled == slots == [0, 1, 6]


def test_cache_of_one_member_cannot_be_reused_by_another():
    fam = make_family([1, 3, 5])
    cache = DynamicCache()
    with torch.no_grad():
        fam(torch.randint(0, VOCAB, (1, 4)), exit_layer=3, past_key_values=cache, use_cache=True)
        with pytest.raises(ValueError, match="filled by member exit_layer=3"):
            fam(torch.randint(0, VOCAB, (1, 1)), exit_layer=5, past_key_values=cache, use_cache=True)


def test_exit_layer_that_is_not_an_exit_is_an_error():
    fam = make_family([1, 3, 5])
    with pytest.raises(ValueError, match=r"exit_layer=2 is not an exit.*\[1, 3, 5\]"):
        fam(torch.randint(0, VOCAB, (1, 4)), exit_layer=2)
    with pytest.raises(ValueError, match="not an exit"):
        fam.generate(torch.randint(0, VOCAB, (1, 4)), max_new_tokens=2, exit_layer=4)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("exit_layers", [3, 2, 5], "strictly increasing"),
        ("exit_layers", [2, 4], "last must equal"),
        ("exit_layers", [0, 5], r"1\.\.5"),
        ("exit_layers", [], "at least one exit"),
        ("exit_layers", [2.5, 5], "list of integers"),  # was silently truncated to [2, 5]
        ("exit_layers", [1.0, 3, 5], "list of integers"),  # an integral float is still a float
        ("exit_layers", [True, 3, 5], "list of integers"),  # bool is an int subclass in Python
        ("exit_layers", "1,3,5", "list of integers"),
        ("exit_branch_layers", -1, ">= 0"),
        ("exit_branch_layers", 2, "member of depth 1 cannot own 2 branch layers"),
        ("exit_branch_layers", 1.5, "must be an integer"),
        ("exit_branch_layers", True, "must be an integer"),
        ("shared_heads", "yes", "must be a bool"),
        ("shared_heads", 1, "must be a bool"),
        ("exit_loss_weights", [1.0, 2.0], "one weight per exit"),
        ("exit_loss_weights", [1.0, -0.5, 1.0], "finite and >= 0"),
        ("exit_loss_weights", [1.0, float("nan"), 1.0], "finite and >= 0"),
        ("exit_loss_weights", [1.0, True, 1.0], "list of numbers"),
        ("exit_loss_weights", ["1", 1.0, 1.0], "list of numbers"),
        ("dae_blocks", [0, -1, 0], "one count >= 0"),
        ("dae_blocks", [0, 1.5, 0], "list of integers"),
        ("lowrank_ranks", {"exits.1.lm_head": 0}, "ranks must be >= 1"),
        ("lowrank_ranks", {"exits.1.lm_head": 2.5}, "integer ranks"),
        ("lowrank_ranks", {"exits.1.lm_head": True}, "integer ranks"),
        ("loss_impl", "fast", "must be one of"),
        ("loss_impl", 3, "must be one of"),
        ("tie_word_embeddings", True, "untied"),
        ("use_sliding_window", True, "not supported"),
    ],
)
def test_bad_config_names_the_field(field, value, match):
    kwargs = dict(qwen3_fields(), exit_layers=[1, 3, 5])
    kwargs[field] = value
    with pytest.raises(ValueError, match=rf"FamilialConfig\.{field}={re.escape(repr(value))}: .*{match}"):
        FamilialConfig(**kwargs)


def test_valid_config_values_keep_their_meaning_and_canonical_types():
    # numpy integers and tuples are integers and sequences; int weights are numbers. Stored as plain JSON
    # types.
    cfg = FamilialConfig(
        **qwen3_fields(),
        exit_layers=(np.int64(2), 5),
        exit_branch_layers=np.int32(1),
        exit_loss_weights=[1, 2],
        dae_blocks=[np.int64(1), 0],
    )
    assert cfg.exit_layers == [2, 5] and all(type(d) is int for d in cfg.exit_layers)
    assert type(cfg.exit_branch_layers) is int and cfg.dae_blocks == [1, 0]
    assert cfg.exit_loss_weights == [1.0, 2.0] and all(type(w) is float for w in cfg.exit_loss_weights)
    json.dumps(cfg.to_dict())


def test_config_json_of_an_earlier_version_still_loads(tmp_path):
    # Earlier versions stored whatever was passed, e.g. JSON ints for the loss weights.
    fam = make_family([1, 3, 5])
    fam.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw.update(
        exit_layers=[1, 3, 5],
        exit_branch_layers=1,
        shared_heads=False,
        exit_loss_weights=[1, 2, 1],
        dae_blocks=[0, 0, 0],
        lowrank_ranks={},
    )
    (tmp_path / "config.json").write_text(json.dumps(raw))
    cfg = FamilialConfig.from_pretrained(tmp_path)
    assert (cfg.exit_layers, cfg.exit_loss_weights) == ([1, 3, 5], [1.0, 2.0, 1.0])
    loaded = FamilialForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, VOCAB, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(ids, exit_layer=3).logits, fam(ids, exit_layer=3).logits, atol=0, rtol=0
        )


def test_shared_low_rank_head_is_rejected_and_per_member_low_rank_heads_train():
    # decompose(include_head=True) refuses shared heads (the shared head is every member's head); a config
    # asking for it is refused too, instead of crashing in the multi-exit loss.
    with pytest.raises(
        ValueError, match=r"FamilialConfig\.lowrank_ranks=\{'lm_head': 4\}: .*shared_heads=True"
    ):
        FamilialConfig(**qwen3_fields(), exit_layers=[2, 5], shared_heads=True, lowrank_ranks={"lm_head": 4})
    torch.manual_seed(4)
    cfg = FamilialConfig(**qwen3_fields(), exit_layers=[2, 5], lowrank_ranks={"exits.2.lm_head": 4})
    fam = FamilialForCausalLM(cfg).eval()
    ids = torch.randint(0, VOCAB, (2, 7))
    out = fam(ids, labels=ids)
    ref = naive_member_losses(fam, ids, ids)
    torch.testing.assert_close(out.loss, ref[2] + ref[5], atol=1e-5, rtol=1e-5)


def test_lowrank_path_that_is_not_a_module_is_an_error():
    with pytest.raises(ValueError, match="exits.4.lm_head"):
        FamilialForCausalLM(
            FamilialConfig(**qwen3_fields(), exit_layers=[1, 5], lowrank_ranks={"exits.4.lm_head": 2})
        )


def naive_member_losses(fam, ids, labels):
    return {d: fam(ids, exit_layer=d, labels=labels).loss for d in fam.config.exit_layers}


@pytest.mark.parametrize("impl", ["naive", "chunked"])
@pytest.mark.parametrize("exits,branch,shared", [([1, 3, 5], 1, False), ([2, 5], 0, True)])
def test_multi_exit_loss_is_weighted_sum_of_member_losses(impl, exits, branch, shared):
    fam = make_family(exits, branch, shared)
    fam.config.loss_impl = impl
    ids = torch.randint(0, VOCAB, (2, 9))
    labels = ids.clone()
    labels[0, :3] = -100
    weights = [0.5 + k for k in range(len(exits))]
    out = fam(ids, labels=labels, exit_loss_weights=weights)
    assert out.logits is None
    ref = naive_member_losses(fam, ids, labels)
    for d in exits:
        torch.testing.assert_close(out.exit_losses[d], ref[d].detach(), atol=1e-5, rtol=1e-5)
    expected = sum(w * ref[d] for w, d in zip(weights, exits))
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)

    # gradients equal the naive sum's gradients on every parameter
    out.loss.backward()
    got = {n: p.grad.clone() for n, p in fam.named_parameters() if p.grad is not None}
    fam.zero_grad()
    expected.backward()
    for n, p in fam.named_parameters():
        if p.grad is None:
            assert n not in got
            continue
        torch.testing.assert_close(got[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)


def test_multi_exit_loss_uses_config_weights_and_reaches_only_used_layers():
    fam = make_family([1, 3, 5])
    fam.config.exit_loss_weights = [0.0, 0.0, 1.0]
    ids = torch.randint(0, VOCAB, (1, 6))
    out = fam(ids, labels=ids)
    torch.testing.assert_close(out.loss, fam(ids, exit_layer=5, labels=ids).loss, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_matches_plain_backward():
    fam = make_family([2, 5]).train()
    ids = torch.randint(0, VOCAB, (2, 6))
    fam(ids, labels=ids).loss.backward()
    plain = {n: p.grad.clone() for n, p in fam.named_parameters() if p.grad is not None}
    fam.zero_grad()
    fam.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    fam(ids, labels=ids).loss.backward()
    for n, p in fam.named_parameters():
        if n in plain:
            torch.testing.assert_close(p.grad, plain[n], atol=1e-6, rtol=1e-5, msg=n)


@pytest.mark.parametrize("mask_shape", [(2, 5), (2, 7), (1, 6), (3, 6)])
def test_attention_mask_of_another_shape_is_an_error(mask_shape):
    # Stock Qwen3 silently slices or broadcasts most of these; a wrong mask must not run.
    fam = make_family([1, 3, 5])
    ids = torch.randint(0, VOCAB, (2, 6))
    mask = torch.ones(mask_shape, dtype=torch.long)
    want = re.escape(f"attention_mask has shape {mask_shape} but input_ids has shape (2, 6)")
    for kwargs in ({}, {"exit_layer": 1}, {"labels": ids}):  # deepest, a member, multi-exit training
        with pytest.raises(ValueError, match=want):
            fam(ids, attention_mask=mask, **kwargs)


def test_attention_mask_with_a_cache_covers_past_and_current_tokens():
    fam = make_family([1, 3, 5])
    ids = torch.randint(1, VOCAB, (2, 6))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    for d in (1, 5):  # member 1 never fills slot 0: its past length comes from its own cache slot
        with torch.no_grad():
            cache = DynamicCache()
            fam(ids[:, :5], attention_mask=mask[:, :5], exit_layer=d, past_key_values=cache, use_cache=True)
            with pytest.raises(
                ValueError, match=re.escape("(2, 1) but input_ids has shape (2, 1) plus 5 cached")
            ):
                fam(
                    ids[:, 5:],
                    attention_mask=mask[:, 5:],
                    exit_layer=d,
                    past_key_values=cache,
                    use_cache=True,
                )
            step = fam(
                ids[:, 5:], attention_mask=mask, exit_layer=d, past_key_values=cache, use_cache=True
            ).logits
            full = fam(ids, attention_mask=mask, exit_layer=d, use_cache=False).logits
        torch.testing.assert_close(step[:, -1], full[:, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("labels_shape", [(2, 5), (1, 6), (2, 7)])
def test_labels_of_another_shape_are_an_error(labels_shape):
    fam = make_family([1, 3, 5])
    ids = torch.randint(0, VOCAB, (2, 6))
    labels = torch.zeros(labels_shape, dtype=torch.long)
    want = re.escape(f"labels has shape {labels_shape} but input_ids has shape (2, 6)")
    for kwargs in ({}, {"exit_layer": 3}):  # multi-exit training, one member
        with pytest.raises(ValueError, match=want):
            fam(ids, labels=labels, **kwargs)


@pytest.mark.parametrize("bad", [2.9, 3.0, True, torch.tensor(3.0), torch.tensor([3])])
def test_exit_layer_must_be_an_integer(bad):
    # int() would truncate 2.9 or 3.0 and turn True into member 1: another member would run silently.
    fam = make_family([1, 3, 5])
    with pytest.raises(ValueError, match=r"exit_layer=.* must be an integer"):
        fam(torch.randint(0, VOCAB, (1, 4)), exit_layer=bad)


@pytest.mark.parametrize("good", [np.int64(3), torch.tensor(3)])
def test_exit_layer_accepts_numpy_and_torch_integers(good):
    fam = make_family([1, 3, 5])
    ids = torch.randint(0, VOCAB, (1, 4))
    with torch.no_grad():
        out = fam(ids, exit_layer=good)
        assert out.exit_layer == 3 and type(out.exit_layer) is int
        torch.testing.assert_close(out.logits, fam(ids, exit_layer=3).logits, atol=0, rtol=0)


@pytest.mark.parametrize("make_source", ["from_pretrained", "to_bf16"])
@pytest.mark.parametrize("branch,shared", [(1, False), (1, True), (0, False), (0, True)])
def test_from_qwen3_bf16_source_deepest_member_equals_it_exactly(tmp_path, make_source, branch, shared):
    torch.manual_seed(5)
    src = Qwen3ForCausalLM(Qwen3Config(**qwen3_fields(num_layers=4)))
    if make_source == "from_pretrained":  # the stock way: bf16 weights, rotary inv_freq kept in fp32
        src.save_pretrained(tmp_path)
        src = Qwen3ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    else:  # .to() casts the rotary buffers as well; the family must then reproduce that source too
        src = src.to(torch.bfloat16)
    src.eval()
    fam = FamilialForCausalLM.from_qwen3(
        src, exit_layers=[2, 4], exit_branch_layers=branch, shared_heads=shared
    ).eval()
    assert fam.dtype == torch.bfloat16
    assert fam.model.rotary_emb.inv_freq.dtype == src.model.rotary_emb.inv_freq.dtype
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        ref = src(ids).logits
        torch.testing.assert_close(
            src(ids).logits, ref, atol=0, rtol=0
        )  # the stock model is exact against itself
        torch.testing.assert_close(fam(ids).logits, ref, atol=0, rtol=0)


@pytest.mark.parametrize(
    "exits,branch,shared,dae", [([1, 3, 5], 1, False, [0, 1, 0]), ([2, 5], 0, True, [0, 0])]
)
def test_multi_exit_loss_is_one_backbone_pass_and_equals_stock_member_losses(exits, branch, shared, dae):
    torch.manual_seed(6)
    cfg = FamilialConfig(
        **qwen3_fields(),
        exit_layers=exits,
        exit_branch_layers=branch,
        shared_heads=shared,
        dae_blocks=dae,
        exit_loss_weights=[0.25 + k for k in range(len(exits))],
    )
    fam = FamilialForCausalLM(cfg).train()
    for d in exits:  # DaE blocks start as identities; give them weights so that they matter
        for layer in list(fam.exits[str(d)].layers)[cfg.branch_layers(d) :]:
            torch.nn.init.normal_(layer.self_attn.o_proj.weight, std=0.02)
            torch.nn.init.normal_(layer.mlp.down_proj.weight, std=0.02)
    calls: dict[str, int] = {}
    for name, module in fam.named_modules():
        if isinstance(module, Qwen3DecoderLayer):
            calls[name] = 0
            module.register_forward_hook(lambda *a, name=name: calls.__setitem__(name, calls[name] + 1))
    ids = torch.randint(0, VOCAB, (2, 8))
    labels = ids.clone()
    labels[1, :3] = -100
    out = fam(ids, labels=labels)
    # every backbone layer and every member's own layer ran exactly once: one pass, branching at each exit
    assert calls == dict.fromkeys(calls, 1), calls
    assert len(calls) == 5 + sum(len(fam.exits[str(d)].layers) for d in exits)
    with torch.no_grad():
        stock = {d: member_as_stock_qwen3(fam, d)(ids, labels=labels).loss for d in exits}
    for d in exits:
        torch.testing.assert_close(out.exit_losses[d], stock[d], atol=1e-5, rtol=1e-5)
    expected = sum(w * stock[d] for w, d in zip(cfg.exit_loss_weights, exits))
    torch.testing.assert_close(out.loss.detach(), expected, atol=1e-5, rtol=1e-5)
