"""exit_confidence: Triton (interpreter on CPU) and chunked paths against the torch reference.

Checks argmax, max softmax probability and entropy on odd shapes, with and without the exit norm,
across vocabulary splits (the merge), exact ties (lowest id wins), large logits, uniform logits (known
answers), and argument errors.

Markers (tests/conftest.py): ``triton_interpreter`` tests run Triton on CPU tensors and need
``TRITON_INTERPRET=1``; ``triton_cuda`` tests run the compiled kernels and need CUDA without it.
"""

from __future__ import annotations

import math

import pytest
import torch

from triton_kernels.ops.exit_confidence import (
    exit_confidence,
    exit_confidence_chunked,
    exit_confidence_reference,
)
from triton_kernels.ops.utils import rms_norm_reference

INTERP = pytest.mark.triton_interpreter
IMPL_PARAMS = [pytest.param("triton", marks=INTERP), "chunked", "naive"]


def make_inputs(rows, dim, vocab, dtype, with_norm=True, seed=0, logit_scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(rows, dim, generator=gen) * 2.0 + 0.3).to(dtype)
    head = (torch.randn(vocab, dim, generator=gen) * (logit_scale / dim**0.5)).to(dtype)
    norm = (1.0 + 0.2 * torch.randn(dim, generator=gen)).to(dtype) if with_norm else None
    return hidden, norm, head


def fp32_logits_oracle(hidden, norm, head, eps=1e-6):
    """What the fused paths compute: the norm in the input dtype, then fp32 logits (no fp16 rounding)."""
    y = hidden if norm is None else rms_norm_reference(hidden, norm, eps)
    logits = y.float() @ head.float().T
    log_probs = torch.log_softmax(logits, -1)
    return logits.argmax(-1), log_probs.amax(-1).exp(), -(log_probs.exp() * log_probs).sum(-1)


def triton_fn(hidden, norm, head, **config):
    from triton_kernels.ops.exit_confidence_triton import exit_confidence_triton

    return exit_confidence_triton(hidden, norm, head, config=config or None)


def assert_stats_close(actual, expected, atol):
    token_ids, max_prob, entropy = actual
    assert (
        token_ids.dtype == torch.long and max_prob.dtype == torch.float32 and entropy.dtype == torch.float32
    )
    assert torch.equal(token_ids, expected[0])
    torch.testing.assert_close(max_prob, expected[1], atol=atol, rtol=atol)
    torch.testing.assert_close(entropy, expected[2], atol=atol, rtol=atol)


@INTERP
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("with_norm", [True, False], ids=["norm", "no-norm"])
@pytest.mark.parametrize("config", [{}, dict(splits=3, BLOCK_V=32, BLOCK_D=16)], ids=["default", "3-splits"])
def test_triton_matches_reference(dtype, with_norm, config):
    # B=37, D=77, V=301: partial row tile, partial D chunk, partial vocab tile (and split).
    hidden, norm, head = make_inputs(37, 77, 301, dtype, with_norm, seed=1)
    actual = triton_fn(hidden, norm, head, **config)
    # Tight against the fp32-logits oracle (same math), looser against the reference, which rounds
    # fp16 logits before the softmax.
    assert_stats_close(actual, fp32_logits_oracle(hidden, norm, head), atol=2e-5)
    ref = exit_confidence_reference(hidden, norm, head)
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(actual[1], ref[1], atol=tol, rtol=tol)
    torch.testing.assert_close(actual[2], ref[2], atol=tol, rtol=tol)
    if dtype == torch.float32:
        assert torch.equal(actual[0], ref[0])


@INTERP
def test_triton_large_logits_are_stable():
    hidden, norm, head = make_inputs(20, 40, 150, torch.float32, seed=2, logit_scale=80.0)
    expected = exit_confidence_reference(hidden, norm, head)
    assert expected[1].min() > 0.0 and (expected[1] > 0.999).any()  # peaked softmax: logits ~ 100s
    assert_stats_close(triton_fn(hidden, norm, head, splits=2, BLOCK_V=32), expected, atol=1e-5)
    # logits of ~100: one fp32 ulp is 7.6e-6, and the chunked path's matmul sums in another order (MKL
    # blocks by row count; with the stages' MKL_CBWR=AVX2 pin on an AVX-512 Intel CPU, one entropy of
    # the 20 moved by 1.7e-5)
    assert_stats_close(exit_confidence_chunked(hidden, norm, head, chunk_size=3), expected, atol=5e-5)


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_ties_pick_the_lowest_token_id(impl):
    # Small integers: every logit is exact, so ties are exact. With BLOCK_V=32 the triton path has two
    # splits (ids 0-63, 64-100): ids 3 and 40 tie across tiles of one split, 90 across splits, and
    # 7 and 8 inside one tile.
    vocab, dim = 101, 16
    head = torch.zeros(vocab, dim)
    for token in (3, 40, 90):
        head[token, 0] = 2.0
    head[7, 1] = 2.0
    head[8, 1] = 2.0  # second tie inside one tile: 7 vs 8
    hidden = torch.zeros(4, dim)
    hidden[0, 0] = 1.0
    hidden[1, 1] = 1.0
    hidden[2, 0] = 1.0
    hidden[2, 1] = 1.0  # 7, 8 tie with 3, 40, 90 -> 3
    hidden[3, 2] = 1.0  # all logits 0 -> id 0
    if impl == "triton":
        token_ids = triton_fn(hidden, None, head, splits=3, BLOCK_V=32, BLOCK_D=16)[0]
    else:
        token_ids = exit_confidence(hidden, None, head, impl=impl)[0]
    assert token_ids.tolist() == [3, 7, 3, 0]


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_uniform_logits_have_known_statistics(impl):
    vocab = 97
    hidden, norm, head = make_inputs(5, 24, vocab, torch.float32)
    head = torch.zeros_like(head)
    token_ids, max_prob, entropy = exit_confidence(hidden, norm, head, impl=impl)
    assert token_ids.tolist() == [0] * 5
    torch.testing.assert_close(max_prob, torch.full((5,), 1.0 / vocab))
    torch.testing.assert_close(entropy, torch.full((5,), math.log(vocab)))


@pytest.mark.parametrize(
    "dtype,with_norm,chunk_size",
    [
        (torch.float32, True, 7),
        (torch.float32, False, None),
        (torch.bfloat16, True, 64),
        (torch.float16, True, 100),
    ],
)
def test_chunked_matches_reference(dtype, with_norm, chunk_size):
    hidden, norm, head = make_inputs(300, 64, 5000, dtype, with_norm, seed=4)
    expected = exit_confidence_reference(hidden, norm, head)
    actual = exit_confidence_chunked(hidden, norm, head, chunk_size=chunk_size)
    # Same logits (same matmul in the input dtype), so only the softmax summation order differs.
    assert_stats_close(actual, expected, atol=1e-5)


def test_auto_and_module_wrapper():
    from triton_kernels import ExitConfidence

    hidden, norm, head = make_inputs(9, 32, 77, torch.float32)
    expected = exit_confidence_reference(hidden, norm, head)
    assert_stats_close(exit_confidence(hidden, norm, head), expected, atol=1e-5)
    assert_stats_close(ExitConfidence(impl="chunked")(hidden, norm, head), expected, atol=1e-5)


@pytest.mark.parametrize(
    "change,pattern",
    [
        (dict(impl="fast"), r"impl must be one of .*'fast'"),
        (dict(hidden=torch.randn(2, 5, 8)), r"hidden must be a B x D tensor.*got 2 x 5 x 8"),
        (dict(norm_weight=torch.ones(9)), r"norm_weight must have shape \(D,\) = \(8,\).*got 9"),
        (
            dict(lm_head_weight=torch.randn(20, 9)),
            r"lm_head_weight must be V x D with D=8.*5 x 8.*got 20 x 9",
        ),
        (dict(lm_head_weight=torch.randn(20, 8).half()), r"lm_head_weight has dtype torch.float16"),
    ],
)
def test_bad_arguments_raise_value_error(change, pattern):
    kwargs = dict(hidden=torch.randn(5, 8), norm_weight=torch.ones(8), lm_head_weight=torch.randn(20, 8))
    kwargs.update(change)
    with pytest.raises(ValueError, match=pattern):
        exit_confidence(**kwargs)


@pytest.mark.triton_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows", [1, 300])
def test_triton_cuda_matches_oracle(dtype, rows):
    hidden, norm, head = (t.cuda() for t in make_inputs(rows, 512, 32003, dtype, seed=5))
    expected = fp32_logits_oracle(hidden, norm, head)
    actual = exit_confidence(hidden, norm, head, impl="triton")
    torch.testing.assert_close(actual[1], expected[1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(actual[2], expected[2], atol=1e-4, rtol=1e-4)
    agree = (actual[0] == expected[0]).float().mean().item()
    assert agree > 0.99  # near-ties may flip under a different summation order
