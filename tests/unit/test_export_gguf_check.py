"""The export stage's GGUF check (`tasks.export.check_gguf`): a member's GGUF file loaded back alone by
transformers' GGUF loader and compared with the stock member.

A tiny member (the project's tokenizer, head_dim 32 as in params.yaml) is written by the real
`export_exits` and `export_gguf`. f32 and q8_0 pass with their stated bounds; tampering with the file
(a tensor scaled by 1%, a q8_0 tensor negated, a hyperparameter) or comparing with another tokenizer
fails with a StageError naming the file.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from test_gguf_export import build_member_dir
from transformers import Qwen3ForCausalLM

from ruyi_model import export_gguf, train_tokenizer
from tasks.core.stage import StageError
from tasks.export import GGUF_F32_ATOL, GGUF_REL_BOUND, GGUF_TEXT_PROBE, check_gguf, gguf_file_name
from tests.tiny_export import _TEXTS, private_tmpdir

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def member():
    tok = train_tokenizer(_TEXTS, vocab_size=300, min_frequency=1)
    with private_tmpdir("ruyi-gguf-check-") as root:
        mdir = build_member_dir(root, tok, head_dim=32)
        for dtype in ("f32", "q8_0"):
            export_gguf(mdir, None, mdir / gguf_file_name(dtype), dtype=dtype)
        ref = Qwen3ForCausalLM.from_pretrained(mdir).eval()
        ids = torch.tensor([tok("What is 12 + 30? Show your work. Tom has 3 apples.")["input_ids"]])
        with torch.no_grad():
            logits = ref(ids).logits
        yield mdir, tok, ids, logits


def _copy(mdir, tmp_path):
    dst = tmp_path / mdir.name
    shutil.copytree(mdir, dst)
    return dst


def _check(mdir, dtype, member_, tokenizer=None):
    _, tok, ids, logits = member_
    return check_gguf(
        mdir / gguf_file_name(dtype), dtype, logits, ids, tokenizer or tok, ["", GGUF_TEXT_PROBE]
    )


def test_f32_and_q8_0_round_trip_within_their_bounds(member):
    mdir = member[0]
    f32 = _check(mdir, "f32", member)
    assert f32["max_abs_logit_diff"] <= GGUF_F32_ATOL and f32["argmax_agreement"] == 1.0
    q8 = _check(mdir, "q8_0", member)
    # quantized: not exact, but within the bound (relative to the largest |logit|)
    assert 0 < q8["rel_logit_diff"] <= GGUF_REL_BOUND["q8_0"]
    assert q8["tokenizer_texts_checked"] == 2


def _tensor(path, name):
    reader = gguf.GGUFReader(path, "r+")
    return reader, {t.name: t for t in reader.tensors}[name]


def test_a_tensor_scaled_by_one_percent_fails_the_f32_check(member, tmp_path):
    mdir = _copy(member[0], tmp_path)
    path = mdir / gguf_file_name("f32")
    reader, t = _tensor(path, "output.weight")
    t.data[:] = t.data * np.float32(1.01)  # within q8_0's relative bound, far outside f32's
    reader.data.flush()
    del reader, t
    with pytest.raises(StageError, match=str(path).replace(".", r"\.") + ".*logits differ"):
        _check(mdir, "f32", member)


def test_a_negated_q8_0_tensor_fails_the_q8_0_check(member, tmp_path):
    mdir = _copy(member[0], tmp_path)
    path = mdir / gguf_file_name("q8_0")
    reader, t = _tensor(path, "output.weight")
    assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
    blocks = t.data.reshape(-1, 34)  # q8_0 block: fp16 scale (2 bytes) + 32 int8
    quants = blocks[:, 2:].view(np.int8)
    quants[:] = -quants.clip(-127, 127)
    reader.data.flush()
    del reader, t, blocks, quants
    with pytest.raises(StageError, match=r"model-q8_0\.gguf.*logits differ.*bound for q8_0"):
        _check(mdir, "q8_0", member)


def test_a_wrong_hyperparameter_fails(member, tmp_path):
    mdir = _copy(member[0], tmp_path)
    path = mdir / gguf_file_name("f32")
    reader = gguf.GGUFReader(path, "r+")
    reader.fields["qwen3.attention.layer_norm_rms_epsilon"].parts[-1][0] = 1e-2
    reader.data.flush()
    del reader
    with pytest.raises(StageError, match=r"model-f32\.gguf: hyperparameters differ.*rms_norm_eps"):
        _check(mdir, "f32", member)


def test_another_tokenizer_fails(member):
    other = train_tokenizer(_TEXTS[:2], vocab_size=280, min_frequency=1)
    with pytest.raises(StageError, match=r"model-f32\.gguf: its tokenizer encodes"):
        _check(member[0], "f32", member, tokenizer=other)


def test_gguf_dtypes_param():
    from tasks.core.params import ParamsError, load_params

    assert load_params("params.yaml").export.gguf_dtypes == ["f32", "q8_0"]
    assert load_params("params.paper.yaml").export.gguf_dtypes == ["f16", "q8_0"]
    assert load_params("params.yaml", overrides={"export.gguf_dtypes": []}).export.gguf_dtypes == []
    with pytest.raises(ParamsError, match=r"export\.gguf_dtypes\.0: Input should be 'f32', 'f16' or 'q8_0'"):
        load_params("params.yaml", overrides={"export.gguf_dtypes": ["q4_k"]})
    with pytest.raises(ParamsError, match=r"export\.gguf_dtypes: .*twice"):
        load_params("params.yaml", overrides={"export.gguf_dtypes": ["f32", "f32"]})
