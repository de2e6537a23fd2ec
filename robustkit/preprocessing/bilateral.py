"""Iterated bilateral filter preprocessor over :func:`robustkit.preprocessing.kernels.bilateral_filter`."""

from __future__ import annotations

import torch

from ..base import Preprocessor
from ..errors import InputError
from ..registry import PREPROCESSORS
from ..validation import check_images, check_positive
from .kernels import bilateral_filter


def _check_iterations(value: int, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InputError(f"{name} must be an integer >= 0, got {value!r}")
    return value


@PREPROCESSORS.register("bilateral")
class BilateralFilter(Preprocessor):
    """Iterated edge-preserving bilateral filter (deterministic, differentiable with the exact gradient).

    ``iterations`` passes in eval mode, ``train_iterations`` (default: the same) in train mode -
    the paper's "a/b" schedule (e.g. 20/80). Defaults (k=5, sigma_color=0.1, sigma_space=1.5,
    L1 colour distance, circular window as OpenCV) are our choice for 32x32 images in [0, 1];
    the paper's exact values are not public (see docs/bilateral.md for the sweep).
    ``backend`` as in :func:`~robustkit.preprocessing.kernels.bilateral_filter`: ``"auto"``
    runs the fused Numba kernel on CPU and Triton on CUDA where available, else the PyTorch
    path; ``"numba"``, ``"torch"`` and ``"triton"`` select one.
    """

    randomized = False
    differentiable = True

    def __init__(
        self,
        kernel_size: int = 5,
        sigma_color: float = 0.1,
        sigma_space: float = 1.5,
        iterations: int = 1,
        train_iterations: int | None = None,
        distance: str = "l1",
        window: str = "circle",
        backend: str = "auto",
    ):
        super().__init__()
        self.kernel_size = kernel_size
        self.sigma_color = check_positive(sigma_color, "sigma_color")
        self.sigma_space = check_positive(sigma_space, "sigma_space")
        self.iterations = _check_iterations(iterations, "iterations")
        self.train_iterations = _check_iterations(iterations if train_iterations is None else train_iterations, "train_iterations")
        self.distance, self.window, self.backend = distance, window, backend
        # validate the remaining arguments once, eagerly, on a dummy image
        bilateral_filter(torch.zeros(1, 1, 1, 1), kernel_size, self.sigma_color, self.sigma_space, distance, window, 0, backend if backend != "triton" else "torch")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x, "x")
        n = self.train_iterations if self.training else self.iterations
        return bilateral_filter(x, self.kernel_size, self.sigma_color, self.sigma_space, self.distance, self.window, n, self.backend)

    def extra_repr(self) -> str:
        return (f"kernel_size={self.kernel_size}, sigma_color={self.sigma_color}, sigma_space={self.sigma_space}, "
                f"iterations={self.train_iterations}/{self.iterations}, distance={self.distance}, window={self.window}")
