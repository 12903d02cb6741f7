"""File-level HF <-> megatron-core conversion of a family (ruyi_model.megatron.convert), no process group.

The round trip must be bitwise for every TP/PP split; the shards must hold exactly megatron's layout
(checked here against slices computed by hand from the HF tensors, not by the converter); bad splits
and damaged checkpoints are ValueErrors naming the parameter or tensor, raised before anything is written.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ruyi_model import FamilialConfig, FamilialForCausalLM
from ruyi_model.megatron import check_split, convert_hf_to_mcore, convert_mcore_to_hf, read_split
from ruyi_model.megatron.convert import load_rank_state_dict

VOCAB, HIDDEN, HEADS, GROUPS, HEAD_DIM, FFN = 128, 64, 4, 2, 16, 96


def make_family(
    path,
    exits=(2, 4),
    layers=4,
    branch=1,
    shared=False,
    dae=None,
    vocab=VOCAB,
    heads=HEADS,
    groups=GROUPS,
    dtype=torch.float32,
    seed=0,
):
    torch.manual_seed(seed)
    cfg = FamilialConfig(
        vocab_size=vocab,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=groups,
        head_dim=HEAD_DIM,
        max_position_embeddings=64,
        exit_layers=list(exits),
        exit_branch_layers=branch,
        shared_heads=shared,
        dae_blocks=dae,
        exit_loss_weights=[0.5] * (len(exits) - 1) + [1.0],
    )
    fam = FamilialForCausalLM._from_config(cfg, dtype=dtype)
    with torch.no_grad():
        for p in fam.parameters():  # every tensor distinct and non-trivial (norms are ones at init)
            p.normal_(0.0, 1.0)
    fam.save_pretrained(path)
    return fam


def hf_tensors(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def assert_bitwise_equal(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


SPLITS = [(1, 1), (2, 1), (1, 2), (2, 2), (1, 4)]


@pytest.mark.parametrize("tp,pp", SPLITS)
def test_round_trip_is_bitwise(tmp_path, tp, pp):
    make_family(tmp_path / "fam")
    desc = convert_hf_to_mcore(tmp_path / "fam", tmp_path / "mc", tp=tp, pp=pp)
    shards = sorted(
        p.relative_to(tmp_path / "mc").as_posix() for p in (tmp_path / "mc").rglob("*.safetensors")
    )
    assert shards == sorted(desc["shards"]) and len(shards) == tp * pp
    assert json.loads((tmp_path / "mc" / "megatron_split.json").read_text())["split"]["tp"] == tp
    convert_mcore_to_hf(tmp_path / "mc", tmp_path / "back")
    assert_bitwise_equal(hf_tensors(tmp_path / "fam"), hf_tensors(tmp_path / "back"))
    # non-weight files (config, generation config) come back unchanged; the result loads strictly
    assert (tmp_path / "back" / "config.json").read_bytes() == (tmp_path / "fam" / "config.json").read_bytes()
    FamilialForCausalLM.from_pretrained(tmp_path / "back")


@pytest.mark.parametrize(
    "kwargs,tp,pp",
    [
        ({"shared": True}, 2, 1),  # one head for all members (last stage)
        ({"branch": 0, "exits": (1, 2, 4)}, 2, 2),  # norm+head exits, exit on a stage boundary
        ({"dae": [3, 1]}, 2, 2),  # DaE blocks on both members
        ({"exits": (1, 3, 4)}, 1, 2),  # member 1 branches from the embedding
        ({"dtype": torch.bfloat16}, 2, 2),
    ],
)
def test_round_trip_family_variants(tmp_path, kwargs, tp, pp):
    make_family(tmp_path / "fam", **kwargs)
    convert_hf_to_mcore(tmp_path / "fam", tmp_path / "mc", tp=tp, pp=pp)
    convert_mcore_to_hf(tmp_path / "mc", tmp_path / "back")
    assert_bitwise_equal(hf_tensors(tmp_path / "fam"), hf_tensors(tmp_path / "back"))


def test_shards_hold_megatron_layout(tmp_path):
    """TP=2, PP=2 of a 4-layer family with exits [2, 4], checked slice by slice."""
    make_family(tmp_path / "fam")
    hf = hf_tensors(tmp_path / "fam")
    convert_hf_to_mcore(tmp_path / "fam", tmp_path / "mc", tp=2, pp=2)
    sd = {(t, p): load_rank_state_dict(tmp_path / "mc", t, p) for t in range(2) for p in range(2)}
    v2, f2 = VOCAB // 2, FFN // 2
    # embedding: stage 0 only, vocab rows split
    assert torch.equal(sd[(1, 0)]["embedding.word_embeddings.weight"], hf["model.embed_tokens.weight"][v2:])
    assert not any(k.startswith("embedding.") for k in sd[(0, 1)])
    # PP: backbone layer 2 (0-based) is layer 0 of stage 1
    L = "model.layers.2"
    for t in range(2):
        # one query group per TP rank: [2 q heads, k head, v head] of group t
        q = hf[f"{L}.self_attn.q_proj.weight"][t * 2 * HEAD_DIM : (t + 1) * 2 * HEAD_DIM]
        k = hf[f"{L}.self_attn.k_proj.weight"][t * HEAD_DIM : (t + 1) * HEAD_DIM]
        v = hf[f"{L}.self_attn.v_proj.weight"][t * HEAD_DIM : (t + 1) * HEAD_DIM]
        assert torch.equal(
            sd[(t, 1)]["decoder.layers.0.self_attention.linear_qkv.weight"], torch.cat([q, k, v])
        )
        gate = hf[f"{L}.mlp.gate_proj.weight"][t * f2 : (t + 1) * f2]
        up = hf[f"{L}.mlp.up_proj.weight"][t * f2 : (t + 1) * f2]
        assert torch.equal(sd[(t, 1)]["decoder.layers.0.mlp.linear_fc1.weight"], torch.cat([gate, up]))
        assert torch.equal(
            sd[(t, 1)]["decoder.layers.0.mlp.linear_fc2.weight"],
            hf[f"{L}.mlp.down_proj.weight"][:, t * f2 : (t + 1) * f2],
        )
        assert torch.equal(
            sd[(t, 1)]["decoder.layers.0.self_attention.linear_proj.weight"],
            hf[f"{L}.self_attn.o_proj.weight"][:, t * 2 * HEAD_DIM : (t + 1) * 2 * HEAD_DIM],
        )
        assert torch.equal(
            sd[(t, 1)]["decoder.layers.0.self_attention.q_layernorm.weight"],
            hf[f"{L}.self_attn.q_norm.weight"],
        )
        # member 2 (exit layer 2) lives on stage 0 with its branch layer, norm and vocab-parallel head
        assert torch.equal(
            sd[(t, 0)]["exits.2.output_layer.weight"], hf["exits.2.lm_head.weight"][t * v2 : (t + 1) * v2]
        )
        assert torch.equal(sd[(t, 0)]["exits.2.final_layernorm.weight"], hf["exits.2.norm.weight"])
        assert torch.equal(
            sd[(t, 0)]["exits.2.layers.0.pre_mlp_layernorm.weight"],
            hf["exits.2.layers.0.post_attention_layernorm.weight"],
        )
        # the deepest member is GPTModel's own final norm and output layer, on the last stage
        assert torch.equal(
            sd[(t, 1)]["output_layer.weight"], hf["exits.4.lm_head.weight"][t * v2 : (t + 1) * v2]
        )
        assert torch.equal(sd[(t, 1)]["decoder.final_layernorm.weight"], hf["exits.4.norm.weight"])
        assert not any(k.startswith("exits.") for k in sd[(t, 1)])
        assert sorted(k for k in sd[(t, 0)] if k.startswith("decoder.layers.")) == sorted(
            k for k in sd[(t, 1)] if k.startswith("decoder.layers.")
        )
    desc, _, layout = read_split(tmp_path / "mc")
    assert desc["split"]["exit_stage"] == {"2": 0, "4": 1}
    assert layout.layers_per_stage == 2


@pytest.mark.parametrize(
    "kwargs,tp,pp,names",
    [
        ({}, 3, 1, "num_attention_heads=4"),
        ({"heads": 8}, 4, 1, "num_key_value_heads (query groups)=2"),
        ({"vocab": 127}, 2, 1, "vocab_size=127"),
        ({}, 1, 3, "num_hidden_layers=4"),
        ({"branch": 2, "exits": (3, 4)}, 1, 2, "exit_layers: member 3 cannot be placed with pp=2"),
        ({"shared": True}, 1, 2, "shared_heads=True with pp=2"),
        ({}, 0, 1, "tp=0"),
    ],
)
def test_bad_split_is_a_clear_error_before_any_work(tmp_path, kwargs, tp, pp, names):
    make_family(tmp_path / "fam", **kwargs)
    with pytest.raises(ValueError, match=names.replace("(", r"\(").replace(")", r"\)")):
        convert_hf_to_mcore(tmp_path / "fam", tmp_path / "mc", tp=tp, pp=pp)
    assert not (tmp_path / "mc").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["fam"]  # not even a temporary directory is left


def test_check_split_refuses_lowrank(tmp_path):
    cfg = FamilialConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=4,
        num_attention_heads=HEADS,
        num_key_value_heads=GROUPS,
        head_dim=HEAD_DIM,
        exit_layers=[2, 4],
        lowrank_ranks={"exits.2.lm_head": 8},
    )
    with pytest.raises(ValueError, match="lowrank_ranks"):
        check_split(cfg, 1, 1)


def test_damaged_checkpoints_are_named(tmp_path):
    make_family(tmp_path / "fam")
    convert_hf_to_mcore(tmp_path / "fam", tmp_path / "mc", tp=2, pp=2)
    shard = tmp_path / "mc" / "mp_rank_01_001" / "model.safetensors"
    # a shard rewritten without updating the split description: its hash no longer matches
    sd = load_file(str(shard))
    sd["decoder.final_layernorm.weight"] = sd["decoder.final_layernorm.weight"] + 1
    save_file(sd, str(shard))
    with pytest.raises(ValueError, match="mp_rank_01_001.*sha256"):
        convert_mcore_to_hf(tmp_path / "mc", tmp_path / "back")
    assert not (tmp_path / "back").exists()
    # a missing tensor in the HF checkpoint is named
    hf = hf_tensors(tmp_path / "fam")
    del hf["exits.2.layers.0.mlp.up_proj.weight"]
    (tmp_path / "fam" / "model.safetensors").unlink()
    save_file(hf, str(tmp_path / "fam" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing \['exits.2.layers.0.mlp.up_proj.weight'\]"):
        convert_hf_to_mcore(tmp_path / "fam", tmp_path / "mc2", tp=1, pp=1)
    # a tensor of the wrong shape is named
    hf["exits.2.layers.0.mlp.up_proj.weight"] = torch.zeros(FFN + 2, HIDDEN)
    save_file(hf, str(tmp_path / "fam" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"exits.2.layers.0.mlp.up_proj.weight has shape \(98, 64\)"):
        convert_hf_to_mcore(tmp_path / "fam", tmp_path / "mc2", tp=1, pp=1)
    assert not (tmp_path / "mc2").exists()
    with safe_open(str(tmp_path / "mc" / "mp_rank_00_000" / "model.safetensors"), "pt") as f:
        assert f.metadata()["tp_rank"] == "0"


def test_check_split_refuses_rope_scaling():
    cfg = FamilialConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=4,
        num_attention_heads=HEADS,
        num_key_value_heads=GROUPS,
        head_dim=HEAD_DIM,
        exit_layers=[2, 4],
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    )
    with pytest.raises(ValueError, match="rope_parameters"):
        check_split(cfg, 1, 1)


def test_converters_do_not_import_megatron():
    """The file-level converters run where megatron-core is not importable (or too slow to import)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])
    code = (
        "import sys, ruyi_model.megatron as m; m.convert_hf_to_mcore; m.check_split; "
        "assert not [k for k in sys.modules if k.split('.')[0] == 'megatron'], 'megatron imported'"
    )
    env = dict(os.environ, PYTHONPATH=root)
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root, env=env
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
