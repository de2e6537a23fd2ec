"""Bilateral filter kernels. ``bilateral_filter`` (in ``dispatch``) picks the PyTorch path
(``bilateral_torch``, any device) or the Triton kernel (``bilateral_triton``, CUDA), both with an
exact hand-written backward."""

from .bilateral_torch import bilateral_filter_torch, window_offsets
from .dispatch import bilateral_filter, triton_available

__all__ = ["bilateral_filter", "bilateral_filter_torch", "triton_available", "window_offsets"]
