"""The edge's privacy mapping (ruyi_model/privacy.py): shapes, irreversibility, noise, KL, the contract."""

from __future__ import annotations

import math

import pytest
import torch

from ruyi_model.privacy import FeatureContract, FeatureContractError, PrivacyMapping, kl_to_standard_normal


@pytest.fixture
def mapping() -> PrivacyMapping:
    torch.manual_seed(0)
    m = PrivacyMapping(48, 8, hidden=32)
    m.set_standardization(torch.randn(200, 48) * 3 + 1)
    return m.eval()


def test_shapes_and_dimension_reduction(mapping: PrivacyMapping) -> None:
    out = mapping(torch.randn(5, 48))
    assert out.z.shape == out.mu.shape == out.logvar.shape == (5, 8)
    with pytest.raises(ValueError, match="dimension reduction"):
        PrivacyMapping(16, 16)
    with pytest.raises(ValueError, match=r"expects \[N, 48\] features, got \[5, 47\]"):
        mapping(torch.randn(5, 47))


def test_different_inputs_share_one_output_distribution(mapping: PrivacyMapping) -> None:
    x = torch.randn(6, 48)
    y = mapping.collision(x, scale=5.0)
    assert torch.allclose((x - y).norm(dim=-1), torch.full((6,), 5.0), atol=1e-4)
    (mx, lx), (my, ly) = mapping.encode(x), mapping.encode(y)
    assert torch.allclose(mx, my, atol=1e-4) and torch.allclose(lx, ly, atol=1e-4)
    # the released samples with the same noise are identical: nothing downstream can tell x from y
    zx = mapping.release(x, torch.Generator().manual_seed(1))
    zy = mapping.release(y, torch.Generator().manual_seed(1))
    assert torch.allclose(zx, zy, atol=1e-4)


def test_jacobian_rank_is_below_input_dim_and_vanishes_on_the_kernel(mapping: PrivacyMapping) -> None:
    basis = mapping.kernel_basis()
    assert basis.shape == (48 - 8, 48)
    assert torch.allclose(basis @ basis.T, torch.eye(40, dtype=basis.dtype), atol=1e-8)
    x = torch.randn(48, dtype=torch.float64)
    m64 = mapping.double()
    jac = torch.autograd.functional.jacobian(lambda v: m64.encode(v[None])[0][0], x)  # [8, 48]
    assert torch.linalg.matrix_rank(jac) <= 8 < 48
    assert (jac @ basis.T).abs().max() < 1e-10
    # ...while a direction outside the kernel does move the output
    assert (jac @ mapping.waist.weight.detach().double()[0]).abs().max() > 1e-6


def test_noise_floor_and_release_modes(mapping: PrivacyMapping) -> None:
    x = torch.randn(4, 48)
    with torch.no_grad():
        mapping.logvar.bias.fill_(-100.0)  # the encoder tries to switch the noise off
    mu, logvar = mapping.encode(x)
    assert torch.all(logvar >= mapping.min_logvar)
    assert mapping.min_noise_std() == pytest.approx(math.exp(-3.0))
    z1, z2 = mapping.release(x), mapping.release(x)
    assert not torch.equal(z1, z2)  # eval-mode release still samples
    assert (z1 - mu).std() > 0.5 * mapping.min_noise_std()
    same = [mapping.release(x, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(same[0], same[1])
    mapping.stochastic_release = False  # the documented deterministic option: mu, no noise
    assert torch.equal(mapping.release(x), mu.detach()) and mapping.min_noise_std() == 0.0
    mapping.train()
    assert not torch.equal(mapping(x).z, mapping(x).z)  # training always samples


def test_kl_term() -> None:
    mu, logvar = torch.randn(10, 8), torch.randn(10, 8)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros(8), torch.ones(8))
    expected = torch.distributions.kl_divergence(q, p).sum(-1).mean()
    assert torch.allclose(kl_to_standard_normal(mu, logvar), expected, atol=1e-5)
    assert kl_to_standard_normal(torch.zeros(3, 8), torch.zeros(3, 8)) == 0


def test_contract_accepts_released_features_and_rejects_the_rest(mapping: PrivacyMapping) -> None:
    contract = mapping.contract
    z = mapping.release(torch.randn(3, 48))
    assert contract.check(z) is z
    bad = [
        (torch.randint(0, 255, (3, 64, 64, 3), dtype=torch.uint8), "raw pixels"),
        (torch.rand(2, 3, 64, 64), "raw pixels are refused"),
        (torch.rand(3, 9), "expected 8 features per row, got 9"),
        (torch.rand(8), r"expected shape \[N, 8\]"),
        (torch.rand(3, 8, dtype=torch.float64), "dtype torch.float64, expected torch.float32"),
        (torch.full((2, 8), float("nan")), "NaN"),
        (torch.rand(0, 8), "0 rows"),
        ([[0.0] * 8], "expected a torch.Tensor, got list"),
    ]
    for tensor, message in bad:
        with pytest.raises(FeatureContractError, match=message):
            contract.check(tensor)
    assert FeatureContract.from_dict(contract.to_dict()) == contract
    with pytest.raises(ValueError, match="unknown dtype"):
        FeatureContract.from_dict({"dim": 8, "dtype": "pixels"})
