"""Public bilateral-filter API: validation and dispatch between the fused CPU kernel (Numba),
the Triton kernel (CUDA) and the PyTorch tap loop (any device, the fallback)."""

from __future__ import annotations

import math

import torch

from ...errors import InputError
from .bilateral_torch import bilateral_filter_torch

DISTANCES = ("l1", "l2")
WINDOWS = ("circle", "square")
BACKENDS = ("auto", "numba", "torch", "triton")


def _check_sigma(sigma: float | torch.Tensor, name: str, x: torch.Tensor) -> float | torch.Tensor:
    if isinstance(sigma, torch.Tensor):
        if sigma.dim() == 0:
            sigma = sigma.reshape(1)
        if sigma.dim() != 1 or sigma.shape[0] not in (1, x.shape[0]):
            raise InputError(f"{name} must be a number or a 1-D tensor of {x.shape[0]} per-sample values, got shape {tuple(sigma.shape)}")
        if sigma.device != x.device:
            raise InputError(f"{name} is on {sigma.device} but x is on {x.device}; put them on one device")
        if not sigma.is_floating_point():
            sigma = sigma.double()
        if not bool(torch.isfinite(sigma).all()) or bool((sigma <= 0).any()):
            raise InputError(f"{name} values must be finite and > 0, got min {float(sigma.min()):.4g}")
        if sigma.shape[0] == 1:
            return float(sigma.item())
        return sigma.detach()
    try:
        v = float(sigma)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number or a tensor, got {sigma!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise InputError(f"{name} must be finite and > 0, got {sigma!r}")
    return v


def triton_available(x: torch.Tensor | None = None) -> bool:
    """Whether the fused Triton path can run (a CUDA tensor and an importable Triton)."""
    if x is not None and x.device.type != "cuda":
        return False
    try:
        from . import bilateral_triton  # noqa: F401
    except Exception:  # ImportError, or Triton failing to initialize
        return False
    return True


def numba_available(x: torch.Tensor | None = None) -> bool:
    """Whether the fused CPU kernel can run (Numba importable; a float32/float64 CPU tensor)."""
    if x is not None and (x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64)):
        return False
    from . import bilateral_numba

    return bilateral_numba.available()


def bilateral_filter(
    x: torch.Tensor,
    kernel_size: int = 5,
    sigma_color: float | torch.Tensor = 0.1,
    sigma_space: float | torch.Tensor = 1.5,
    distance: str = "l1",
    window: str = "circle",
    iterations: int = 1,
    backend: str = "auto",
) -> torch.Tensor:
    """Edge-preserving bilateral filter of ``N x C x H x W`` images, differentiable w.r.t. ``x``.

    Args:
        x: float32/float64 (or float16/bfloat16 on CUDA) images; any range, [0, 1] intended.
        kernel_size: odd window diameter; the radius is ``kernel_size // 2``.
        sigma_color: range sigma in data units (0.1 = a tenth of the [0, 1] range); a float or
            one value per sample (1-D tensor of length N).
        sigma_space: spatial sigma in pixels; float or per-sample tensor.
        distance: colour distance across channels: ``"l1"`` (sum of |differences|, as OpenCV)
            or ``"l2"`` (Euclidean).
        window: ``"circle"`` (taps with dy^2 + dx^2 <= r^2, as OpenCV) or ``"square"`` (as kornia).
        iterations: apply the filter this many times (the paper's iterated filtering).
        backend: ``"auto"`` (the fused Numba kernel on CPU, Triton on CUDA, each when available,
            else the PyTorch tap loop), ``"numba"``, ``"torch"`` or ``"triton"``.

    Borders are reflect-101 (OpenCV's default, ``torch``'s ``"reflect"``). The gradient is
    exact (weights depend on the centre and the neighbour); sigmas get no gradient.
    """
    if not isinstance(x, torch.Tensor):
        raise InputError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise InputError(f"x must have shape N x C x H x W, got {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise InputError(f"x must be a floating-point tensor (float32/float64, or half on CUDA), got {x.dtype}")
    if x.dtype in (torch.float16, torch.bfloat16) and x.device.type != "cuda" and not (backend == "triton" and _interpreting()):
        raise InputError(f"{x.dtype} is supported on CUDA only; use float32 on {x.device.type}")
    if x.numel() == 0:
        raise InputError(f"x is empty: shape {tuple(x.shape)}")
    if not isinstance(kernel_size, int) or isinstance(kernel_size, bool) or kernel_size < 1 or kernel_size % 2 == 0:
        raise InputError(f"kernel_size must be an odd integer >= 1, got {kernel_size!r}")
    if distance not in DISTANCES:
        raise InputError(f"distance must be one of {DISTANCES}, got {distance!r}")
    if window not in WINDOWS:
        raise InputError(f"window must be one of {WINDOWS}, got {window!r}")
    if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 0:
        raise InputError(f"iterations must be an integer >= 0, got {iterations!r}")
    if backend not in BACKENDS:
        raise InputError(f"backend must be one of {BACKENDS}, got {backend!r}")
    sc = _check_sigma(sigma_color, "sigma_color", x)
    ss = _check_sigma(sigma_space, "sigma_space", x)
    if backend == "numba" and not numba_available(x):
        from . import bilateral_numba

        if x.device.type != "cpu":
            raise InputError(f"backend='numba' runs on CPU tensors; x is on {x.device} (use 'auto', 'triton' or 'torch')")
        if not bilateral_numba.available():
            raise InputError(f"backend='numba' needs the numba package ({bilateral_numba.NUMBA_ERROR}); "
                             "pip install numba, or use backend='torch'")
    use_numba = backend == "numba" or (backend == "auto" and x.device.type == "cpu" and numba_available(x))
    use_triton = not use_numba and (backend == "triton" or (backend == "auto" and x.device.type == "cuda" and triton_available(x)))
    if use_numba:
        from .bilateral_numba import bilateral_filter_numba as step
    elif use_triton:
        if x.device.type != "cuda" and not _interpreting():
            raise InputError("backend='triton' needs a CUDA tensor (or TRITON_INTERPRET=1 for CPU debugging)")
        from .bilateral_triton import bilateral_filter_triton as step
    else:
        if x.dtype in (torch.float16, torch.bfloat16):
            # the tap loop accumulates in the input dtype: do it in float32
            return bilateral_filter(x.float(), kernel_size, sc, ss, distance, window, iterations, "torch").to(x.dtype)
        step = bilateral_filter_torch
    out = x
    for _ in range(iterations):
        out = step(out, kernel_size, sc, ss, distance, window)
    return out


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"
