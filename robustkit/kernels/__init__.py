"""Fused image kernels. ``bilateral_filter`` dispatches to a PyTorch tap loop (any device) or a
Triton kernel (CUDA), both with an exact hand-written backward."""

from .bilateral import bilateral_filter, triton_available
from .bilateral_cpu import bilateral_filter_torch, window_offsets

__all__ = ["bilateral_filter", "bilateral_filter_torch", "triton_available", "window_offsets"]
