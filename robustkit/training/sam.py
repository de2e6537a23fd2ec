"""(Adaptive) sharpness-aware minimization: the two-pass update FT-SAM builds on.

SAM: Foret, Kleiner, Mobahi, Neyshabur, ICLR 2021 (``eps = rho g / ||g||``). ASAM: Kwon, Kim,
Park, Choi, ICML 2021 (``eps = rho T_w^2 g / ||T_w g||``, ``T_w = diag(|w| + eta)``).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from ..errors import InputError


def _is_scaled(name: str) -> bool:
    """ASAM scales weight tensors (conv, linear, norm weights); biases and embeddings are not scaled."""
    return name.endswith("weight")


class AdaptiveSAM:
    """The two-pass (adaptive) SAM update around a base optimizer.

    Usage per batch: ``loss(w).backward(); sam.perturb(); loss(w + eps).backward();
    sam.restore(); optimizer.step()``. With ``adaptive=False`` it is plain SAM
    (Foret et al., ICLR 2021): ``eps = rho g / ||g||``.
    """

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], rho: float = 2.0, eta: float = 0.01,
                 adaptive: bool = True):
        if not rho > 0:
            raise InputError(f"rho must be > 0, got {rho!r}")
        if eta < 0:
            raise InputError(f"eta must be >= 0, got {eta!r}")
        self.params = [(n, p) for n, p in named_params if p.requires_grad]
        self.rho, self.eta, self.adaptive = float(rho), float(eta), bool(adaptive)
        self._eps: list[tuple[nn.Parameter, torch.Tensor]] = []

    def _scale(self, name: str, p: torch.Tensor) -> torch.Tensor | None:
        if self.adaptive and _is_scaled(name):
            return p.detach().abs() + self.eta
        return None

    @torch.no_grad()
    def perturbation(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """``eps`` for every parameter with a gradient (the formula above)."""
        scaled = []
        for name, p in self.params:
            if p.grad is None:
                continue
            t = self._scale(name, p)
            scaled.append((p, t, p.grad if t is None else t * p.grad))
        if not scaled:
            raise InputError("no parameter has a gradient: call backward() before perturb()")
        norm = torch.norm(torch.stack([tg.norm(2) for _, _, tg in scaled]), 2) + 1e-12
        return [(p, (tg if t is None else t * tg) * (self.rho / norm)) for p, t, tg in scaled]

    @torch.no_grad()
    def perturb(self) -> None:
        """Move the weights to ``w + eps`` (remembering ``eps``)."""
        self._eps = self.perturbation()
        for p, e in self._eps:
            p.add_(e)

    @torch.no_grad()
    def restore(self) -> None:
        """Move the weights back to ``w`` (the gradients, taken at ``w + eps``, are kept)."""
        for p, e in self._eps:
            p.sub_(e)
        self._eps = []


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers still normalize with batch statistics but do not update running stats (momentum 0)."""
    saved = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            saved.append((m, m.momentum))
            m.momentum = 0.0
    try:
        yield
    finally:
        for m, mom in saved:
            m.momentum = mom
