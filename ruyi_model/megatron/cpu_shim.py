"""The one place where megatron-core 0.16 is taught to run without CUDA (gloo, CPU tensors).

megatron-core assumes a GPU in a few places that the family's model needs: tensors are allocated on
`torch.cuda.current_device()`, the tensor-parallel RNG tracker forks CUDA generator states, and the
optimizer / pipeline schedules create `device="cuda"` tensors and call `Tensor.cuda()`, and gradient
clipping asserts CUDA gradients. Nothing here
changes the numerics of megatron-core; it only redirects device placement and RNG bookkeeping to the
CPU. Every function is a no-op when CUDA is present, so the same code runs unchanged on GPUs.

    apply_cpu_shim()                     # before building megatron modules (idempotent)
    install_cpu_rng_tracker(seed)        # after parallel_state.initialize_model_parallel
    with cpu_device_mode(): ...          # around megatron optimizer steps / pipeline schedules
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_applied = False


def cuda_available() -> bool:
    return torch.cuda.is_available()


def apply_cpu_shim() -> bool:
    """Makes `torch.cuda.current_device()` answer "cpu" when there is no CUDA. Returns True if applied."""
    global _applied
    if cuda_available():
        return False
    if not _applied:
        torch.cuda.current_device = lambda: "cpu"
        _patch_grad_clipping()
        _applied = True
    return True


def _patch_grad_clipping() -> None:
    """megatron's `clip_grad_by_total_norm_fp32` asserts `torch.cuda.FloatTensor` gradients; on the CPU
    the optimizer gets the same scaling (`max_norm / (total_norm + 1e-6)`, only when < 1) without
    the assertion. The norm itself is megatron's own `get_grad_norm_fp32` (its local multi-tensor
    fallback, under `cpu_device_mode`)."""
    from megatron.core.optimizer import optimizer as moptimizer

    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        attr = "decoupled_grad" if use_decoupled_grad else "grad"
        grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
        clip_coeff = max_norm / (total_norm + 1.0e-6)
        if clip_coeff < 1.0 and grads:
            torch._foreach_mul_(grads, clip_coeff)

    moptimizer.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32


def _cpu_rng_tracker_class():
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """megatron's RNG tracker with the CPU generator in place of the CUDA one (same contract)."""

        def add(self, name, seed):
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    return CpuRNGStatesTracker


def install_cpu_rng_tracker(seed: int) -> None:
    """Seeds megatron's model-parallel RNG states (as `model_parallel_cuda_manual_seed`), on the CPU
    generator when there is no CUDA. Call after `parallel_state.initialize_model_parallel`."""
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import random as mrandom

    if not cuda_available():
        apply_cpu_shim()
        mrandom._CUDA_RNG_STATE_TRACKER = _cpu_rng_tracker_class()()
        mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


class _CpuDeviceMode(TorchFunctionMode):
    """Maps `device="cuda"` (or a cuda torch.device) in torch calls to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        dev = kwargs.get("device")
        if dev is not None and torch.device(dev).type == "cuda":
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


@contextlib.contextmanager
def cpu_device_mode():
    """Within the block, `device="cuda"` tensors are created on the CPU, `Tensor.cuda()` and
    `torch.cuda.synchronize()` (called by the pipeline's p2p communication) are no-ops.

    Needed around megatron's optimizer and pipeline schedules on a CPU-only machine; does nothing when
    CUDA is present."""
    if cuda_available():
        yield
        return
    apply_cpu_shim()
    orig_cuda, orig_sync = torch.Tensor.cuda, torch.cuda.synchronize
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.cuda.synchronize = lambda *a, **k: None
    try:
        with _CpuDeviceMode():
            yield
    finally:
        torch.Tensor.cuda, torch.cuda.synchronize = orig_cuda, orig_sync


__all__ = ["apply_cpu_shim", "install_cpu_rng_tracker", "cpu_device_mode", "cuda_available"]
