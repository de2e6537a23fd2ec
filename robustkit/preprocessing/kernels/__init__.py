"""Bilateral filter kernels. ``bilateral_filter`` (in ``dispatch``) picks the fused CPU kernel
(``bilateral_numba``, Numba), the Triton kernel (``bilateral_triton``, CUDA) or the PyTorch tap
loop (``bilateral_torch``, any device, the fallback), all with an exact hand-written backward."""

from .bilateral_torch import bilateral_filter_torch, window_offsets
from .dispatch import bilateral_filter, numba_available, triton_available

__all__ = ["bilateral_filter", "bilateral_filter_torch", "numba_available", "triton_available", "window_offsets"]
