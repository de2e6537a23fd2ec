"""Gradient-based evasion attacks.

PGD: Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks",
ICLR 2018. EOT (averaging the gradient over the defense's randomness): Athalye et al.,
"Obfuscated Gradients Give a False Sense of Security", ICML 2018.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..base import EvasionAttack
from ..errors import InputError
from ..registry import ATTACKS
from ..validation import check_int


def _per_sample_view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


@ATTACKS.register("pgd")
class PGD(EvasionAttack):
    """Projected gradient descent in the Linf or L2 ball, with random restarts and EOT.

    Each step moves ``alpha`` along the sign of the gradient (Linf) or the
    L2-normalized gradient (L2), then projects back onto the eps-ball intersected
    with [0, 1]. Untargeted attacks maximize cross-entropy of the true label;
    ``targeted=True`` minimizes it for the given (target) labels.

    Args:
        eps: radius of the threat model in [0, 1] pixel units (8/255 Linf, 0.5 L2 on CIFAR-10).
        alpha: step size; default ``2.5 * eps / steps`` (Madry et al.).
        steps: gradient steps per restart.
        norm: ``"linf"`` or ``"l2"``.
        random_start: start uniformly inside the ball (Linf) / at a random point of it (L2).
        restarts: independent runs; per sample the first run that fools the model is kept
            (else the last run's point).
        eot_samples: gradients averaged per step over this many forward passes
            (Expectation over Transformation, for randomized defenses; 1 = plain PGD).
        targeted: minimize the loss of the labels passed in instead of maximizing it.
        seed: seed of the random start (``None``: torch's global RNG).
    """

    def __init__(
        self,
        eps: float = 8 / 255,
        alpha: float | None = None,
        steps: int = 10,
        norm: str = "linf",
        random_start: bool = True,
        restarts: int = 1,
        eot_samples: int = 1,
        targeted: bool = False,
        seed: int | None = None,
    ):
        super().__init__(eps=eps, norm=norm, targeted=targeted)
        check_int(steps, "steps", minimum=1)
        check_int(restarts, "restarts", minimum=1)
        check_int(eot_samples, "eot_samples", minimum=1)
        if alpha is None:
            alpha = 2.5 * self.eps / steps
        if not (math.isfinite(alpha) and alpha > 0) and self.eps > 0:
            raise InputError(f"alpha must be a finite number > 0, got {alpha!r}")
        self.alpha = float(alpha)
        self.steps = steps
        self.random_start = bool(random_start)
        self.restarts = restarts
        self.eot_samples = eot_samples
        self.seed = seed

    def _random_start(self, x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        if self.norm == "linf":
            delta = (torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype) * 2 - 1) * self.eps
        else:
            d = x[0].numel()
            direction = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
            direction = direction / _per_sample_view(direction.flatten(1).norm(dim=1).clamp_min(1e-12), x)
            radius = torch.rand(x.shape[0], generator=gen, device=x.device, dtype=x.dtype) ** (1.0 / d) * self.eps
            delta = direction * _per_sample_view(radius, x)
        return self.project(x + delta, x)

    def gradient(self, model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Gradient of the summed loss w.r.t. the input, averaged over ``eot_samples`` passes."""
        grad = torch.zeros_like(x_adv)
        for _ in range(self.eot_samples):
            x_in = x_adv.detach().requires_grad_(True)
            loss = F.cross_entropy(model(x_in), y, reduction="sum")
            if self.targeted:
                loss = -loss
            (g,) = torch.autograd.grad(loss, x_in)
            grad += g
        return grad / self.eot_samples

    def _step(self, x_adv: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        if self.norm == "linf":
            return x_adv + self.alpha * grad.sign()
        norms = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
        return x_adv + self.alpha * grad / _per_sample_view(norms, grad)

    def _success(self, model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            pred = model(x_adv).argmax(1)
        return pred == y if self.targeted else pred != y

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.eps == 0:
            return x.clone()
        gen = None
        if self.seed is not None:
            gen = torch.Generator(device=x.device).manual_seed(self.seed)
        best = x.clone()
        done = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for _ in range(self.restarts):
            x_adv = self._random_start(x, gen) if self.random_start else x.clone()
            for _ in range(self.steps):
                grad = self.gradient(model, x_adv, y)
                x_adv = self.project(self._step(x_adv, grad).detach(), x)
            success = self._success(model, x_adv, y)
            update = ~done
            best[update] = x_adv[update]
            done |= success
            if bool(done.all()):
                break
        return best
