"""Exporting a vision-language family with the same `export_exits` as text families.

Every member must load with plain transformers (`AutoModelForImageTextToText`, `AutoProcessor`,
offline) as a stock `Qwen3VLForConditionalGeneration` with its processor, give the family's logits on
image+text inputs and its greedy tokens; the family checkpoint round-trips; the manifest lists the
modality and the members. The processor is built, saved and reloaded offline (no torchvision).
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, Qwen3VLForConditionalGeneration

from ruyi_model import FamilialVLForConditionalGeneration, Qwen3VLImageOnlyProcessor, export_exits
from ruyi_model.export import member_num_parameters, verify_export
from ruyi_model.vl_processor import build_vl_processor
from tests.tiny_vl import (
    CHAT_TEMPLATE,
    image_batch,
    tiny_images,
    tiny_qwen3_vl,
    tiny_qwen3_vl_config,
    tiny_tokenizer,
    tiny_vl_processor,
)

EXITS = [1, 2, 4]


@pytest.fixture(scope="module")
def family():
    src = tiny_qwen3_vl(seed=0)
    fam = FamilialVLForConditionalGeneration.from_qwen3_vl(src, EXITS).eval()
    torch.manual_seed(1)
    with torch.no_grad():  # members differ from the truncated trunk
        for p in fam.exits.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return fam


@pytest.fixture(scope="module")
def exported(family, tmp_path_factory):
    out = tmp_path_factory.mktemp("vl") / "export"
    processor = tiny_vl_processor(family.config)
    manifest = export_exits(family, out, processor)
    return out, manifest, processor


def test_members_load_in_plain_transformers_with_equal_logits(family, exported):
    out, manifest, processor = exported
    batch = image_batch(processor)
    real = batch["attention_mask"].bool()
    for d in EXITS:
        model, info = AutoModelForImageTextToText.from_pretrained(out / f"exit_{d}", output_loading_info=True)
        assert type(model) is Qwen3VLForConditionalGeneration
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
        assert model.config.text_config.num_hidden_layers == d
        assert list(model.config.vision_config.deepstack_visual_indexes) == [0, 1, 2][:d]
        proc = AutoProcessor.from_pretrained(out / f"exit_{d}")
        assert isinstance(proc, Qwen3VLImageOnlyProcessor)
        member_batch = image_batch(proc)
        assert all(torch.equal(member_batch[k], batch[k]) for k in batch)
        with torch.no_grad():
            want = family(**batch, exit_layer=d).logits
            got = model.eval()(**member_batch).logits  # default attention (sdpa): equal to rounding
            torch.testing.assert_close(got[real], want[real], rtol=0, atol=1e-5)
            model.set_attn_implementation("eager")  # the family's: bitwise
            assert torch.equal(model(**member_batch).logits, want)
        entry = manifest["members"][str(d)]
        assert (
            entry["num_parameters"] == model.num_parameters()
            and entry["architecture"] == type(model).__name__
        )
        assert entry["deepstack_visual_indexes"] == [0, 1, 2][:d]
        assert member_num_parameters(family, d) == entry["num_parameters"]


def test_member_generate_equals_family(family, exported):
    out, _, processor = exported
    batch = image_batch(processor, sizes=((64, 48), (48, 32)))
    for d in (1, 4):
        model = AutoModelForImageTextToText.from_pretrained(out / f"exit_{d}", attn_implementation="eager")
        want = family.generate(**batch, exit_layer=d, max_new_tokens=5, do_sample=False)
        assert torch.equal(model.eval().generate(**batch, max_new_tokens=5, do_sample=False), want)


def test_manifest_and_files(family, exported):
    out, manifest, _ = exported
    assert manifest == json.loads((out / "manifest.json").read_text())
    assert manifest["modality"] == "vision-language" and manifest["processor"] is True
    assert manifest["exit_layers"] == EXITS and sorted(manifest["members"]) == ["1", "2", "4"]
    fam_entry = manifest["family"]
    assert fam_entry["architecture"] == "FamilialVLForConditionalGeneration"
    assert fam_entry["num_parameters"] == family.num_parameters()
    # Shallow members hold fewer deepstack mergers: strictly fewer parameters by depth.
    counts = [manifest["members"][str(d)]["num_parameters"] for d in EXITS]
    assert counts == sorted(counts) and len(set(counts)) == 3
    for d in EXITS:
        for name in ("config.json", "model.safetensors", "processor_config.json", "tokenizer.json"):
            assert f"exit_{d}/{name}" in manifest["files"]
    verify_export(out)


def test_family_checkpoint_round_trips(family, exported):
    out, _, processor = exported
    batch = image_batch(processor)
    back = AutoModelForImageTextToText.from_pretrained(out / "family", attn_implementation="eager").eval()
    assert type(back) is FamilialVLForConditionalGeneration
    assert isinstance(AutoProcessor.from_pretrained(out / "family"), Qwen3VLImageOnlyProcessor)
    with torch.no_grad():
        for d in EXITS:
            assert torch.equal(back(**batch, exit_layer=d).logits, family(**batch, exit_layer=d).logits)


def test_export_needs_a_processor_not_a_bare_tokenizer(family, tmp_path):
    with pytest.raises(TypeError, match="needs its processor"):
        export_exits(family, tmp_path / "x", tiny_tokenizer())
    assert not (tmp_path / "x").exists()
    with pytest.raises(TypeError, match="not both"):
        export_exits(family, tmp_path / "x", tiny_tokenizer(), processor=tiny_vl_processor())


def test_processor_round_trip_offline(tmp_path):
    proc = tiny_vl_processor()
    proc.save_pretrained(tmp_path)
    for loader in (Qwen3VLImageOnlyProcessor, AutoProcessor):
        back = loader.from_pretrained(tmp_path)
        assert isinstance(back, Qwen3VLImageOnlyProcessor)
        assert back.image_processor.patch_size == 8 and back.image_processor.merge_size == 2
        a, b = image_batch(proc), image_batch(back)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    batch = image_batch(proc)
    # 64x48 -> a 6x8 patch grid -> 12 image tokens; 32x32 -> 4x4 -> 4.
    assert batch["image_grid_thw"].tolist() == [[1, 6, 8], [1, 4, 4]]
    assert batch["mm_token_type_ids"].sum(1).tolist() == [12, 4]
    assert batch["pixel_values"].shape == (48 + 16, 3 * 2 * 8 * 8)


def test_processor_refuses_mismatched_token_ids():
    cfg = tiny_qwen3_vl_config()
    cfg.image_token_id = cfg.image_token_id + 1
    with pytest.raises(ValueError, match=r"<\|image_pad\|>: tokenizer"):
        build_vl_processor(tiny_tokenizer(), cfg, CHAT_TEMPLATE)


def test_processor_refuses_an_image_without_placeholder():
    proc = tiny_vl_processor()
    with pytest.raises(ValueError, match="image"):
        proc(text=["no placeholder here"], images=tiny_images()[:1], return_tensors="pt")
