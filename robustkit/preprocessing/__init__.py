"""Test-time preprocessing defenses (``Preprocessor`` modules placed in front of a classifier).

Importing registers ``gaussian_noise``, ``bilateral``, ``noise_bilateral``, ``quantize`` and
``compose`` in :data:`robustkit.registry.PREPROCESSORS`. The bilateral filter's kernels
(PyTorch, Triton) live in :mod:`robustkit.preprocessing.kernels`.
"""

from .bilateral import BilateralFilter
from ..wrap import build_preprocessor
from .compose import Compose, NoiseBilateral
from .noise import GaussianNoise, gaussian_noise
from .quantize import Quantize

__all__ = ["GaussianNoise", "gaussian_noise", "BilateralFilter", "NoiseBilateral", "Quantize", "Compose",
           "build_preprocessor"]
