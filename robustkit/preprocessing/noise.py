"""Additive Gaussian noise (the randomized half of Stalder et al. 2025's noise + bilateral defense)."""

from __future__ import annotations

import torch

from ..base import Preprocessor
from ..errors import InputError
from ..registry import PREPROCESSORS
from ..validation import check_images, check_positive


def gaussian_noise(
    x: torch.Tensor, sigma: float | torch.Tensor, generator: torch.Generator | None = None, clip: bool = True
) -> torch.Tensor:
    """Add i.i.d. N(0, sigma^2) noise per pixel and channel; clip to [0, 1] if ``clip``.

    ``x`` must be float N x C x H x W in [0, 1] with finite values (``InputError`` otherwise:
    0..255 data would otherwise be clipped to an all-ones image).

    ``sigma`` is a float or a tensor of N per-sample values. The noise does not depend on
    ``x``, so the gradient w.r.t. ``x`` is the identity (masked by the clip).
    """
    check_images(x, "x")
    if isinstance(sigma, torch.Tensor):
        if sigma.dim() == 0:
            sigma = sigma.reshape(1)
        if sigma.dim() != 1 or sigma.shape[0] not in (1, x.shape[0]):
            raise InputError(f"sigma tensor must be a scalar or hold one value per sample ({x.shape[0]}), got shape {tuple(sigma.shape)}")
        if sigma.is_complex() or not torch.isfinite(sigma).all() or (sigma < 0).any():
            raise InputError(f"sigma must be finite and >= 0, got {sigma.tolist()}")
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
        check_images(x, "x")  # before x.device is read: a list or array must get an InputError too
        return gaussian_noise(x, self.sigma, self.generator(x.device), self.clip)

    def extra_repr(self) -> str:
        seed = super().extra_repr()
        return f"sigma={self.sigma}, clip={self.clip}" + (f", {seed}" if seed else "")
