"""BPDA: Backward Pass Differentiable Approximation (Athalye, Carlini, Wagner, "Obfuscated
Gradients Give a False Sense of Security", ICML 2018).

A non-differentiable preprocessor g (quantization, JPEG, ...) is run as is in the forward pass
and replaced by the identity in the backward pass (g(x) ~ x), so gradient attacks see a useful
gradient instead of zero or noise.
"""

from __future__ import annotations

import torch
from torch import nn

from ..wrap import Defended


class BPDA(nn.Module):
    """Forward ``module(x)``; backward as if it were the identity (straight-through)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.randomized = getattr(module, "randomized", False)
        self.differentiable = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.module(x)
        return x + (out - x).detach()

    def reseed(self, seed: int | None):
        if hasattr(self.module, "reseed"):
            self.module.reseed(seed)
        return self


def with_bpda(model: Defended) -> Defended:
    """The same defended model with every non-differentiable preprocessor wrapped in :class:`BPDA`.

    Forward outputs are unchanged; only gradients differ. Differentiable preprocessors keep
    their exact gradient.
    """
    pre = [p if getattr(p, "differentiable", True) else BPDA(p) for p in model.preprocess]
    return Defended(model.model, pre, check_input=model.check_input)
