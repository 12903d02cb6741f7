"""GGUF export of a member (`ruyi_model.gguf_export`), loaded back by transformers' own GGUF reader.

A tiny family is exported with the real `export_exits`; its shallow member is written as GGUF
(f32, f16, q8_0) and read back with `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` and
`AutoTokenizer.from_pretrained(dir, gguf_file=...)`: f32 logits equal the member's, f16 and q8_0 stay
within the measured bounds below, greedy decoding agrees, and the tokenizer round-trips text with the
same ids and keeps the chat template. The file's layout is checked against gguf's own constants.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

from ruyi_model import FamilialForCausalLM, export_exits, export_gguf, train_tokenizer
from tests.tiny_export import _TEXTS, private_tmpdir, tiny_tokenizer

gguf = pytest.importorskip("gguf")

# Measured on this fixture (initializer_range 0.1, |logits| up to ~2.9, 5 prompts): f32 identical;
# f16 max |diff| 3.1e-3 (1.0e-3 of the largest |logit|), argmax equal everywhere; q8_0 max |diff| 7.4e-2
# (2.6e-2 relative), argmax equal at >= 92% of positions; 8-token greedy equal for all three.
# The bounds below are relative to the largest |logit|, with margin over those figures.
REL_BOUND = {"f32": 1e-6, "f16": 3e-3, "q8_0": 6e-2}
PROMPTS = ["Tom has 3 apples and buys 4 more.", "The quick brown fox", "A train travels 60 miles"]
TEXTS = [
    "Tom has 3 apples!\n#### 7",
    "héllo wörld 😀 \t tabs  and  spaces\r\n",
    "<|im_start|>user\nHow many?<|im_end|>\n<|im_start|>assistant\n",
    "",
]


def build_member_dir(root, tokenizer, head_dim=128):
    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=len(tokenizer) + 3,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        max_position_embeddings=256,
        initializer_range=0.1,
        tie_word_embeddings=False,
    )
    family = FamilialForCausalLM.from_qwen3(Qwen3ForCausalLM(cfg).eval(), exit_layers=[2, 3]).eval()
    export_exits(family, root / "export", tokenizer=tokenizer)
    return root / "export" / "exit_2"


@pytest.fixture(scope="module")
def exported():
    tok = tiny_tokenizer()
    with private_tmpdir("ruyi-gguf-") as root:
        member = build_member_dir(root, tok)
        files = {
            dt: export_gguf(member, None, root / f"exit_2.{dt}.gguf", dtype=dt)
            for dt in ("f32", "f16", "q8_0")
        }
        ref = Qwen3ForCausalLM.from_pretrained(member).eval()
        yield root, files, ref, tok


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_transformers_loads_the_member_back(exported, dtype):
    root, files, ref, tok = exported
    model = AutoModelForCausalLM.from_pretrained(root, gguf_file=files[dtype].name).eval()
    assert type(model) is Qwen3ForCausalLM
    for field in (
        "num_hidden_layers",
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
        "max_position_embeddings",
    ):
        assert getattr(model.config, field) == getattr(ref.config, field), field
    assert model.config.rms_norm_eps == pytest.approx(ref.config.rms_norm_eps, rel=1e-6)  # GGUF stores f32
    assert model.config.rope_parameters["rope_theta"] == ref.config.rope_parameters["rope_theta"]
    assert model.config.tie_word_embeddings is False
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tok(prompt, return_tensors="pt").input_ids
            want, got = ref(ids).logits, model(ids).logits
            scale = want.abs().max().item()
            err = (got - want).abs().max().item() / scale
            assert err <= REL_BOUND[dtype], f"{dtype}: max |diff| / max |logit| = {err:.2e}"
            if dtype == "f32":
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            # next-token choice agrees at (nearly) every position, and greedy decoding agrees
            agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
            assert agree >= (1.0 if dtype != "q8_0" else 0.8), agree
            kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
            if dtype != "q8_0":
                assert model.generate(ids, **kw).tolist() == ref.generate(ids, **kw).tolist()


def test_tokenizer_round_trips_with_the_same_ids(exported):
    root, files, _, tok = exported
    loaded = AutoTokenizer.from_pretrained(root, gguf_file=files["f16"].name)
    for text in TEXTS:
        ids = loaded(text).input_ids
        assert ids == tok(text).input_ids, text
        assert loaded.decode(ids) == text
    assert loaded.eos_token == tok.eos_token and loaded.pad_token == tok.pad_token
    assert loaded.bos_token is None
    assert loaded.chat_template == tok.chat_template
    msgs = [{"role": "user", "content": "Tom has 3 apples?"}]
    assert loaded.apply_chat_template(
        msgs, add_generation_prompt=True, tokenize=False
    ) == tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


def test_file_layout_follows_llama_cpp_qwen3(exported):
    _, files, ref, tok = exported
    reader = gguf.GGUFReader(files["q8_0"])

    def field(key):
        f = reader.fields[key]
        return f.contents()

    assert field("general.architecture") == "qwen3"
    cfg = ref.config
    assert field("qwen3.block_count") == cfg.num_hidden_layers
    assert field("qwen3.attention.key_length") == cfg.head_dim == field("qwen3.attention.value_length")
    assert field("qwen3.attention.head_count_kv") == cfg.num_key_value_heads
    assert field("tokenizer.ggml.model") == "gpt2"
    assert field("tokenizer.ggml.pre") == "gpt-2"  # tiny_tokenizer: GPT-2's byte-level regex
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == cfg.vocab_size and tokens[-1] == f"[PAD{cfg.vocab_size - 1}]"
    types = field("tokenizer.ggml.token_type")
    assert types[tok.convert_tokens_to_ids("<|im_end|>")] == gguf.TokenType.CONTROL
    assert types[-1] == gguf.TokenType.UNUSED
    assert field("tokenizer.ggml.eot_token_id") == tok.convert_tokens_to_ids("<|im_end|>")
    allowed = {
        gguf.TENSOR_NAMES[t].format(bid=i) + ".weight"
        for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.QWEN3]
        for i in range(cfg.num_hidden_layers)
    }
    names = {t.name: t for t in reader.tensors}
    assert set(names) <= allowed and len(names) == len(ref.state_dict())
    assert {"token_embd.weight", "output.weight", "output_norm.weight", "blk.0.attn_q_norm.weight"} <= set(
        names
    )
    assert names["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert names["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    # q8_0 blocks hold 32 values: the size is about a quarter of f32
    assert files["q8_0"].stat().st_size < 0.35 * files["f32"].stat().st_size


def test_project_tokenizer_and_other_head_dim(caplog):
    """The project's own tokenizer (Qwen2 split regex -> pre "qwen2"); head_dim 8, which transformers'
    reader only loads given the member's config (its qwen3 reader assumes head_dim 128)."""
    tok = train_tokenizer(_TEXTS, vocab_size=300, min_frequency=1)
    with private_tmpdir("ruyi-gguf2-") as root:
        member = build_member_dir(root, tok, head_dim=8)
        with caplog.at_level(logging.WARNING, logger="ruyi_model.gguf_export"):
            path = export_gguf(member, None, root / "m.gguf", dtype="f32")
        assert "head_dim=8" in caplog.text
        reader = gguf.GGUFReader(path)
        assert reader.fields["tokenizer.ggml.pre"].contents() == "qwen2"
        ref = Qwen3ForCausalLM.from_pretrained(member).eval()
        model = AutoModelForCausalLM.from_pretrained(
            root, gguf_file=path.name, config=AutoConfig.from_pretrained(member)
        ).eval()
        loaded = AutoTokenizer.from_pretrained(root, gguf_file=path.name)
        for text in TEXTS:
            assert loaded(text).input_ids == tok(text).input_ids, text
            assert loaded.decode(loaded(text).input_ids) == text
        ids = tok(PROMPTS[0], return_tensors="pt").input_ids
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)


def test_bad_inputs(exported, tmp_path):
    root, _, _, tok = exported
    with pytest.raises(ValueError, match="dtype"):
        export_gguf(root / "export" / "exit_2", None, tmp_path / "x.gguf", dtype="q4_k")
    with pytest.raises(ValueError, match="family checkpoint"):
        export_gguf(root / "export" / "family", tok, tmp_path / "x.gguf")
    with pytest.raises(FileNotFoundError, match="config.json"):
        export_gguf(tmp_path, tok, tmp_path / "x.gguf")
    assert not list(tmp_path.glob("*.gguf*"))  # nothing half-written
    np.testing.assert_equal(len(list(root.glob("*.gguf"))), 3)
