"""Export of every member as a stock Qwen3ForCausalLM (ruyi_model.export), with transformers as the oracle.

Each exported `exit_<d>/` is loaded by plain `transformers.Qwen3ForCausalLM.from_pretrained` (strictly:
no missing/unexpected/mismatched keys) and must give the family member's logits and greedy tokens,
also after DaE expansion and decomposition. The manifest must hash every file; tampering is detected.
A decomposed member's one-member familial copy (`member_to_familial`, `exit_<d>_factored/`) must run its
low-rank factors: evaluate's parameter count, the family's logits and greedy tokens at that exit.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen3ForCausalLM

from ruyi_model import FamilialConfig, FamilialForCausalLM, LowRankLinear
from ruyi_model.dae import BLOCK_LINEARS, decompose, expand
from ruyi_model.export import (
    export_exits,
    member_has_lowrank,
    member_num_parameters,
    member_to_familial,
    member_to_qwen3,
    verify_export,
)

VOCAB = 97


def make_family(
    exits,
    branch=1,
    shared=False,
    seed=0,
    num_layers=5,
    heads=4,
    kv=2,
    hidden=32,
    head_dim=8,
    dtype=torch.float32,
):
    torch.manual_seed(seed)
    cfg = FamilialConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden + 3,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        max_position_embeddings=128,
        exit_layers=exits,
        exit_branch_layers=branch,
        shared_heads=shared,
    )
    return FamilialForCausalLM._from_config(cfg, dtype=dtype).eval()


def load_stock(path) -> Qwen3ForCausalLM:
    q, info = Qwen3ForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), (
        info
    )
    assert type(q) is Qwen3ForCausalLM
    return q.eval()


def assert_export_matches(fam: FamilialForCausalLM, out, ids, new_tokens=0):
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["exit_layers"] == fam.config.exit_layers
    for d in fam.config.exit_layers:
        q = load_stock(out / f"exit_{d}")
        assert (
            q.config.num_hidden_layers
            == fam.config.member_num_layers(d)
            == manifest["members"][str(d)]["num_hidden_layers"]
        )
        assert q.config.tie_word_embeddings is False
        assert len(q.config.layer_types) == q.config.num_hidden_layers
        assert manifest["members"][str(d)]["num_parameters"] == sum(p.numel() for p in q.parameters())
        with torch.no_grad():
            ref = fam(ids, exit_layer=d).logits
            got = q(ids).logits
            assert (got - ref).abs().max().item() <= 1e-4, d
            if new_tokens:
                g_fam = fam.generate(ids, max_new_tokens=new_tokens, do_sample=False, exit_layer=d)
                g_q = q.generate(ids, max_new_tokens=new_tokens, do_sample=False)
                assert torch.equal(g_fam, g_q), d


SHAPES = [
    # (exits, branch layers, shared heads, shape kwargs)
    ([1, 3, 5], 1, False, {}),  # GQA, exit at layer 1
    ([2, 5], 0, False, {}),  # norm+head exits
    ([1, 2, 3, 4, 5], 1, True, {}),  # shared head
    ([3, 7], 1, False, {"num_layers": 7, "heads": 6, "kv": 3, "hidden": 48}),  # odd layer count
    ([1, 6], 0, True, {"num_layers": 6, "heads": 4, "kv": 1}),  # MQA, exit 1 without branch
]


@pytest.mark.parametrize("exits,branch,shared,shape", SHAPES)
def test_every_exported_member_is_a_stock_qwen3(tmp_path, exits, branch, shared, shape):
    fam = make_family(exits, branch, shared, **shape)
    ids = torch.randint(0, VOCAB, (2, 7))
    manifest = export_exits(fam, tmp_path / "export")
    assert sorted(manifest["members"]) == sorted(str(d) for d in exits)
    assert_export_matches(fam, tmp_path / "export", ids)
    verify_export(tmp_path / "export")
    # the family checkpoint round-trips exactly
    loaded = FamilialForCausalLM.from_pretrained(tmp_path / "export" / "family")
    with torch.no_grad():
        for d in exits:
            assert torch.equal(loaded(ids, exit_layer=d).logits, fam(ids, exit_layer=d).logits)


def test_export_after_expand_and_decompose_matches_and_generates_the_same_tokens(tmp_path):
    fam = expand(make_family([1, 3, 5]), 1, 2)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # give the DaE blocks a function (fresh ones are the identity)
        for block in list(fam.exits["1"].layers)[1:]:
            for path in BLOCK_LINEARS:
                w = block.get_submodule(path).weight
                w.copy_(torch.randn(w.shape, generator=g) * 0.1)
    cal = [torch.randint(0, VOCAB, (2, 16), generator=g) for _ in range(3)]
    small = decompose(fam, ratio=0.4, calibration=cal).model
    assert len(small.config.lowrank_ranks) == 2 * 7 + 1
    ids = torch.randint(0, VOCAB, (1, 6), generator=g)
    manifest = export_exits(small, tmp_path / "export")
    assert manifest["members"]["1"]["num_hidden_layers"] == 3 and manifest["members"]["1"]["dae_blocks"] == 2
    assert manifest["family"]["lowrank_ranks"] == small.config.lowrank_ranks
    assert_export_matches(small, tmp_path / "export", ids, new_tokens=5)
    # the family keeps the saving, the stock export is dense
    family_params = manifest["family"]["num_parameters"]
    assert (
        family_params == sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in fam.parameters())
    )
    loaded = FamilialForCausalLM.from_pretrained(tmp_path / "export" / "family")
    with torch.no_grad():
        assert torch.equal(loaded(ids, exit_layer=1).logits, small(ids, exit_layer=1).logits)


def test_member_to_qwen3_in_memory_and_bf16(tmp_path):
    # bf16 as from_pretrained / from_config build it (rotary inv_freq stays fp32): bit-identical logits
    fam = expand(make_family([2, 5], dtype=torch.bfloat16), 5, 1)
    q = member_to_qwen3(fam, 5)
    assert q.dtype == torch.bfloat16 and q.config.num_hidden_layers == 6
    ids = torch.randint(0, VOCAB, (2, 5))
    with torch.no_grad():
        assert torch.equal(q(ids).logits, fam(ids, exit_layer=5).logits)
    export_exits(fam, tmp_path / "export")
    reloaded = Qwen3ForCausalLM.from_pretrained(tmp_path / "export" / "exit_5")
    assert reloaded.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, fam(ids, exit_layer=5).logits)
    with pytest.raises(ValueError, match="exit_layer=4"):
        member_to_qwen3(fam, 4)
    with pytest.raises(
        ValueError, match="exit_layer=5.0 must be an integer"
    ):  # a float is refused, not truncated
        member_to_qwen3(fam, 5.0)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<|endoftext|>": 0, "<|pad|>": 1} | {f"w{i}": i + 2 for i in range(VOCAB - 2)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")


def test_tokenizer_is_saved_with_every_member_and_the_family(tmp_path):
    fam = make_family([2, 5])
    export_exits(fam, tmp_path / "export", tokenizer=tiny_tokenizer())
    for sub in ("exit_2", "exit_5", "family"):
        tok = AutoTokenizer.from_pretrained(tmp_path / "export" / sub)
        assert tok("w3 w10 w94")["input_ids"] == [5, 12, 96]
        assert tok.pad_token == "<|pad|>"


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_manifest_hashes_every_file_and_tampering_is_detected(tmp_path):
    out = tmp_path / "export"
    export_exits(make_family([2, 5]), out)
    manifest = json.loads((out / "manifest.json").read_text())
    on_disk = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert sorted(manifest["files"]) + ["manifest.json"] == sorted(on_disk)
    assert {
        "exit_2/model.safetensors",
        "exit_2/config.json",
        "exit_2/generation_config.json",
        "family/model.safetensors",
        "family/config.json",
    } <= set(manifest["files"])
    for rel, meta in manifest["files"].items():
        assert meta["sha256"] == sha256(out / rel) and meta["bytes"] == (out / rel).stat().st_size
    verify_export(out)

    weights = out / "exit_2" / "model.safetensors"
    original = weights.read_bytes()
    data = bytearray(original)
    data[-3] ^= 0xFF  # same size, different content
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"exit_2/model.safetensors: corrupted \(sha256"):
        verify_export(out)
    # the caller's own fresh hashes of these files (deploy's scan) stand in for hashing them again
    scanned = {rel: sha256(out / rel) for rel in manifest["files"]}
    with pytest.raises(ValueError, match=r"exit_2/model.safetensors: corrupted \(sha256"):
        verify_export(out, hashes=scanned)
    weights.write_bytes(original)
    verify_export(out, hashes={rel: meta["sha256"] for rel, meta in manifest["files"].items()})
    with pytest.raises(ValueError, match=r"exit_2/model.safetensors: corrupted \(sha256"):
        verify_export(out, hashes={**scanned, "exit_2/model.safetensors": "0" * 64})
    weights.write_bytes(original[:-1])
    with pytest.raises(ValueError, match=r"exit_2/model.safetensors: corrupted \(\d+ bytes"):
        verify_export(out)
    weights.unlink()
    with pytest.raises(ValueError, match="exit_2/model.safetensors: listed in manifest.json but missing"):
        verify_export(out)
    weights.write_bytes(original)
    verify_export(out)
    (out / "family" / "stray.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="family/stray.bin: not listed"):
        verify_export(out)
    verify_export(out, extra_files=["family/stray.bin"])  # e.g. a fetched release's MANIFEST.json
    (out / "manifest.json").unlink()
    with pytest.raises(ValueError, match="no export manifest"):
        verify_export(out)


class _FailingTokenizer:
    def save_pretrained(self, path):
        raise OSError("disk full")


def test_export_is_atomic(tmp_path):
    out = tmp_path / "export"
    export_exits(make_family([2, 5]), out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(OSError, match="disk full"):
        export_exits(make_family([1, 5], seed=1), out, tokenizer=_FailingTokenizer())
    # the previous export is intact and no temporary directory is left behind
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["export"]
    verify_export(out)
    # a successful export replaces the old one completely
    export_exits(make_family([1, 5], seed=1), out)
    assert sorted(p.name for p in out.iterdir()) == ["exit_1", "exit_5", "family", "manifest.json"]
    verify_export(out)


# --- the one-member familial model (the served factored tier) --------------------------------------
def dae_family(exits, dae_exit, branch=1, shared=False, blocks=2, seed=0, **shape):
    """A family whose member `dae_exit` got `blocks` DaE blocks with a function, then decomposed."""
    fam = expand(make_family(exits, branch, shared, seed=seed, **shape), dae_exit, blocks)
    g = torch.Generator().manual_seed(seed + 11)
    with torch.no_grad():
        for block in list(fam.exits[str(dae_exit)].layers)[fam.config.branch_layers(dae_exit) :]:
            for path in BLOCK_LINEARS:
                w = block.get_submodule(path).weight
                w.copy_(torch.randn(w.shape, generator=g) * 0.1)
    cal = [torch.randint(0, VOCAB, (2, 16), generator=g) for _ in range(2)]
    return decompose(fam, ratio=0.4, calibration=cal, include_head=not shared).model.eval()


def lowrank_paths(model) -> list[str]:
    return sorted(n for n, m in model.named_modules() if isinstance(m, LowRankLinear))


ONE_MEMBER_LAYOUTS = [
    # (exits, DaE member, branch layers, shared heads)
    ([2, 3, 5], 2, 1, False),  # Ruyi2: branch layer + DaE blocks on the shallowest member
    ([1, 3, 5], 1, 1, False),  # member 1: no backbone layer at all
    ([2, 5], 2, 0, False),  # norm+head exits
    ([2, 4, 5], 5, 1, False),  # DaE on the deepest member
    ([2, 5], 2, 1, True),  # shared head (kept dense: a shared head is never factored)
]


@pytest.mark.parametrize("exits,dae_exit,branch,shared", ONE_MEMBER_LAYOUTS)
def test_member_to_familial_runs_exactly_the_member_with_its_factors(
    tmp_path, exits, dae_exit, branch, shared
):
    from tasks.training.heldout import member_params  # what evaluate reports as `params`

    fam = dae_family(exits, dae_exit, branch, shared)
    assert member_has_lowrank(fam, dae_exit)
    one = member_to_familial(fam, dae_exit)
    cfg = one.config
    assert cfg.exit_layers == [dae_exit] == [cfg.num_hidden_layers]
    assert cfg.dae_blocks == [2] and len(one.member_layers(dae_exit)) == fam.config.member_num_layers(
        dae_exit
    )
    # every factor of the member is kept at its rank (renamed into the one-member layout), nothing else
    member_ranks = {p: r for p, r in fam.config.lowrank_ranks.items() if p.startswith(f"exits.{dae_exit}.")}
    assert sorted(cfg.lowrank_ranks.values()) == sorted(member_ranks.values()) and cfg.lowrank_ranks
    assert lowrank_paths(one) == sorted(cfg.lowrank_ranks)
    # parameters: what evaluate counts for the member, fewer than the dense stock export
    count = sum(p.numel() for p in one.parameters())
    assert count == member_params(fam, dae_exit) == member_num_parameters(fam, dae_exit)
    assert count < sum(p.numel() for p in member_to_qwen3(fam, dae_exit).parameters())
    # logits and greedy decoding with the KV cache (batch, left padding) equal the family's at the exit
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(2, VOCAB, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in the second row
    with torch.no_grad():
        ref = fam(ids, attention_mask=mask, exit_layer=dae_exit).logits
        got = one(ids, attention_mask=mask).logits
        assert torch.allclose(got, ref, atol=1e-5, rtol=0), (got - ref).abs().max()
        kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=1)
        g_fam = fam.generate(ids, exit_layer=dae_exit, **kw)
        g_one = one.generate(ids, **kw)
        assert torch.equal(g_one, g_fam)
    # a standard HF checkpoint: from_pretrained rebuilds the LowRankLinear modules from the config
    one.save_pretrained(tmp_path / "one")
    saved = json.loads((tmp_path / "one" / "config.json").read_text())
    assert saved["lowrank_ranks"] == cfg.lowrank_ranks and saved["exit_layers"] == [dae_exit]
    loaded = FamilialForCausalLM.from_pretrained(tmp_path / "one").eval()
    assert lowrank_paths(loaded) == lowrank_paths(one)
    assert sum(p.numel() for p in loaded.parameters()) == count
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=mask).logits, got)
        assert torch.equal(loaded.generate(ids, **kw), g_one)


def test_member_to_familial_of_a_family_without_factors(tmp_path):
    from tasks.training.heldout import member_params

    fam = make_family([1, 3, 5])
    ids = torch.randint(0, VOCAB, (2, 6))
    for d in fam.config.exit_layers:
        assert not member_has_lowrank(fam, d)
        one = member_to_familial(fam, d)
        assert lowrank_paths(one) == [] and one.config.lowrank_ranks == {}
        count = sum(p.numel() for p in one.parameters())
        # without factors the member's count is also the dense stock export's
        assert count == member_params(fam, d) == sum(p.numel() for p in member_to_qwen3(fam, d).parameters())
        with torch.no_grad():
            assert torch.allclose(one(ids).logits, fam(ids, exit_layer=d).logits, atol=1e-5, rtol=0)
    # only members with low-rank modules get a factored copy
    manifest = export_exits(fam, tmp_path / "export")
    assert all(m["factored"] is None for m in manifest["members"].values())
    assert not list((tmp_path / "export").glob("*_factored"))
    with pytest.raises(ValueError, match="exit_layer=4 is not an exit"):
        member_to_familial(fam, 4)
    with pytest.raises(TypeError, match="expects a FamilialForCausalLM"):
        member_to_familial(member_to_qwen3(fam, 3), 3)


def test_export_writes_the_factored_copy_and_states_both_counts(tmp_path):
    from tasks.training.heldout import member_params

    fam = dae_family([2, 3, 5], 2)
    out = tmp_path / "export"
    manifest = export_exits(fam, out, tokenizer=tiny_tokenizer())
    verify_export(out)
    assert sorted(p.name for p in out.iterdir()) == [
        "exit_2",
        "exit_2_factored",
        "exit_3",
        "exit_5",
        "family",
        "manifest.json",
    ]
    entry = manifest["members"]["2"]
    factored = entry["factored"]
    assert factored["dir"] == "exit_2_factored" and factored["architecture"] == "FamilialForCausalLM"
    assert factored["num_parameters"] == member_params(fam, 2) < entry["num_parameters"]
    assert manifest["members"]["3"]["factored"] is None and manifest["members"]["5"]["factored"] is None
    assert any(rel.startswith("exit_2_factored/") for rel in manifest["files"])
    # exit_2/ is still a plain stock Qwen3 checkpoint (dense) with the member's logits
    ids = torch.randint(0, VOCAB, (1, 8))
    assert_export_matches(fam, out, ids, new_tokens=4)
    assert entry["num_parameters"] == sum(p.numel() for p in load_stock(out / "exit_2").parameters())
    # the factored copy loads by from_pretrained (and AutoModelForCausalLM), runs its factors, same logits
    from transformers import AutoModelForCausalLM

    one = AutoModelForCausalLM.from_pretrained(out / "exit_2_factored").eval()
    assert type(one) is FamilialForCausalLM and lowrank_paths(one)
    assert sorted(one.config.lowrank_ranks) == sorted(factored["lowrank_ranks"])
    assert sum(p.numel() for p in one.parameters()) == factored["num_parameters"]
    with torch.no_grad():
        assert torch.allclose(one(ids).logits, fam(ids, exit_layer=2).logits, atol=1e-5, rtol=0)
    assert AutoTokenizer.from_pretrained(out / "exit_2_factored")("w3 w10")["input_ids"] == [5, 12]
