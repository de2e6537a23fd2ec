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
from ..inference import is_randomized
from ..registry import ATTACKS
from ..validation import check_int

DEFAULT_EOT_CHUNK = 256  # images per forward pass when EOT draws are stacked (docs/evaluation.md: why not more)


def _per_sample_view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


def _randomized_leaves(model: nn.Module) -> list[nn.Module]:
    """Modules declaring ``randomized`` none of whose submodules does (the sources of randomness)."""
    out = []
    for m in model.modules():
        if getattr(m, "randomized", False) and not any(getattr(c, "randomized", False)
                                                       for c in list(m.modules())[1:]):
            out.append(m)
    return out


def draws_batchable(model: nn.Module) -> bool:
    """True when stacking k copies of a batch into one forward gives k independent draws per image.

    That holds when every source of randomness draws independently per element (robustkit's
    :class:`~robustkit.preprocessing.noise.GaussianNoise`), or declares ``batched_draws = True``.
    A plug-in drawing one random parameter per call (e.g. one resize for the whole batch) would
    give the k copies the same draw, so its EOT passes stay separate forward calls.
    """
    from ..preprocessing.noise import GaussianNoise

    return all(isinstance(m, GaussianNoise) or getattr(m, "batched_draws", False) for m in _randomized_leaves(model))


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
            (else the last run's point). A restart attacks only the samples no earlier run fooled.
        eot_samples: gradients averaged per step over this many forward passes
            (Expectation over Transformation, for randomized defenses; 1 = plain PGD). On a
            model without randomness one pass is made (every pass would give the same gradient).
        targeted: minimize the loss of the labels passed in instead of maximizing it.
        seed: seed of the random start (``None``: torch's global RNG).
        early_stop: stop optimizing a sample once it is *broken* at the current iterate and keep
            that point; on a deterministic model "broken" is misclassified (targeted: classified as
            the target), and robust accuracy can only fall (the kept point is misclassified, the
            others follow the same path). The gradient's forward pass gives the verdict, at no cost.
        early_stop_randomized: also stop early on a randomized model, where "broken" is
            misclassified in **every one** of the step's ``eot_samples`` draws (and only with EOT:
            one draw is too weak a verdict). Off by default: a point chosen because 8 draws all
            failed sits near the boundary and fresh draws classify it correctly more often than the
            point further steps reach (on the demo, 450 digits, 10 draws: EOT-PGD-Linf 0.668 with it
            vs 0.652 without, EOT-PGD-L2 0.238 vs 0.214). Evaluators score the returned point over
            fresh draws either way.
        eot_chunk: at most this many images per forward pass: EOT draws are stacked into one
            batch (``eot_chunk // batch`` draws per pass) when every source of randomness draws
            per element (:func:`draws_batchable`); else one pass per draw.
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
        early_stop: bool = True,
        early_stop_randomized: bool = False,
        eot_chunk: int = DEFAULT_EOT_CHUNK,
    ):
        super().__init__(eps=eps, norm=norm, targeted=targeted)
        check_int(steps, "steps", minimum=1)
        check_int(restarts, "restarts", minimum=1)
        check_int(eot_samples, "eot_samples", minimum=1)
        check_int(eot_chunk, "eot_chunk", minimum=1)
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
        self.early_stop = bool(early_stop)
        self.early_stop_randomized = bool(early_stop_randomized)
        self._eot_chunk = int(eot_chunk)  # private: a speed knob, not part of the attack's strength

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

    def _passes(self, model: nn.Module) -> int:
        return self.eot_samples if is_randomized(model) else 1

    def _gradient_and_broken(self, model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor,
                             passes: int, batchable: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean input gradient of the summed loss over ``passes`` draws, and per sample whether
        every draw was fooled (misclassified; targeted: classified as ``y``)."""
        n = x_adv.shape[0]
        per_forward = max(1, min(passes, self._eot_chunk // max(n, 1))) if batchable else 1
        grad = torch.zeros_like(x_adv)
        broken = torch.ones(n, dtype=torch.bool, device=x_adv.device)
        left = passes
        while left > 0:
            k = min(per_forward, left)
            x_in = x_adv.detach().requires_grad_(True)
            stacked = x_in.repeat(k, *([1] * (x_in.dim() - 1))) if k > 1 else x_in
            yk = y.repeat(k) if k > 1 else y
            logits = model(stacked)
            loss = F.cross_entropy(logits, yk, reduction="sum")
            if self.targeted:
                loss = -loss
            (g,) = torch.autograd.grad(loss, x_in)  # autograd sums the k copies' gradients
            grad += g
            pred = logits.detach().argmax(1).view(k, n)
            fooled = (pred == y) if self.targeted else (pred != y)
            broken &= fooled.all(0)
            left -= k
        return grad / passes, broken

    def gradient(self, model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Gradient of the summed loss w.r.t. the input, averaged over ``eot_samples`` passes
        (one pass on a model without randomness)."""
        return self._gradient_and_broken(model, x_adv, y, self._passes(model), draws_batchable(model))[0]

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
        randomized = is_randomized(model)
        passes = self.eot_samples if randomized else 1
        batchable = draws_batchable(model)
        stop_early = self.early_stop and (not randomized or (self.early_stop_randomized and passes > 1))
        best = x.clone()
        done = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for _ in range(self.restarts):
            # the start is drawn for the whole batch, so the random stream does not depend on who is left
            start = self._random_start(x, gen) if self.random_start else x.clone()
            idx = torch.nonzero(~done).flatten()
            x0, ya, xa = x[idx], y[idx], start[idx]
            for _ in range(self.steps):
                grad, broken = self._gradient_and_broken(model, xa, ya, passes, batchable)
                if stop_early and bool(broken.any()):
                    best[idx[broken]] = xa[broken]
                    done[idx[broken]] = True
                    keep = ~broken
                    idx, x0, ya, xa, grad = idx[keep], x0[keep], ya[keep], xa[keep], grad[keep]
                    if idx.numel() == 0:
                        break
                xa = self.project(self._step(xa, grad).detach(), x0)
            if idx.numel():
                best[idx] = xa
                done[idx] |= self._success(model, xa, ya)
            if bool(done.all()):
                break
        return best
