"""Compatibility alias: the kernels live in :mod:`robustkit.preprocessing.kernels`."""

from ..preprocessing.kernels import bilateral_filter, bilateral_filter_torch, triton_available, window_offsets

__all__ = ["bilateral_filter", "bilateral_filter_torch", "triton_available", "window_offsets"]
