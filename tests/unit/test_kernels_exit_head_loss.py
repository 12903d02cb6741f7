"""exit_head_loss: Triton (interpreter on CPU) and chunked paths against the naive reference.

Forward and backward over odd shapes (N, D, V not multiples of any tile), ignored rows, K = 1..4,
shared and per-exit heads, with and without exit norms, custom exit weights; all-ignored batches
(fp32/fp16, K = 1, 2, 4, shared and per-exit heads); that the chunked path never allocates an N x V
tensor (and that the naive path does); argument errors; the lazy-import contract; the conftest rule
that picks interpreter vs compiled Triton. Interpreter shapes are tiny (the interpreter is ~100x
slower than torch); the chunked path is also checked at larger shapes.

Markers (tests/conftest.py): ``triton_interpreter`` tests run Triton on CPU tensors and need
``TRITON_INTERPRET=1``; ``triton_cuda`` tests run the compiled kernels and need CUDA without it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from triton_kernels.ops.exit_head_loss import (
    exit_head_loss,
    exit_head_loss_chunked,
    exit_head_loss_reference,
)

REPO = Path(__file__).resolve().parents[2]
IGNORE = -100
INTERP = pytest.mark.triton_interpreter
#: impl values of exit_head_loss; "triton" on CPU tensors needs the interpreter.
IMPL_PARAMS = [pytest.param("triton", marks=INTERP), "chunked", "naive"]

# Per-dtype tolerances against the naive reference. fp16: the reference rounds logits and gradients
# to fp16 while the kernels accumulate in fp32, so differences of a few 1e-4 relative are expected.
LOSS_TOL = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}
GRAD_REL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def make_inputs(
    num_exits,
    num_tokens,
    dim,
    vocab,
    dtype,
    shared=True,
    with_norm=True,
    seed=0,
    logit_scale=1.0,
    ignore_every=4,
):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_exits, num_tokens, dim, generator=gen) * 2.0 + 0.5
    head_shape = (vocab, dim) if shared else (num_exits, vocab, dim)
    head = torch.randn(head_shape, generator=gen) * (logit_scale / dim**0.5)
    norm = 1.0 + 0.2 * torch.randn(num_exits, dim, generator=gen) if with_norm else None
    labels = torch.randint(0, vocab, (num_tokens,), generator=gen)
    if ignore_every:
        labels[::ignore_every] = IGNORE
        labels[1:4] = IGNORE  # a run of ignored tokens, straddling the first tile boundary
    as_leaf = lambda t: None if t is None else t.to(dtype).requires_grad_()  # noqa: E731
    return as_leaf(hidden), as_leaf(head), labels, as_leaf(norm)


def run(fn, hidden, head, labels, norm, exit_weights, per_exit_coef=0.3, **kwargs):
    """Loss, per-exit losses and gradients of loss + per_exit_coef * per_exit[-1] (tests both outputs)."""
    for t in (hidden, head, norm):
        if t is not None:
            t.grad = None
    loss, per_exit = fn(hidden, head, labels, norm, 1e-6, exit_weights, IGNORE, **kwargs)
    (loss + per_exit_coef * per_exit[-1]).backward()
    grads = [None if t is None else t.grad.detach().clone() for t in (hidden, head, norm)]
    return loss.detach(), per_exit.detach(), grads


def assert_matches(actual, expected, dtype):
    loss, per_exit, grads = actual
    ref_loss, ref_per_exit, ref_grads = expected
    assert loss.dtype == torch.float32 and per_exit.dtype == torch.float32
    assert per_exit.shape == ref_per_exit.shape
    torch.testing.assert_close(loss, ref_loss, **LOSS_TOL[dtype])
    torch.testing.assert_close(per_exit, ref_per_exit, **LOSS_TOL[dtype])
    for name, grad, ref in zip(("hidden", "lm_head_weight", "norm_weights"), grads, ref_grads):
        if ref is None:
            assert grad is None
            continue
        assert grad.dtype == ref.dtype and grad.shape == ref.shape, name
        assert torch.isfinite(grad).all(), name
        scale = ref.float().abs().max().clamp_min(1e-6)
        err = (grad.float() - ref.float()).abs().max() / scale
        assert err <= GRAD_REL[dtype], f"grad {name}: max error {err:.2e} of max |grad| {scale:.3e}"


def triton_fn(*args, config=None):
    from triton_kernels.ops.exit_head_loss_triton import exit_head_loss_triton

    hidden, head, labels, norm, eps, exit_weights, ignore_index = args
    weights = torch.as_tensor(exit_weights, dtype=torch.float32, device=hidden.device)
    return exit_head_loss_triton(hidden, head, labels, norm, eps, weights, ignore_index, config=config)


EXIT_WEIGHTS = [1.0, 0.5, 2.0, 0.25]
CASES = [  # (K, shared head, exit norms)
    (1, True, True),
    (1, False, False),
    (2, True, False),
    (2, False, True),
    (3, True, True),
    (3, False, True),
    (4, True, True),
    (4, False, False),
]


@INTERP
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("num_exits,shared,with_norm", CASES)
def test_triton_matches_reference(num_exits, shared, with_norm, dtype):
    # N=37, D=77, V=101: 3 token tiles, 2 D chunks and 2 vocab tiles at the interpreter's tile sizes.
    inputs = make_inputs(num_exits, 37, 77, 101, dtype, shared, with_norm, seed=num_exits)
    weights = EXIT_WEIGHTS[:num_exits]
    expected = run(exit_head_loss_reference, *inputs, weights)
    actual = run(triton_fn, *inputs, weights)
    assert_matches(actual, expected, dtype)


@INTERP
def test_triton_small_tiles_and_large_logits():
    # Many vocab/D tiles and logits around +-100: exp without the running max would overflow fp32.
    # 4 token tiles in launch groups of 3: a partial last group in the backward's grouped order.
    inputs = make_inputs(3, 53, 45, 101, torch.float32, shared=True, with_norm=True, seed=7, logit_scale=60.0)
    expected = run(exit_head_loss_reference, *inputs, [0.7, 1.3, 1.0])
    assert expected[0] > 20  # the logits really are large
    # num_warps / num_stages: the GPU tuning knobs pass through the launchers (no effect in the interpreter).
    config = dict(BLOCK_N=16, BLOCK_V=16, BLOCK_D=16, GROUP_N=3, num_warps=8, num_stages=2)
    actual = run(triton_fn, *inputs, [0.7, 1.3, 1.0], config=config)
    assert_matches(actual, expected, torch.float32)


def test_per_exit_losses_are_the_per_exit_cross_entropies():
    # Independent of the kernels: per-exit loss == F.cross_entropy(mean) of that exit's logits.
    hidden, head, labels, norm = make_inputs(2, 19, 16, 33, torch.float32, shared=False, with_norm=True)
    loss, per_exit, _ = run(exit_head_loss_chunked, hidden, head, labels, norm, [2.0, 3.0])
    for k in range(2):
        x = hidden[k].detach()
        y = norm[k].detach() * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
        ce = torch.nn.functional.cross_entropy(y @ head[k].detach().T, labels, ignore_index=IGNORE)
        torch.testing.assert_close(per_exit[k], ce, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, 2.0 * per_exit[0] + 3.0 * per_exit[1])


ALL_IGNORED_CASES = [  # (K, shared head, exit norms)
    (1, True, True),
    (1, False, False),
    (2, True, True),
    (2, False, True),
    (4, True, False),
    (4, False, True),
]


@pytest.mark.parametrize("impl", IMPL_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("num_exits,shared,with_norm", ALL_IGNORED_CASES)
def test_all_ignored_gives_zero_loss_and_zero_grads(num_exits, shared, with_norm, dtype, impl):
    # F.cross_entropy(reduction="mean") over no targets is 0/0 = NaN; the contract is 0 and zero grads.
    hidden, head, labels, norm = make_inputs(
        num_exits, 23, 33, 57, dtype, shared=shared, with_norm=with_norm, seed=num_exits
    )
    labels = torch.full_like(labels, IGNORE)
    weights = EXIT_WEIGHTS[:num_exits]
    loss, per_exit = exit_head_loss(hidden, head, labels, norm, exit_weights=weights, impl=impl)
    assert loss.dtype == torch.float32 and per_exit.shape == (num_exits,)
    (loss + 0.5 * per_exit.sum()).backward()
    assert loss.item() == 0.0 and torch.equal(per_exit.detach(), torch.zeros(num_exits))
    for name, t in zip(("hidden", "lm_head_weight", "norm_weights"), (hidden, head, norm)):
        if t is None:
            continue
        assert t.grad is not None and t.grad.dtype == dtype and t.grad.shape == t.shape, name
        assert torch.isfinite(t.grad).all() and not t.grad.any(), name


class _LargestTensor(TorchDispatchMode):
    """Records the largest storage (bytes) of any tensor an aten op returns while active."""

    def __init__(self):
        super().__init__()
        self.max_bytes = 0
        self.where = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                nbytes = t.untyped_storage().nbytes()
                if nbytes > self.max_bytes:
                    self.max_bytes, self.where = nbytes, (str(func), tuple(t.shape), t.dtype)
        return out


def _largest_tensor_of_forward_backward(fn, inputs, exit_weights, **kwargs):
    hidden, head, labels, norm = inputs
    with _LargestTensor() as probe:
        loss, per_exit = fn(hidden, head, labels, norm, 1e-6, exit_weights, IGNORE, **kwargs)
        (loss + per_exit.sum()).backward()
    assert hidden.grad is not None and head.grad is not None
    return probe


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per-exit"])
def test_chunked_never_allocates_n_by_v_but_naive_does(shared):
    # chunk (16) x K (2) = 32 rows << N = 509: every chunked buffer is K x chunk x V = 32 x V, while the
    # gradients themselves are K*N*D = 48k and (K x) V*D = 49k elements, both below N*V = 254k.
    num_tokens, vocab = 509, 499
    inputs = make_inputs(2, num_tokens, 48, vocab, torch.float32, shared=shared, with_norm=True, seed=2)
    limit = num_tokens * vocab * 4  # one fp32 N x V logits tensor, in bytes
    chunked = _largest_tensor_of_forward_backward(exit_head_loss_chunked, inputs, [1.0, 0.5], chunk_size=16)
    assert chunked.max_bytes < limit, (
        f"chunked allocated {chunked.max_bytes} B >= N*V*4 = {limit}: {chunked.where}"
    )
    assert chunked.max_bytes <= 4 * max(2 * 16 * vocab, inputs[0].numel(), inputs[1].numel()), chunked.where
    for t in inputs:
        if t is not None and t.requires_grad:
            t.grad = None
    naive = _largest_tensor_of_forward_backward(exit_head_loss_reference, inputs, [1.0, 0.5])
    assert naive.max_bytes >= limit, f"the probe missed the naive path's N x V logits: {naive.where}"


@INTERP
def test_triton_launcher_never_allocates_n_by_v():
    # The torch side of the Triton path (launchers, autograd Function) holds no N x V tensor either
    # (the interpreter's own numpy copies are not torch tensors; on GPU nothing else exists).
    num_tokens, vocab = 97, 131
    inputs = make_inputs(2, num_tokens, 24, vocab, torch.float32, shared=True, with_norm=True, seed=4)
    probe = _largest_tensor_of_forward_backward(triton_fn, inputs, [1.0, 0.5])
    assert probe.max_bytes < num_tokens * vocab * 4, probe.where


@pytest.mark.parametrize("impl", [pytest.param("triton", marks=INTERP), "chunked"])
def test_custom_ignore_index_and_default_exit_weights(impl):
    hidden, head, labels, norm = make_inputs(2, 29, 40, 70, torch.float32, shared=True, with_norm=False)
    labels[labels == IGNORE] = 5  # label 5 is now the ignored value
    results = {}
    for name in ("naive", impl):
        for t in (hidden, head):
            t.grad = None
        loss, per_exit = exit_head_loss(hidden, head, labels, ignore_index=5, impl=name)
        loss.backward()
        results[name] = (loss.detach(), per_exit.detach(), hidden.grad.clone(), head.grad.clone())
    torch.testing.assert_close(results["naive"][0], results["naive"][1].sum())  # weights default to 1
    for got, ref in zip(results[impl], results["naive"]):
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("impl", [pytest.param("triton", marks=INTERP), "chunked"])
def test_frozen_head_and_norm_get_no_grad(impl):
    hidden, head, labels, norm = make_inputs(2, 17, 32, 40, torch.float32, shared=True, with_norm=True)
    head.requires_grad_(False)
    norm.requires_grad_(False)
    loss, _ = exit_head_loss(hidden, head, labels, norm, impl=impl)
    loss.backward()
    ref_hidden = hidden.detach().clone().requires_grad_()
    exit_head_loss(ref_hidden, head, labels, norm, impl="naive")[0].backward()
    torch.testing.assert_close(hidden.grad, ref_hidden.grad, atol=2e-5, rtol=2e-5)
    assert head.grad is None and norm.grad is None


@pytest.mark.parametrize("impl", ["chunked", pytest.param("triton", marks=INTERP)])
def test_negative_and_zero_exit_weights(impl):
    # The chunked backward folds |scale| into the exponent; signs and zeros must survive.
    inputs = make_inputs(3, 23, 40, 67, torch.float32, shared=True, with_norm=True, seed=5)
    expected = run(exit_head_loss_reference, *inputs, [1.0, -0.5, 0.0], per_exit_coef=-0.7)
    fn = triton_fn if impl == "triton" else exit_head_loss_chunked
    actual = run(fn, *inputs, [1.0, -0.5, 0.0], per_exit_coef=-0.7)
    assert_matches(actual, expected, torch.float32)


# --- the GPU's fp16 operand path, run in the interpreter ---------------------------------------------
# On GPU, fp16 operands go to tl.dot in fp16 (DOT_IN_INPUT_DTYPE); the interpreter normally uses fp32
# dots, but its fp16 dot is faithful (fp16 inputs, fp32 accumulation), so the GPU path can be checked here.
GPU_FP16_DOTS = dict(DOT_IN_INPUT_DTYPE=True, INPUT_PRECISION="ieee")


@INTERP
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per-exit"])
def test_triton_fp16_dot_path_matches_reference(shared):
    inputs = make_inputs(3, 37, 77, 101, torch.float16, shared, True, seed=8)
    expected = run(exit_head_loss_reference, *inputs, EXIT_WEIGHTS[:3])
    actual = run(triton_fn, *inputs, EXIT_WEIGHTS[:3], config=GPU_FP16_DOTS)
    assert_matches(actual, expected, torch.float16)


@INTERP
@pytest.mark.parametrize("scale", [1e-7, 1e-4, 1.0, 2e5], ids=["tiny", "1/count@16k", "one", "loss-scaled"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per-exit"])
def test_triton_fp16_dz_neither_underflows_nor_overflows(shared, scale):
    # dz = scale * (softmax - onehot) with scale = upstream * w_k / count: ~6e-5 at N=16k tokens times
    # p ~ 1/V underflows fp16 (min subnormal 6e-8), and a GradScaler'd loss (65536 * w / few tokens)
    # overflows it (max 65504). The kernel casts only (softmax - onehot) / max|scale| to fp16 and applies
    # the scale to the fp32 dot results: its fp32 gradient buffers match an fp32 oracle at any scale.
    from triton_kernels.ops.exit_head_loss_triton import head_ce_backward, head_ce_forward

    num_exits, num_tokens, dim, vocab = 2, 37, 77, 101
    hidden, head, labels, _ = make_inputs(
        num_exits, num_tokens, dim, vocab, torch.float16, shared, False, seed=9
    )
    y, w = hidden.detach(), head.detach()
    exit_scale = torch.tensor([scale, -0.5 * scale], dtype=torch.float32)
    lse, _ = head_ce_forward(y, w, labels, IGNORE, config=GPU_FP16_DOTS)
    grad_y, grad_w = head_ce_backward(y, w, labels, lse, exit_scale, IGNORE, True, True, config=GPU_FP16_DOTS)

    # fp32 oracle on the same fp16 values.
    y32, w32 = y.float(), w.float()
    heads = w32.expand(num_exits, -1, -1) if shared else w32
    logits = torch.bmm(y32, heads.transpose(1, 2))
    valid = labels != IGNORE
    onehot = torch.nn.functional.one_hot(torch.where(valid, labels, 0), vocab).float()
    dz = (logits.softmax(-1) - onehot) * (exit_scale[:, None, None] * valid[None, :, None])
    ref_grad_y = torch.bmm(dz, heads)
    ref_grad_w = torch.bmm(dz.transpose(1, 2), y32)
    ref_grad_w = ref_grad_w.sum(0) if shared else ref_grad_w
    for name, got, ref in (("grad_y", grad_y, ref_grad_y), ("grad_w", grad_w, ref_grad_w)):
        assert got.dtype == torch.float32 and torch.isfinite(got).all(), name
        err = (got - ref).abs().max() / ref.abs().max()
        assert err < 3e-3, f"{name} at scale {scale}: max error {err:.2e} of max |grad| {ref.abs().max():.2e}"


# --- chunked path at larger shapes ---------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype,shared,with_norm,chunk_size",
    [
        (torch.float32, True, True, 64),
        (torch.float32, True, True, None),
        (torch.float32, False, True, 100),
        (torch.float32, True, False, 7),
        (torch.bfloat16, True, True, 128),
        (torch.bfloat16, False, True, None),  # one chunk: the backward reuses the forward's logits
        (torch.float16, False, False, 50),
    ],
)
def test_chunked_matches_reference(dtype, shared, with_norm, chunk_size):
    inputs = make_inputs(4, 513, 96, 1000, dtype, shared, with_norm, seed=3, ignore_every=3)
    expected = run(exit_head_loss_reference, *inputs, EXIT_WEIGHTS)
    actual = run(exit_head_loss_chunked, *inputs, EXIT_WEIGHTS, chunk_size=chunk_size)
    assert_matches(actual, expected, dtype)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per-exit"])
def test_chunked_single_chunk_kept_logits_survive_a_second_backward(shared):
    # One chunk (N <= chunk_size): the first backward consumes the forward's kept logits in place; a
    # second backward of the same graph (retain_graph) must recompute them and give the same gradients.
    hidden, head, labels, norm = make_inputs(3, 61, 24, 97, torch.float32, shared, True, seed=5)
    loss, per_exit = exit_head_loss_chunked(hidden, head, labels, norm, 1e-6, EXIT_WEIGHTS[:3], IGNORE)
    (loss + 0.3 * per_exit[-1]).backward(retain_graph=True)
    first = [t.grad.clone() for t in (hidden, head, norm)]
    for t in (hidden, head, norm):
        t.grad = None
    (loss + 0.3 * per_exit[-1]).backward()
    assert all(torch.equal(a, t.grad) for a, t in zip(first, (hidden, head, norm)))


def test_auto_is_chunked_on_cpu_and_module_wrapper():
    from triton_kernels import ExitHeadLoss

    inputs = make_inputs(3, 40, 24, 50, torch.float32, shared=True, with_norm=True)
    expected = run(exit_head_loss_reference, *inputs, [1.0, 0.5, 2.0])
    actual = run(
        lambda h, w, lab, nw, eps, ew, ii: exit_head_loss(h, w, lab, nw, eps, ew, ii),
        *inputs,
        [1.0, 0.5, 2.0],
    )
    assert_matches(actual, expected, torch.float32)
    module = ExitHeadLoss(exit_weights=[1.0, 0.5, 2.0], impl="chunked")
    hidden, head, labels, norm = inputs
    loss, per_exit = module(hidden, head, labels, norm_weights=norm)
    torch.testing.assert_close(loss.detach(), expected[0], atol=2e-5, rtol=2e-5)


def test_auto_resolves_per_device_and_the_chunk_budget_is_per_device():
    """`auto` runs the chunked loss on CUDA too (the Triton backward's atomics measured 12x the naive
    loss on an H200) and exit_confidence's kernel on CUDA; a CUDA chunk is 32x the CPU chunk (cuBLAS
    needs hundreds of rows), and never below 16 tokens."""
    from triton_kernels.ops import exit_head_loss as ehl
    from triton_kernels.ops.utils import resolve_impl

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert ehl.CUDA_DEFAULT_IMPL == "chunked"
    assert resolve_impl("auto", cuda, cuda_default=ehl.CUDA_DEFAULT_IMPL) == "chunked"
    assert resolve_impl("auto", cuda) == "triton" and resolve_impl("auto", cpu) == "chunked"
    assert resolve_impl("triton", cpu, cuda_default="chunked") == "triton"  # explicit choices stand
    assert ehl.default_chunk_size(4, 128256, "cuda") == 2**29 // (4 * 128256) == 1046
    assert ehl.default_chunk_size(4, 128256) == ehl.default_chunk_size(4, 128256, "cpu") == 32
    assert ehl.default_chunk_size(64, 2**20, "cuda") == 16


@pytest.mark.triton_cuda
def test_auto_on_cuda_is_the_chunked_loss():
    hidden, head, labels, norm = make_inputs(4, 1001, 257, 5003, torch.bfloat16, True, True, seed=3)
    to_cuda = lambda t: t.detach().cuda()  # noqa: E731
    args = (to_cuda(hidden), to_cuda(head), labels.cuda(), to_cuda(norm))
    auto, _ = exit_head_loss(*args, impl="auto")
    chunked, _ = exit_head_loss_chunked(*args, chunk_size=2**29 // (4 * 5003))
    assert torch.equal(auto, chunked)


# --- argument errors -----------------------------------------------------------------------------


def _good():
    hidden = torch.randn(3, 10, 8)
    return dict(
        hidden=hidden,
        lm_head_weight=torch.randn(20, 8),
        labels=torch.randint(0, 20, (10,)),
        norm_weights=torch.ones(3, 8),
    )


@pytest.mark.parametrize(
    "change,pattern",
    [
        (dict(impl="cuda"), r"impl must be one of .*'cuda'"),
        (dict(hidden=torch.randn(10, 8)), r"hidden must be a K x N x D tensor.*got 10 x 8"),
        (dict(norm_weights=torch.ones(2, 8)), r"norm_weights must be K x D = 3 x 8.*got 2 x 8"),
        (dict(norm_weights=torch.ones(3, 9)), r"norm_weights must be K x D = 3 x 8.*got 3 x 9"),
        (
            dict(lm_head_weight=torch.randn(20, 9)),
            r"lm_head_weight must be V x D with D=8.*3 x 10 x 8.*got 20 x 9",
        ),
        (
            dict(lm_head_weight=torch.randn(2, 20, 8)),
            r"per-exit lm_head_weight must be K x V x D with K=3.*got 2 x 20 x 8",
        ),
        (dict(labels=torch.randint(0, 20, (11,))), r"labels must be a 1-D tensor of N=10.*got 11"),
        (dict(labels=torch.randint(0, 20, (2, 5))), r"labels must be a 1-D tensor of N=10.*got 2 x 5"),
        (dict(labels=torch.full((10,), 20)), r"labels must be in \[0, 20\)"),
        (dict(exit_weights=[1.0, 2.0]), r"exit_weights must have K=3 entries.*got 2"),
        (
            dict(lm_head_weight=torch.randn(20, 8, dtype=torch.float64)),
            r"lm_head_weight has dtype torch.float64",
        ),
    ],
)
def test_bad_arguments_raise_value_error(change, pattern):
    kwargs = {**_good(), **change}
    with pytest.raises(ValueError, match=pattern):
        exit_head_loss(**kwargs)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        exit_head_loss(**_good(), impl="triton")


def test_import_is_lazy():
    code = (
        "import sys, triton_kernels\n"
        "assert 'torch' not in sys.modules and 'triton' not in sys.modules\n"
        "import torch\n"
        "from triton_kernels import exit_head_loss, exit_confidence, ExitHeadLoss, ExitConfidence\n"
        "h = torch.randn(2, 5, 8, requires_grad=True)\n"
        "loss, _ = exit_head_loss(h, torch.randn(11, 8), torch.randint(0, 11, (5,)), torch.ones(2, 8))\n"
        "loss.backward()\n"
        "exit_confidence(torch.randn(3, 8), None, torch.randn(11, 8))\n"
        "assert 'triton' not in sys.modules, 'triton imported by a CPU call'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr


# --- interpreter vs compiled Triton (tests/conftest.py) ----------------------------------------------


@pytest.mark.parametrize(
    "environ,cuda,expected",
    [
        ({}, False, "1"),  # CPU only: the interpreter
        ({}, True, None),  # a GPU: compiled kernels, the flag stays unset
        ({"TRITON_INTERPRET": "0"}, False, "0"),  # an explicit user value is kept ...
        ({"TRITON_INTERPRET": "1"}, True, "1"),  # ... either way
    ],
)
def test_conftest_sets_the_interpreter_only_without_cuda(triton_mode, environ, cuda, expected):
    environ = dict(environ)
    triton_mode.decide(environ, cuda)
    assert environ.get("TRITON_INTERPRET") == expected


def test_conftest_refuses_to_set_the_flag_after_import_triton(triton_mode):
    # triton.language decorates its helpers at import: a flag set later gives a half-compiled Triton.
    with pytest.raises(RuntimeError, match="triton was imported before TRITON_INTERPRET"):
        triton_mode.decide({}, False, triton_imported=True)
    environ = {"TRITON_INTERPRET": "1"}
    triton_mode.decide(environ, False, triton_imported=True)  # set by the user: nothing to do, no error
    environ = {}
    triton_mode.decide(environ, True, triton_imported=True)  # a GPU: the flag stays unset, no error
    assert environ == {}


def test_this_session_follows_the_conftest_rule(triton_mode):
    assert triton_mode.cuda_available == torch.cuda.is_available()
    if not triton_mode.from_user:
        assert (os.environ.get("TRITON_INTERPRET") == "1") == (not triton_mode.cuda_available)
    assert triton_mode.interpreting == (os.environ.get("TRITON_INTERPRET") == "1")
    # The flag matters where @triton.jit decorates: our kernels, and triton.language's own jit helpers
    # (decorated at `import triton`, hence the flag must precede it), are interpreted iff the session says so.
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    from triton_kernels.ops.exit_head_loss_triton import _exit_ce_bwd_kernel, _exit_ce_fwd_kernel

    for kernel in (_exit_ce_fwd_kernel, _exit_ce_bwd_kernel, tl.zeros):
        assert isinstance(kernel, InterpretedFunction) == triton_mode.interpreting, kernel


def test_importing_torch_does_not_import_triton():
    # Why conftest may decide TRITON_INTERPRET after `import torch` and torch.cuda.is_available().
    code = (
        "import sys, torch\n"
        "torch.cuda.is_available()\n"
        "assert 'triton' not in sys.modules, 'import torch imported triton'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr


# --- GPU only (skipped on CPU): bf16 and a realistic shape on the compiled kernels -----------------


@pytest.mark.triton_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shared", [True, False])
def test_triton_cuda_matches_reference(dtype, shared):
    hidden, head, labels, norm = make_inputs(4, 1001, 257, 5003, dtype, shared, True, seed=11)
    to_cuda = lambda t: None if t is None else t.detach().cuda().requires_grad_()  # noqa: E731
    inputs = (to_cuda(hidden), to_cuda(head), labels.cuda(), to_cuda(norm))
    expected = run(exit_head_loss_reference, *inputs, EXIT_WEIGHTS)
    actual = run(triton_fn, *inputs, EXIT_WEIGHTS)
    assert_matches(actual, expected, dtype)
