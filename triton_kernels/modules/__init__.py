"""Thin ``nn.Module`` wrappers over :mod:`triton_kernels.ops` (configuration held, no parameters)."""
