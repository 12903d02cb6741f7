"""Ops: reference, chunked-torch and Triton implementations of the early-exit head computations.

- `exit_head_loss.py` / `exit_confidence.py`: public functions, argument checks, dispatch on `impl`, the
  naive reference and the chunked torch path (torch only).
- `exit_head_loss_triton.py` / `exit_confidence_triton.py` / `rms_norm_triton.py`: the `@triton.jit`
  kernels, launchers and autograd Functions, imported only for `impl="triton"`.
- `utils.py`: shape checks, RMSNorm reference, impl resolution, Triton environment checks.
Why these kernels exist and their trade-offs: docs/choices.md#kernels.
"""
