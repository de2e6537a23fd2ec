"""Preprocessors in sequence: :class:`Compose`, and :class:`NoiseBilateral` (Stalder et al. 2025) as one."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ..base import Preprocessor
from ..errors import InputError
from ..registry import PREPROCESSORS
from ..wrap import build_preprocessor
from .bilateral import BilateralFilter
from .noise import GaussianNoise


@PREPROCESSORS.register("compose")
class Compose(Preprocessor):
    """Apply ``parts`` in order. ``randomized`` if any part is, ``differentiable`` if all are.

    ``parts`` are modules or registered specs (``[{name: gaussian_noise, sigma: 0.05}, bilateral]``).
    ``seed`` (or :meth:`reseed`) seeds randomized part ``i`` with ``seed + i``, so each part has
    its own stream and a composition whose first part is the only random one draws exactly
    what that part would draw alone with ``seed``.
    """

    def __init__(self, parts: list | None = None, seed: int | None = None):
        super().__init__()
        built = [build_preprocessor(p, f"parts[{i}]") for i, p in enumerate(parts or [])]
        for i, p in enumerate(built):
            if not isinstance(p, nn.Module):
                raise InputError(f"parts[{i}] must be an nn.Module or a registered preprocessor, got {type(p).__name__}")
        self.parts = nn.ModuleList(built)
        if seed is not None:
            self.reseed(seed)

    @property
    def randomized(self) -> bool:  # type: ignore[override]
        return any(getattr(p, "randomized", False) for p in self.parts)

    @property
    def differentiable(self) -> bool:  # type: ignore[override]
        return all(getattr(p, "differentiable", True) for p in self.parts)

    def reseed(self, seed: int | None) -> "Compose":
        self._seed = seed
        for i, p in enumerate(self.parts):
            if hasattr(p, "reseed"):
                p.reseed(None if seed is None else seed + i)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for p in self.parts:
            x = p(x)
        return x

    def __iter__(self) -> Iterable[nn.Module]:  # type: ignore[override]
        return iter(self.parts)

    def __len__(self) -> int:
        return len(self.parts)


@PREPROCESSORS.register("noise_bilateral")
class NoiseBilateral(Compose):
    """Gaussian noise N(0, sigma^2), THEN an iterated bilateral filter (Stalder et al. 2025).

    The order matters (noise-then-filter keeps clean accuracy better; the two do not commute).
    Randomized: evaluate it with EOT. Noise is clipped to [0, 1] before filtering. It is a
    :class:`Compose` of :class:`GaussianNoise` and :class:`BilateralFilter` (``.noise``, ``.filter``).
    """

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
        super().__init__([GaussianNoise(sigma),
                          BilateralFilter(kernel_size, sigma_color, sigma_space, iterations, train_iterations,
                                          distance, window, backend)], seed=seed)

    @property
    def noise(self) -> GaussianNoise:
        return self.parts[0]  # type: ignore[return-value]

    @property
    def filter(self) -> BilateralFilter:
        return self.parts[1]  # type: ignore[return-value]

    @property
    def sigma(self) -> float:
        return self.noise.sigma

    def extra_repr(self) -> str:
        return f"seed={self._seed}" if self._seed is not None else ""
