"""FamilialVLForConditionalGeneration against stock transformers Qwen3-VL as the oracle.

A tiny random Qwen3-VL (tests/tiny_vl.py, built offline) is the source. The deepest member must equal
it exactly; every member of depth d must equal a stock Qwen3VLForConditionalGeneration of d text
layers assembled by hand from the member's weights (the full vision tower, deepstack included);
the multi-exit loss must equal the weighted sum of those stock losses with every layer run once;
generation with images must equal the stock member's.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, Qwen3VLConfig, Qwen3VLForConditionalGeneration

from ruyi_model import FamilialVLConfig, FamilialVLForConditionalGeneration
from ruyi_model.vl import member_to_qwen3_vl
from tests.tiny_vl import image_batch, tiny_qwen3_vl, tiny_qwen3_vl_config, tiny_vl_processor

LAYOUTS = [
    # (exits, branch layers, shared heads)
    ([1, 2, 4], 1, False),
    ([2, 4], 0, False),
    ([1, 3, 4], 1, True),
    ([2, 3, 4], 2, False),
]


@pytest.fixture(scope="module")
def src():
    return tiny_qwen3_vl(seed=0)


@pytest.fixture(scope="module")
def batch(src):
    # Two prompts, two image sizes (64x48 and 32x32), left padding.
    return image_batch(tiny_vl_processor(src.config))


def family(
    src, exits, branch=1, shared=False, noise=0.02, seed=1, **kw
) -> FamilialVLForConditionalGeneration:
    """A family from `src`; branch layers, exit norms and heads perturbed so that member != trunk."""
    fam = FamilialVLForConditionalGeneration.from_qwen3_vl(
        src, exits, exit_branch_layers=branch, shared_heads=shared, **kw
    ).eval()
    if noise:
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in fam.exits.parameters():
                p.add_(noise * torch.randn_like(p))
    return fam


def stock_member(fam: FamilialVLForConditionalGeneration, d: int) -> Qwen3VLForConditionalGeneration:
    """The oracle: a stock d-text-layer Qwen3-VL assembled by hand from member d's weights, with the
    source's full vision tower (all deepstack mergers and indexes: the stock model itself only uses
    the first d features)."""
    fields = {k: v for k, v in fam.config.to_dict().items() if k in Qwen3VLConfig().to_dict()}
    for k in ("model_type", "architectures", "transformers_version"):
        fields.pop(k, None)
    fields["text_config"] = {**fields["text_config"], "num_hidden_layers": d}
    cfg = Qwen3VLConfig(**fields)
    cfg._attn_implementation = "eager"
    q = Qwen3VLForConditionalGeneration(cfg).eval()
    sd = {f"model.visual.{k}": v for k, v in fam.model.visual.state_dict().items()}
    sd["model.language_model.embed_tokens.weight"] = fam.model.language_model.embed_tokens.weight
    for i, layer in enumerate(fam.member_layers(d)):
        sd.update({f"model.language_model.layers.{i}.{k}": v for k, v in layer.state_dict().items()})
    sd["model.language_model.norm.weight"] = fam.member_norm(d).weight
    sd["lm_head.weight"] = fam.exit_head(d).weight
    q.load_state_dict(sd, strict=True)
    return q


def real(logits, batch):
    """Logits at real (non-pad) positions: fully masked pad rows are implementation-defined."""
    return logits[batch["attention_mask"].bool()]


def masked_labels(batch):
    labels = batch["input_ids"].clone()
    labels[batch["mm_token_type_ids"] == 1] = -100
    labels[batch["attention_mask"] == 0] = -100
    return labels


@torch.no_grad()
def test_deepest_member_equals_source_exactly(src, batch):
    fam = family(src, [1, 2, 4], noise=0.0)
    want = src(**batch).logits
    assert torch.equal(fam(**batch).logits, want)
    assert torch.equal(fam(**batch, exit_layer=4).logits, want)
    # Unperturbed, member d is the source truncated to d text layers (Ruyi2's initialisation).
    for d in (1, 2):
        q = stock_member(fam, d)
        assert torch.equal(
            q.model.language_model.layers[d - 1].mlp.up_proj.weight,
            src.model.language_model.layers[d - 1].mlp.up_proj.weight,
        )
        assert torch.equal(fam(**batch, exit_layer=d).logits, q(**batch).logits)


@pytest.mark.parametrize("exits,branch,shared", LAYOUTS)
@torch.no_grad()
def test_every_member_equals_a_stock_truncated_model(src, batch, exits, branch, shared):
    fam = family(src, exits, branch, shared)
    for d in exits:
        out = fam(**batch, exit_layer=d)
        assert out.exit_layer == d
        assert torch.equal(out.logits, stock_member(fam, d)(**batch).logits), d
        # The export keeps only the deepstack indexes the member receives, and computes the same.
        q = member_to_qwen3_vl(fam, d)
        q.set_attn_implementation("eager")
        assert list(q.config.vision_config.deepstack_visual_indexes) == [0, 1, 2][:d]
        assert len(q.model.visual.deepstack_merger_list) == min(d, 3)
        assert torch.equal(out.logits, q(**batch).logits), d
    # The perturbed exits change the shallow members (the comparison above can fail), not the deepest.
    plain = family(src, exits, branch, shared, noise=0.0)
    for d in exits:
        same = torch.equal(plain(**batch, exit_layer=d).logits, fam(**batch, exit_layer=d).logits)
        assert same == (d == exits[-1] or shared and branch == 0), d


@torch.no_grad()
def test_shallow_member_gets_deepstack_after_its_branch_layer(src, batch):
    """Member 1's only layer is its branch layer: deepstack feature 0 must be added after it (the stock
    1-layer model does), so dropping deepstack changes the member's logits."""
    fam = family(src, [1, 4])
    with_ds = fam(**batch, exit_layer=1).logits
    enc = fam.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"], return_dict=True)
    enc.deepstack_features = []
    inputs = {k: v for k, v in batch.items() if k != "pixel_values"}
    without = fam(**inputs, mm_encoder_outputs={"image": enc}, exit_layer=1).logits
    assert (real(with_ds, batch) - real(without, batch)).abs().max() > 1e-2


@torch.no_grad()
def test_precomputed_vision_features_equal_pixels(src, batch):
    fam = family(src, [1, 2, 4])
    enc = fam.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"], return_dict=True)
    inputs = {k: v for k, v in batch.items() if k != "pixel_values"}
    for d in (1, 4):
        a = fam(**batch, exit_layer=d).logits
        assert torch.equal(fam(**inputs, mm_encoder_outputs={"image": enc}, exit_layer=d).logits, a)
    with pytest.raises(ValueError, match="either the image pixels or mm_encoder_outputs"):
        fam(**batch, mm_encoder_outputs={"image": enc}, exit_layer=1)


@torch.no_grad()
def test_text_only_input_equals_stock(src):
    fam = family(src, [1, 2, 4])
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    for d in (1, 2, 4):
        assert torch.equal(
            fam(input_ids=ids, exit_layer=d).logits, stock_member(fam, d)(input_ids=ids).logits
        )


@pytest.mark.parametrize(
    "impl", ["naive", "chunked", pytest.param("triton", marks=pytest.mark.triton_interpreter)]
)
def test_multi_exit_loss_equals_weighted_stock_losses(src, batch, impl):
    weights = [0.5, 1.0, 2.0]
    fam = family(src, [1, 2, 4], exit_loss_weights=weights, loss_impl=impl)
    labels = masked_labels(batch)
    out = fam(**batch, labels=labels)
    assert out.logits is None and sorted(out.exit_losses) == [1, 2, 4]
    stock = {d: stock_member(fam, d)(**batch, labels=labels).loss for d in (1, 2, 4)}
    for d in (1, 2, 4):
        torch.testing.assert_close(out.exit_losses[d], stock[d].detach(), rtol=1e-5, atol=1e-5)
    want = sum(w * stock[d] for w, d in zip(weights, (1, 2, 4)))
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-5)
    # Explicit weights override the config's; gradients equal those of the per-member losses.
    fam.zero_grad()
    fam(**batch, labels=labels, exit_loss_weights=[1.0, 0.0, 3.0]).loss.backward()
    got = {n: p.grad.clone() for n, p in fam.named_parameters() if p.grad is not None}
    fam.zero_grad()
    (
        fam(**batch, labels=labels, exit_layer=1).loss + 3 * fam(**batch, labels=labels, exit_layer=4).loss
    ).backward()
    ref = {n: p.grad for n, p in fam.named_parameters() if p.grad is not None}
    assert (
        "model.visual.patch_embed.proj.weight" in got
        and "model.visual.deepstack_merger_list.0.linear_fc1.weight" in got
    )
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="needs 3 values"):
        fam(**batch, labels=labels, exit_loss_weights=[1.0, 1.0])


def test_multi_exit_pass_runs_each_layer_once(src, batch):
    fam = family(src, [1, 2, 4], branch=1)
    calls: dict[str, int] = {}
    hooks = []
    blocks = {
        **{f"text.{i}": m for i, m in enumerate(fam.model.language_model.layers)},
        **{f"exit.{d}.{k}": m for d, e in fam.exits.items() for k, m in enumerate(e.layers)},
        **{f"vision.{i}": m for i, m in enumerate(fam.model.visual.blocks)},
        "merger": fam.model.visual.merger,
    }
    for name, module in blocks.items():
        hooks.append(
            module.register_forward_hook(
                lambda m, a, o, name=name: calls.__setitem__(name, calls.get(name, 0) + 1)
            )
        )
    try:
        fam(**batch, labels=masked_labels(batch))
    finally:
        for h in hooks:
            h.remove()
    assert calls == {name: 1 for name in blocks}


def test_generate_with_images_equals_stock_member(src):
    proc = tiny_vl_processor(src.config)
    batch = image_batch(proc, sizes=((64, 48), (48, 32)))
    fam = family(src, [1, 2, 4])
    for d in (1, 2, 4):
        got = fam.generate(**batch, exit_layer=d, max_new_tokens=6, do_sample=False)
        q = member_to_qwen3_vl(fam, d)
        q.set_attn_implementation("eager")
        want = q.generate(**batch, max_new_tokens=6, do_sample=False)
        assert torch.equal(got, want), d
        # Without a cache (full recompute each step) the tokens are the same: the member's cache is right.
        assert torch.equal(
            fam.generate(**batch, exit_layer=d, max_new_tokens=6, do_sample=False, use_cache=False), got
        )
    assert fam.model.rope_deltas is not None


@torch.no_grad()
def test_per_member_kv_cache(src, batch):
    fam = family(src, [1, 2, 4])
    cache = DynamicCache(config=fam.config.text_config)
    out = fam(**batch, exit_layer=2, past_key_values=cache, use_cache=True)
    assert out.past_key_values is cache and cache.get_seq_length() == batch["input_ids"].shape[1]
    # Member 2 filled its own two slots only (its stock indexes), nothing for layers it does not run.
    assert [layer.get_seq_length() for layer in cache.layers][:3] == [batch["input_ids"].shape[1]] * 2 + [0]
    with pytest.raises(ValueError, match="filled by member exit_layer=2"):
        fam(**batch, exit_layer=1, past_key_values=cache)


@pytest.mark.parametrize("bad", [3, 0, 5, 2.0, True, "2", torch.tensor(1.0)])
def test_bad_exit_layer_is_a_clear_error(src, batch, bad):
    fam = family(src, [1, 2, 4], noise=0.0)
    with pytest.raises(ValueError, match=r"exit_layer=.*exits: \[1, 2, 4\]"):
        fam(**batch, exit_layer=bad)


def test_numpy_and_tensor_exit_layers_are_accepted(src, batch):
    import numpy as np

    fam = family(src, [1, 2, 4])
    with torch.no_grad():
        a = fam(**batch, exit_layer=2).logits
        assert torch.equal(fam(**batch, exit_layer=np.int64(2)).logits, a)
        assert torch.equal(fam(**batch, exit_layer=torch.tensor(2)).logits, a)


def _cfg(**kw):
    base = tiny_qwen3_vl_config().to_dict()
    for k in ("model_type", "architectures", "transformers_version"):
        base.pop(k, None)
    base.update(kw)
    return FamilialVLConfig(**base)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"exit_layers": [1, 3]}, r"FamilialVLConfig.exit_layers=\[1, 3\].*last must equal"),
        ({"exit_layers": [2, 2, 4]}, "strictly increasing"),
        ({"exit_layers": [1.0, 4]}, "list of integers"),
        ({"exit_layers": [1, 4], "exit_loss_weights": [1.0]}, "one weight per exit"),
        ({"exit_layers": [1, 4], "exit_branch_layers": 2}, "cannot own 2 branch layers"),
        ({"loss_impl": "fast"}, "loss_impl"),
        ({"tie_word_embeddings": True}, "tie_word_embeddings"),
    ],
)
def test_bad_family_config_is_a_clear_error(kw, match):
    with pytest.raises(ValueError, match=match):
        _cfg(**kw)


def test_bad_vision_config_is_a_clear_error():
    vision = tiny_qwen3_vl_config().vision_config.to_dict()
    with pytest.raises(ValueError, match=r"deepstack_visual_indexes=\[0, 3\].*0\.\.2"):
        _cfg(vision_config={**vision, "deepstack_visual_indexes": [0, 3]})
    with pytest.raises(ValueError, match="strictly increasing"):
        _cfg(vision_config={**vision, "deepstack_visual_indexes": [1, 0]})
    with pytest.raises(ValueError, match="out_hidden_size=32 must equal text_config.hidden_size=64"):
        _cfg(vision_config={**vision, "out_hidden_size": 32})
    text = tiny_qwen3_vl_config().text_config.to_dict()
    with pytest.raises(ValueError, match="3 deepstack features but only 2 text layers"):
        _cfg(text_config={**text, "num_hidden_layers": 2}, exit_layers=[1, 2])


def test_from_qwen3_vl_rejects_other_models(src):
    fam = family(src, [2, 4], noise=0.0)
    with pytest.raises(TypeError, match="stock Qwen3VLForConditionalGeneration"):
        FamilialVLForConditionalGeneration.from_qwen3_vl(fam, [2, 4])
    with pytest.raises(ValueError, match="exit_layers"):
        FamilialVLForConditionalGeneration.from_qwen3_vl(src, [2, 3])


def test_from_qwen3_vl_unties_a_tied_source_and_loads_paths(tmp_path, batch):
    torch.manual_seed(3)
    cfg = tiny_qwen3_vl_config()
    cfg.tie_word_embeddings = True
    tied = Qwen3VLForConditionalGeneration(cfg).eval()
    assert tied.lm_head.weight is tied.model.language_model.embed_tokens.weight
    tied.save_pretrained(tmp_path)
    fam = FamilialVLForConditionalGeneration.from_qwen3_vl(tmp_path, [2, 4]).eval()
    fam.set_attn_implementation("eager")
    assert fam.lm_head.weight is not fam.model.language_model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(fam(**batch).logits, tied(**batch).logits)


def test_save_load_round_trip(src, batch, tmp_path):
    from transformers import AutoModelForImageTextToText

    fam = family(src, [1, 2, 4])
    fam.save_pretrained(tmp_path / "fam")
    for loader in (FamilialVLForConditionalGeneration, AutoModelForImageTextToText):
        back = loader.from_pretrained(tmp_path / "fam", attn_implementation="eager").eval()
        assert type(back) is FamilialVLForConditionalGeneration and back.config.exit_layers == [1, 2, 4]
        with torch.no_grad():
            for d in (1, 2, 4):
                assert torch.equal(back(**batch, exit_layer=d).logits, fam(**batch, exit_layer=d).logits)
    # The stock class reads a family checkpoint as its deepest member.
    stock = Qwen3VLForConditionalGeneration.from_pretrained(
        tmp_path / "fam", attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        assert torch.equal(stock(**batch).logits, fam(**batch, exit_layer=4).logits)


def test_from_pretrained_refuses_an_incomplete_checkpoint(src, tmp_path):
    from safetensors.torch import load_file, save_file

    fam = family(src, [1, 2, 4], noise=0.0)
    fam.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    del tensors["exits.2.layers.0.mlp.down_proj.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="exits.2.layers.0.mlp.down_proj.weight"):
        FamilialVLForConditionalGeneration.from_pretrained(tmp_path)


def test_training_step_updates_every_group(src, batch):
    fam = family(src, [1, 2, 4]).train()
    opt = torch.optim.SGD(fam.parameters(), lr=0.1)
    labels = masked_labels(batch)
    first = fam(**batch, labels=labels).loss
    first.backward()
    groups = (
        "model.visual.blocks",
        "model.visual.merger",
        "model.visual.deepstack_merger_list",
        "model.language_model.layers",
        "model.language_model.norm",
        "lm_head",
        "exits.1",
        "exits.2",
    )
    grads = {
        g: any(
            n.startswith(g) and p.grad is not None and p.grad.abs().sum() > 0
            for n, p in fam.named_parameters()
        )
        for g in groups
    }
    assert all(grads.values()), grads
    opt.step()
    with torch.no_grad():
        assert fam(**batch, labels=labels).loss < first


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(src, batch):
    labels = masked_labels(batch)
    grads = []
    for checkpointing in (False, True):
        fam = family(src, [1, 2, 4]).train()
        if checkpointing:
            fam.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            assert fam.exits["1"].layers[0].gradient_checkpointing
        out = fam(**batch, labels=labels)
        out.loss.backward()
        grads.append(
            (out.loss.detach(), {n: p.grad for n, p in fam.named_parameters() if p.grad is not None})
        )
    (loss_a, grad_a), (loss_b, grad_b) = grads
    assert torch.equal(loss_a, loss_b) and grad_a.keys() == grad_b.keys()
    for name in grad_a:
        torch.testing.assert_close(grad_a[name], grad_b[name], rtol=1e-5, atol=1e-7, msg=name)


def test_bf16_source_deepest_member_equal_and_rotary_tables_kept(src, batch, tmp_path):
    src.save_pretrained(tmp_path)
    bf16 = Qwen3VLForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    bf16.set_attn_implementation("eager")
    fam = FamilialVLForConditionalGeneration.from_qwen3_vl(bf16, [1, 2, 4]).eval()
    assert fam.dtype == torch.bfloat16
    assert fam.model.language_model.rotary_emb.inv_freq.dtype == torch.float32  # as the stock model's
    with torch.no_grad():
        assert torch.equal(fam(**batch).logits, bf16(**batch).logits)
        q = member_to_qwen3_vl(fam, 2)
        q.set_attn_implementation("eager")
        assert q.dtype == torch.bfloat16
        assert torch.equal(q(**batch).logits, fam(**batch, exit_layer=2).logits)
