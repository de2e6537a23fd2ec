"""Bit-depth reduction (feature squeezing): a non-differentiable preprocessor, attacked through BPDA."""

from __future__ import annotations

import torch

from ..base import Preprocessor
from ..errors import InputError
from ..registry import PREPROCESSORS
from ..validation import check_images


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
        check_images(x, "x")  # 0..255 or NaN input would be quantized into nonsense silently
        levels = 2**self.bits - 1
        return torch.round(x * levels) / levels

    def extra_repr(self) -> str:
        return f"bits={self.bits}"
