"""DaE: zero-residual expansion, the trainable set, and activation-aware decomposition (ruyi_model.dae).

Oracles: the unexpanded family itself (expansion must not change any member, bit for bit), exact linear
algebra (a low-rank weight is reproduced; the whitened truncation minimises the activation-weighted
error, so it must not lose to plain SVD on it), and save/load through `from_pretrained`.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ruyi_model import FamilialConfig, FamilialForCausalLM
from ruyi_model.dae import (
    BLOCK_LINEARS,
    DecomposeReport,
    DecomposeResult,
    collect_input_grams,
    dae_trainable_parameters,
    decompose,
    expand,
    freeze_for_dae,
    rank_for_ratio,
    svd_lowrank,
)
from ruyi_model.modeling import LowRankLinear

VOCAB = 97


def make_family(exits, branch=1, shared=False, seed=0, num_layers=5, heads=4, kv=2, hidden=32, head_dim=8):
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
    return FamilialForCausalLM(cfg).eval()


def all_logits(model, ids):
    with torch.no_grad():
        return {d: model(ids, exit_layer=d).logits for d in model.config.exit_layers}


def assert_same_logits(a: dict, b: dict, members=None, atol=0.0):
    for d in members or a:
        torch.testing.assert_close(a[d], b[d], atol=atol, rtol=0.0 if atol == 0 else 1e-5, msg=f"member {d}")


SHAPES = [
    # (exits, branch layers, shared heads, shape kwargs)
    ([1, 3, 5], 1, False, {}),  # GQA, exit at layer 1
    ([2, 5], 0, False, {}),  # norm+head exits
    ([1, 2, 3, 4, 5], 1, True, {}),  # shared head
    ([3, 7], 1, False, {"num_layers": 7, "heads": 6, "kv": 3, "hidden": 48}),  # odd layer count
]


# --- expansion ----------------------------------------------------------------------------------
@pytest.mark.parametrize("exits,branch,shared,shape", SHAPES)
@pytest.mark.parametrize("which", ["smallest", "deepest"])
def test_expand_keeps_every_member_identical(exits, branch, shared, shape, which):
    fam = make_family(exits, branch, shared, **shape)
    ids = torch.randint(0, VOCAB, (2, 7))
    before = all_logits(fam, ids)
    d = exits[0] if which == "smallest" else exits[-1]
    torch.manual_seed(1)
    big = expand(fam, d, 2)
    assert big.config.num_dae_blocks(d) == 2 and fam.config.num_dae_blocks(d) == 0  # input untouched
    assert len(big.member_layers(d)) == big.config.member_num_layers(d) == d + 2
    assert_same_logits(before, all_logits(big, ids))
    # generation with the expanded member's own (longer) cache is unchanged too
    with torch.no_grad():
        g_old = fam.generate(ids[:1], max_new_tokens=4, do_sample=False, exit_layer=d)
        g_new = big.generate(ids[:1], max_new_tokens=4, do_sample=False, exit_layer=d)
    assert torch.equal(g_old, g_new)

    std = fam.config.initializer_range
    for block in list(big.exits[str(d)].layers)[-2:]:
        for path in BLOCK_LINEARS:
            w = block.get_submodule(path).weight
            if path in ("self_attn.o_proj", "mlp.down_proj"):
                assert torch.count_nonzero(w) == 0, path
            else:
                assert 0.6 * std < w.std().item() < 1.4 * std and abs(w.mean().item()) < 0.3 * std, path
        assert torch.equal(block.input_layernorm.weight, torch.ones_like(block.input_layernorm.weight))
    # every pre-existing tensor is carried over exactly
    new_sd = big.state_dict()
    for name, tensor in fam.state_dict().items():
        assert torch.equal(new_sd[name], tensor), name


def test_expand_is_exact_for_a_bf16_family_cast_with_to():
    fam = make_family([2, 5]).to(torch.bfloat16)  # `.to` also casts the rotary buffers: they are carried over
    ids = torch.randint(0, VOCAB, (2, 6))
    big = expand(fam, 2, 1)
    assert big.dtype == torch.bfloat16 and big.model.rotary_emb.inv_freq.dtype == torch.bfloat16
    assert_same_logits(all_logits(fam, ids), all_logits(big, ids))


def test_expand_random_init_follows_the_global_seed():
    fam = make_family([2, 5])
    torch.manual_seed(7)
    a = expand(fam, 2, 1)
    torch.manual_seed(7)
    b = expand(fam, 2, 1)
    torch.manual_seed(8)
    c = expand(fam, 2, 1)
    qa, qb, qc = (m.exits["2"].layers[1].self_attn.q_proj.weight for m in (a, b, c))
    assert torch.equal(qa, qb) and not torch.equal(qa, qc)


def test_expand_clone_copies_the_preceding_block_but_stays_identity():
    fam = make_family([2, 5])
    ids = torch.randint(0, VOCAB, (2, 6))
    big = expand(fam, 2, 2, init="clone")
    source = fam.member_layers(2)[-1]
    for block in list(big.exits["2"].layers)[1:]:
        for path in BLOCK_LINEARS:
            w = block.get_submodule(path).weight
            if path in ("self_attn.o_proj", "mlp.down_proj"):
                assert torch.count_nonzero(w) == 0
            else:
                assert torch.equal(w, source.get_submodule(path).weight), path
        assert torch.equal(block.self_attn.q_norm.weight, source.self_attn.q_norm.weight)
    assert_same_logits(all_logits(fam, ids), all_logits(big, ids))


def test_expand_twice_appends_and_keeps_low_rank_modules():
    fam = make_family([1, 3, 5])
    ids = torch.randint(0, VOCAB, (2, 6))
    once = expand(fam, 1, 1)
    with torch.no_grad():  # give the first block a nonzero function so the second expansion is a real test
        for p in once.exits["1"].layers[1].parameters():
            p.normal_(0.0, 0.05)
    small = decompose(once, ratio=0.5, include_head=False).model
    before = all_logits(small, ids)
    twice = expand(small, 1, 2)
    assert twice.config.dae_blocks == [3, 0, 0]
    assert twice.config.lowrank_ranks == small.config.lowrank_ranks
    lr = twice.exits["1"].layers[1].mlp.down_proj
    assert isinstance(lr, LowRankLinear)
    assert torch.equal(lr.weight_a, small.exits["1"].layers[1].mlp.down_proj.weight_a)
    assert_same_logits(before, all_logits(twice, ids))
    # clone of a decomposed block: its factors are multiplied back into the dense copy
    cloned = expand(small, 1, 1, init="clone")
    torch.testing.assert_close(
        cloned.exits["1"].layers[2].mlp.up_proj.weight,
        small.exits["1"].layers[1].mlp.up_proj.dense_weight(),
        atol=0,
        rtol=0,
    )


def test_expand_rejects_bad_arguments():
    fam = make_family([2, 5])
    with pytest.raises(ValueError, match="exit_layer=3"):
        expand(fam, 3, 1)
    with pytest.raises(ValueError, match="exit_layer=2.9 must be an integer"):  # never truncated to member 2
        expand(fam, 2.9, 1)
    with pytest.raises(ValueError, match="exit_layer=True must be an integer"):
        dae_trainable_parameters(fam, True)
    with pytest.raises(ValueError, match="num_blocks"):
        expand(fam, 2, 0)
    with pytest.raises(ValueError, match="init"):
        expand(fam, 2, 1, init="copy")


# --- what DaE trains ----------------------------------------------------------------------------
def test_trainable_set_is_blocks_norm_and_head():
    big = expand(make_family([2, 4, 6], num_layers=6), 2, 2)
    names = [n for n, _ in dae_trainable_parameters(big, 2)]
    expected = [
        n
        for n, _ in big.named_parameters()
        if n.startswith(("exits.2.layers.1.", "exits.2.layers.2.", "exits.2.norm.", "exits.2.lm_head."))
    ]
    assert names == expected and len(names) == 2 * 11 + 2
    assert not any(n.startswith("exits.2.layers.0.") for n in names)  # the original branch layer is frozen
    with pytest.raises(ValueError, match="no DaE blocks"):
        dae_trainable_parameters(big, 4)
    with pytest.raises(ValueError, match="shared_heads=True"):
        dae_trainable_parameters(expand(make_family([2, 5], shared=True), 2, 1), 2)


@pytest.mark.parametrize("d", [2, 6])
def test_training_dae_params_changes_only_that_member(d):
    big = expand(make_family([2, 4, 6], num_layers=6), d, 2)
    ids = torch.randint(0, VOCAB, (4, 8))
    before = all_logits(big, ids)
    frozen_before = {n: p.detach().clone() for n, p in big.named_parameters()}
    trainable = freeze_for_dae(big, d)
    assert {n for n, p in big.named_parameters() if p.requires_grad} == {n for n, _ in trainable}
    opt = torch.optim.AdamW([p for _, p in trainable], lr=1e-2, weight_decay=0.1)
    big.train()
    for _ in range(3):
        loss = big(ids, labels=ids, exit_layer=d).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    big.eval()
    after = all_logits(big, ids)
    others = [m for m in big.config.exit_layers if m != d]
    assert_same_logits(before, after, members=others)
    assert (after[d] - before[d]).abs().max() > 1e-4
    names = {n for n, _ in trainable}
    for n, p in big.named_parameters():
        if n not in names:
            assert torch.equal(p, frozen_before[n]), n


# --- low-rank algebra ---------------------------------------------------------------------------
def test_rank_for_ratio_matches_svd_llm_and_paper_shapes():
    assert rank_for_ratio(5120, 5120, 0.4) == 1536  # q/o of Qwen3-14B at 40%
    assert rank_for_ratio(1024, 5120, 0.4) == 512  # k/v
    assert rank_for_ratio(17408, 5120, 0.4) == 2373  # gate/up/down
    assert rank_for_ratio(4, 4, 0.99) == 1 and rank_for_ratio(3, 5, 0.0) == 1  # clipped to >= 1
    for m, n, r in [(32, 48, 0.3), (97, 32, 0.4), (16, 32, 0.75)]:
        k = rank_for_ratio(m, n, r)
        assert k * (m + n) <= (1 - r) * m * n < (k + 1) * (m + n)


@pytest.mark.parametrize("tokens", [200, 10])  # 10 < 24 features: rank-deficient Gram matrix (damping)
def test_svd_lowrank_reproduces_a_low_rank_weight_exactly(tokens):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(20, 3, generator=g, dtype=torch.float64) @ torch.randn(
        3, 24, generator=g, dtype=torch.float64
    )
    x = torch.randn(tokens, 24, generator=g, dtype=torch.float64)
    for gram in (None, x.T @ x):
        a, b, loss = svd_lowrank(w, 5, gram)
        assert a.shape == (5, 24) and b.shape == (20, 5)
        torch.testing.assert_close(b @ a, w, atol=1e-9, rtol=1e-9)
        assert loss < 1e-9


def test_whitened_truncation_beats_plain_svd_on_correlated_inputs():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(24, 32, generator=g, dtype=torch.float64)
    # correlated, anisotropic inputs: a few strong latent directions mixed into all features
    x = (
        torch.randn(500, 4, generator=g, dtype=torch.float64)
        @ torch.randn(4, 32, generator=g, dtype=torch.float64)
        * 3
    )
    x = x + 0.1 * torch.randn(500, 32, generator=g, dtype=torch.float64)
    gram = x.T @ x
    for rank in (2, 4, 8):
        a_w, b_w, loss_w = svd_lowrank(w, rank, gram)
        a_p, b_p, _ = svd_lowrank(w, rank)
        err_w = torch.linalg.norm((w - b_w @ a_w) @ x.T).item()
        err_p = torch.linalg.norm((w - b_p @ a_p) @ x.T).item()
        assert err_w < 0.7 * err_p, (rank, err_w, err_p)
        if rank >= 4:  # the 4 latent directions fit: only the small isotropic noise is left
            assert err_w < 0.05 * err_p, (rank, err_w, err_p)
        assert math.isclose(loss_w, err_w, rel_tol=1e-2), (loss_w, err_w)  # Eq. 5 from the singular values


def test_svd_lowrank_rejects_bad_input():
    with pytest.raises(ValueError, match="rank=0"):
        svd_lowrank(torch.randn(4, 5), 0)
    with pytest.raises(ValueError, match="gram must be 5 x 5"):
        svd_lowrank(torch.randn(4, 5), 2, torch.eye(4))


# --- decompose ----------------------------------------------------------------------------------
def trained_like(model, seed=3, std=0.05):
    """Gives every DaE block a nonzero function (freshly expanded blocks are the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for d in model.config.exit_layers:
            n_branch = model.config.branch_layers(d)
            for block in list(model.exits[str(d)].layers)[n_branch:]:
                for path in BLOCK_LINEARS:
                    w = block.get_submodule(path).weight
                    w.copy_(torch.randn(w.shape, generator=g) * std)
    return model


def calibration_batches(n=4, seq=32, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (2, seq), generator=g) for _ in range(n)]


def target_params(model, report):
    total = 0
    for m in report.matrices:
        total += sum(p.numel() for p in model.get_submodule(m.path).parameters())
    return total


@pytest.mark.parametrize("calibrated", [False, True])
def test_decompose_reproduces_low_rank_weights_exactly(calibrated):
    big = expand(make_family([1, 3, 5]), 1, 2)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for path in ["exits.1.lm_head"] + [f"exits.1.layers.{i}.{p}" for i in (1, 2) for p in BLOCK_LINEARS]:
            w = big.get_submodule(path).weight
            w.copy_(torch.randn(w.shape[0], 2, generator=g) @ torch.randn(2, w.shape[1], generator=g) * 0.1)
    ids = torch.randint(0, VOCAB, (2, 9))
    small = decompose(big, ratio=0.4, calibration=calibration_batches() if calibrated else None).model
    assert min(small.config.lowrank_ranks.values()) >= 2
    assert all(isinstance(small.get_submodule(p), LowRankLinear) for p in small.config.lowrank_ranks)
    assert_same_logits(all_logits(big, ids), all_logits(small, ids), atol=1e-5)


@pytest.mark.parametrize("allocation", ["uniform", "loss_aware"])
def test_decompose_reaches_the_ratio_within_rounding(allocation):
    big = trained_like(expand(make_family([2, 5]), 2, 3))
    ratio = 0.4
    result = decompose(big, ratio=ratio, calibration=calibration_batches(), allocation=allocation)
    small, rep = result.model, result.report
    assert rep.allocation == allocation and rep.calibrated and rep.calibration_tokens == 4 * 2 * 32
    assert len(rep.matrices) == 3 * 7 + 1 and not any(m.skipped for m in rep.matrices)
    # the report counts what the model really holds
    assert rep.params_before == target_params(big, rep)
    assert rep.params_after == target_params(small, rep)
    rounding = sum(m.shape[0] + m.shape[1] for m in rep.matrices) / rep.params_before
    assert ratio - 1e-9 <= rep.achieved_ratio <= ratio + rounding
    for group, achieved in rep.group_ratios.items():
        ms = [m for m in rep.matrices if m.group == group]
        slack = sum(m.shape[0] + m.shape[1] for m in ms) / sum(m.params_before for m in ms)
        assert ratio - 1e-6 <= achieved <= ratio + slack, group
    # the input is not modified, and the untouched member is bit-identical
    ids = torch.randint(0, VOCAB, (2, 8))
    assert big.config.lowrank_ranks == {}
    assert_same_logits(all_logits(big, ids), all_logits(small, ids), members=[5])


def test_loss_aware_allocation_spares_costly_matrices_and_averages_to_the_ratio():
    big = trained_like(expand(make_family([2, 5], hidden=48, heads=6, kv=3), 2, 2))
    with torch.no_grad():  # block 2 has much larger weights: larger truncation loss at the same ratio
        for p in big.exits["2"].layers[2].parameters():
            if p.ndim == 2:
                p.mul_(8.0)
    ratio = 0.4
    rep = decompose(
        big, ratio=ratio, calibration=calibration_batches(n=6, seq=48), allocation="loss_aware"
    ).report
    by_path = {m.path: m for m in rep.matrices}
    for kind in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        path1 = next(p for p in by_path if p.startswith("exits.2.layers.1.") and p.endswith(kind))
        path2 = next(p for p in by_path if p.startswith("exits.2.layers.2.") and p.endswith(kind))
        m1, m2 = by_path[path1], by_path[path2]
        assert m2.uniform_loss > math.e and m2.uniform_loss > m1.uniform_loss, kind
        # Eq. 6: the costlier matrix loses fewer parameters; the group's mean ratio is the target
        assert m2.allocated_ratio < m1.allocated_ratio and m2.rank >= m1.rank, kind
        assert abs((m1.allocated_ratio + m2.allocated_ratio) / 2 - ratio) < 1e-6, kind
    assert by_path["exits.2.lm_head"].allocated_ratio == pytest.approx(ratio)  # a group of one


def test_whitened_decomposition_beats_plain_svd_on_real_activations():
    big = trained_like(expand(make_family([2, 5]), 2, 2))
    cal = calibration_batches()
    plain_result = decompose(big, ratio=0.5, calibration=None)
    plain, report = plain_result.model, plain_result.report
    whitened = decompose(big, ratio=0.5, calibration=cal, allocation="uniform").model
    assert report.allocation == "uniform" and not report.calibrated
    paths = {m.path: 2 for m in report.matrices}
    grams, _ = collect_input_grams(big, paths, cal)

    def act_err(model, path):  # ||(W - W') X^T||_F from the Gram matrix of the original model's inputs
        diff = big.get_submodule(path).weight.double() - model.get_submodule(path).dense_weight().double()
        return torch.trace(diff @ grams[path] @ diff.T).clamp_min(0).sqrt().item()

    for path in grams:
        assert act_err(whitened, path) <= act_err(plain, path) * (1 + 1e-6), path
    ids = torch.cat(cal)
    ref = all_logits(big, ids)[2]
    err_w = (all_logits(whitened, ids)[2] - ref).pow(2).mean()
    err_p = (all_logits(plain, ids)[2] - ref).pow(2).mean()
    assert err_w < err_p


def test_decompose_save_load_round_trip(tmp_path):
    small = decompose(
        trained_like(expand(make_family([1, 3, 5]), 3, 1)), ratio=0.4, calibration=calibration_batches()
    ).model
    small.save_pretrained(tmp_path / "m")
    loaded = FamilialForCausalLM.from_pretrained(tmp_path / "m")
    assert loaded.config.lowrank_ranks == small.config.lowrank_ranks
    assert loaded.config.dae_blocks == [0, 1, 0]
    ids = torch.randint(0, VOCAB, (2, 8))
    assert_same_logits(all_logits(small, ids), all_logits(loaded, ids))


def test_decompose_leaves_matrices_dense_when_factors_would_not_be_smaller():
    # head_dim 1 and one KV head: k_proj / v_proj are 1 x 8, where any factorisation is larger
    big = trained_like(expand(make_family([2, 4], num_layers=4, hidden=8, heads=2, kv=1, head_dim=1), 2, 1))
    result = decompose(big, ratio=0.4, include_head=False)
    small = result.model
    skipped = {m.path for m in result.report.matrices if m.skipped}
    assert skipped == {"exits.2.layers.1.self_attn.k_proj", "exits.2.layers.1.self_attn.v_proj"}
    assert isinstance(small.exits["2"].layers[1].self_attn.k_proj, nn.Linear)
    assert "exits.2.layers.1.self_attn.k_proj" not in small.config.lowrank_ranks


def test_decompose_rejects_bad_input():
    big = expand(make_family([2, 5]), 2, 1)
    for bad in (0.0, 1.0, -0.1, True):
        with pytest.raises(ValueError, match="ratio"):
            decompose(big, ratio=bad)
    with pytest.raises(ValueError, match="allocation"):
        decompose(big, allocation="greedy")
    with pytest.raises(ValueError, match="no member has DaE blocks"):
        decompose(make_family([2, 5]))
    with pytest.raises(ValueError, match="shared_heads=True"):
        decompose(expand(make_family([2, 5], shared=True), 2, 1))
    with pytest.raises(
        ValueError, match=r"calibration batch 1 has token ids in \[97, 97\], outside the vocabulary 0..96"
    ):
        decompose(big, calibration=[torch.zeros(1, 4, dtype=torch.long), torch.full((1, 4), VOCAB)])
    with pytest.raises(ValueError, match="calibration batch 0 must be a B x T LongTensor"):
        decompose(big, calibration=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="nothing to decompose"):
        decompose(big, exit_layer=5, include_head=False)
    again = decompose(big, include_head=False).model
    with pytest.raises(ValueError, match="already low rank"):
        decompose(again, include_head=False)


def test_decompose_returns_the_new_model_and_its_report_and_leaves_the_input_alone():
    big = trained_like(expand(make_family([2, 5]), 2, 1))
    before = {k: v.clone() for k, v in big.state_dict().items()}
    result = decompose(big, ratio=0.5, include_head=False)
    assert isinstance(result, DecomposeResult) and isinstance(result.report, DecomposeReport)
    assert result.model is not big and not hasattr(result.model, "decompose_report")
    assert set(result.model.config.lowrank_ranks) == {m.path for m in result.report.matrices if not m.skipped}
    assert (
        all(torch.equal(before[k], v) for k, v in big.state_dict().items()) and not big.config.lowrank_ranks
    )


def test_decompose_one_member_without_dae_blocks_compresses_only_its_head():
    big = expand(make_family([2, 5]), 2, 1)
    ids = torch.randint(0, VOCAB, (2, 6))
    small = decompose(big, ratio=0.5, exit_layer=5).model
    assert list(small.config.lowrank_ranks) == ["exits.5.lm_head"]
    assert small.config.lowrank_ranks["exits.5.lm_head"] == rank_for_ratio(VOCAB, 32, 0.5)
    assert_same_logits(all_logits(big, ids), all_logits(small, ids), members=[2])
