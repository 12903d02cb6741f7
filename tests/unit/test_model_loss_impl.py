"""FamilialForCausalLM's multi-exit loss: every `config.loss_impl` against `loss_impl="naive"`.

The model computes `loss = sum_k w_k * CE_k` with `triton_kernels.exit_head_loss(..., impl=config.loss_impl)`.
For each implementation ("chunked", and "triton" under the interpreter on CPU) the total loss, the
per-exit losses and the gradient of every parameter must equal the naive path's, on:

- per-exit heads and shared heads;
- a DaE-expanded member (`ruyi_model.expand`; its zero-residual blocks perturbed so that they are
  active and get real gradients);
- a member whose head was decomposed (`ruyi_model.decompose`): the head is a `LowRankLinear` and the
  loss reads `dense_weight()`, so the gradients reach `weight_a` / `weight_b` through `B @ A`.

The naive path itself is pinned to the members' own forward (`exit_layer=d`, stock cross-entropy),
so an error shared by all impls would not pass either. Tiny shapes (vocab 97, hidden 32, 4 layers,
fp32): the Triton interpreter runs one forward and one backward per case.
"""

from __future__ import annotations

import pytest
import torch

from ruyi_model import FamilialConfig, FamilialForCausalLM, decompose, expand
from ruyi_model.modeling import LowRankLinear

VOCAB = 97
EXITS = [1, 3, 4]
WEIGHTS = [0.5, 1.5, 1.0]
LOSS_TOL = dict(atol=1e-5, rtol=1e-5)
GRAD_TOL = dict(atol=1e-6, rtol=1e-4)


def make_family(shared: bool, seed: int = 0) -> FamilialForCausalLM:
    torch.manual_seed(seed)
    cfg = FamilialConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=67,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        exit_layers=EXITS,
        exit_branch_layers=1,
        shared_heads=shared,
    )
    return FamilialForCausalLM(cfg).train()


def family(variant: str) -> FamilialForCausalLM:
    if variant == "per-exit":
        return make_family(shared=False)
    if variant == "shared":
        return make_family(shared=True)
    if variant == "dae":
        fam = expand(make_family(shared=False), exit_layer=3, num_blocks=2)
        # Zero-residual blocks are the identity with zero gradients upstream of o_proj/down_proj: make them
        # active (as after DaE training) so that every block parameter gets a real gradient.
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for layer in fam.exits["3"].layers[1:]:
                for linear in (layer.self_attn.o_proj, layer.mlp.down_proj):
                    linear.weight.copy_(0.05 * torch.randn(linear.weight.shape, generator=gen))
        assert fam.config.dae_blocks == [0, 2, 0]
        return fam.train()
    if variant == "lowrank-head":
        fam = decompose(
            make_family(shared=False), ratio=0.4, include_head=True, exit_layer=1, allocation="uniform"
        ).model
        assert isinstance(fam.exits["1"].lm_head, LowRankLinear)
        assert set(fam.config.lowrank_ranks) == {"exits.1.lm_head"}
        return fam.train()
    raise AssertionError(variant)


def batch(seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 11), generator=gen)
    labels = ids.clone()
    labels[0, :4] = -100  # ignored positions (plus the last position of each row after the shift)
    return ids, labels


def multi_exit(fam: FamilialForCausalLM, impl: str, ids, labels):
    """(loss, {exit: CE_k}, {param name: grad}) of the multi-exit loss with `loss_impl=impl`."""
    fam.zero_grad(set_to_none=True)
    fam.config.loss_impl = impl
    out = fam(ids, labels=labels, exit_loss_weights=WEIGHTS)
    assert out.logits is None and set(out.exit_losses) == set(EXITS)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in fam.named_parameters() if p.grad is not None}
    return out.loss.detach(), {d: v.detach() for d, v in out.exit_losses.items()}, grads


VARIANTS = ["per-exit", "shared", "dae", "lowrank-head"]
IMPLS = ["chunked", pytest.param("triton", marks=pytest.mark.triton_interpreter)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_loss_impl_matches_naive(variant, impl):
    fam = family(variant)
    ids, labels = batch()
    ref_loss, ref_exits, ref_grads = multi_exit(fam, "naive", ids, labels)
    loss, exits, grads = multi_exit(fam, impl, ids, labels)

    torch.testing.assert_close(loss, ref_loss, **LOSS_TOL)
    for d in EXITS:
        torch.testing.assert_close(exits[d], ref_exits[d], **LOSS_TOL, msg=f"exit {d}")
    # The same parameters get gradients (all of them here: every layer feeds some exit) ...
    assert set(grads) == set(ref_grads)
    assert set(ref_grads) == {n for n, _ in fam.named_parameters()}
    # ... and the same gradients.
    for name, ref in ref_grads.items():
        assert torch.isfinite(grads[name]).all(), name
        torch.testing.assert_close(grads[name], ref, **GRAD_TOL, msg=f"{variant}/{impl}: grad {name}")
    if variant == "lowrank-head":
        for factor in ("weight_a", "weight_b"):
            assert grads[f"exits.1.lm_head.{factor}"].abs().max() > 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_naive_multi_exit_equals_the_members_own_losses(variant):
    # The oracle of the oracle: each CE_k is member k's own forward loss (its LowRankLinear head, DaE
    # blocks, shared or own head), and the total is the weighted sum, losses and gradients.
    fam = family(variant)
    ids, labels = batch()
    loss, exits, grads = multi_exit(fam, "naive", ids, labels)
    fam.zero_grad(set_to_none=True)
    members = {d: fam(ids, exit_layer=d, labels=labels).loss for d in EXITS}
    for d in EXITS:
        torch.testing.assert_close(exits[d], members[d].detach(), **LOSS_TOL, msg=f"exit {d}")
    total = sum(w * members[d] for w, d in zip(WEIGHTS, EXITS))
    torch.testing.assert_close(loss, total.detach(), **LOSS_TOL)
    total.backward()
    for name, p in fam.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, **GRAD_TOL, msg=f"{variant}: grad {name}")
