"""Input-preprocessing defenses (``Preprocessor`` modules), registered by name.

Stalder et al. 2025, "A combination of noise and bilateral filters achieve supralinear
and scalable adversarial robustness in CNNs": Gaussian noise, then a bilateral filter.
"""

from __future__ import annotations

import torch

from ..base import Preprocessor
from ..errors import InputError
from ..kernels import bilateral_filter
from ..registry import PREPROCESSORS
from ..validation import check_images, check_positive


def gaussian_noise(
    x: torch.Tensor, sigma: float | torch.Tensor, generator: torch.Generator | None = None, clip: bool = True
) -> torch.Tensor:
    """Add i.i.d. N(0, sigma^2) noise per pixel and channel; clip to [0, 1] if ``clip``.

    ``sigma`` is a float or a tensor of N per-sample values. The noise does not depend on
    ``x``, so the gradient w.r.t. ``x`` is the identity (masked by the clip).
    """
    check_images(x, "x", check_range=False)
    if isinstance(sigma, torch.Tensor):
        if sigma.dim() == 0:
            sigma = sigma.reshape(1)
        if sigma.dim() != 1 or sigma.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"sigma tensor must be a scalar or hold one value per sample ({x.shape[0]}), got shape {tuple(sigma.shape)}")
        if (sigma < 0).any() or not torch.isfinite(sigma).all():
            raise ValueError("sigma must be finite and >= 0")
        sigma = sigma.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)
    else:
        sigma = check_positive(sigma, "sigma", allow_zero=True)
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    out = x + sigma * noise
    return out.clamp(0.0, 1.0) if clip else out


@PREPROCESSORS.register("gaussian_noise")
class GaussianNoise(Preprocessor):
    """Additive Gaussian noise N(0, sigma^2), then clip to [0, 1]. Randomized: attack it with EOT.

    Args:
        sigma: noise standard deviation in [0, 1] pixel units.
        clip: clip the result to [0, 1] (keeps the toolkit's image contract).
        seed: seed of the preprocessor's own generator (``None``: global RNG).
    """

    randomized = True
    differentiable = True

    def __init__(self, sigma: float = 0.05, clip: bool = True, seed: int | None = None):
        super().__init__(seed=seed)
        self.sigma = check_positive(sigma, "sigma", allow_zero=True)
        self.clip = clip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gaussian_noise(x, self.sigma, self.generator(x.device), self.clip)

    def extra_repr(self) -> str:
        seed = super().extra_repr()
        return f"sigma={self.sigma}, clip={self.clip}" + (f", {seed}" if seed else "")


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
        n = self.train_iterations if self.training else self.iterations
        return bilateral_filter(x, self.kernel_size, self.sigma_color, self.sigma_space, self.distance, self.window, n, self.backend)

    def extra_repr(self) -> str:
        return (f"kernel_size={self.kernel_size}, sigma_color={self.sigma_color}, sigma_space={self.sigma_space}, "
                f"iterations={self.train_iterations}/{self.iterations}, distance={self.distance}, window={self.window}")


@PREPROCESSORS.register("noise_bilateral")
class NoiseBilateral(Preprocessor):
    """Gaussian noise N(0, sigma^2), THEN an iterated bilateral filter (Stalder et al. 2025).

    The order matters (noise-then-filter keeps clean accuracy better; the two do not commute).
    Randomized: evaluate it with EOT. Noise is clipped to [0, 1] before filtering.
    """

    randomized = True
    differentiable = True

    def __init__(
        self,
        sigma: float = 0.05,
        kernel_size: int = 5,
        sigma_color: float = 0.1,
        sigma_space: float = 1.5,
        iterations: int = 1,
        train_iterations: int | None = None,
        distance: str = "l1",
        window: str = "circle",
        backend: str = "auto",
        seed: int | None = None,
    ):
        super().__init__(seed=seed)
        self.sigma = check_positive(sigma, "sigma", allow_zero=True)
        self.filter = BilateralFilter(kernel_size, sigma_color, sigma_space, iterations, train_iterations, distance, window, backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.filter.train(self.training)
        return self.filter(gaussian_noise(x, self.sigma, self.generator(x.device)))

    def extra_repr(self) -> str:
        seed = super().extra_repr()
        return f"sigma={self.sigma}" + (f", {seed}" if seed else "")


@PREPROCESSORS.register("quantize")
class Quantize(Preprocessor):
    """Bit-depth reduction to ``bits`` bits per channel (feature squeezing, Xu, Evans, Qi, NDSS 2018).

    Not differentiable (its gradient is zero almost everywhere): evaluate it with BPDA, which the
    ``evaluate`` step does automatically.
    """

    randomized = False
    differentiable = False

    def __init__(self, bits: int = 4):
        super().__init__()
        if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 16:
            raise InputError(f"bits must be an integer in [1, 16], got {bits!r}")
        self.bits = bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        levels = 2**self.bits - 1
        return torch.round(x * levels) / levels

    def extra_repr(self) -> str:
        return f"bits={self.bits}"
