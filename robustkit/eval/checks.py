"""Gradient-masking sanity checks, in the spirit of AutoAttack's ``checks.py`` (Croce & Hein 2020)
and the "Obfuscated gradients" checklist (Athalye, Carlini, Wagner, ICML 2018).

Each check returns a :class:`Check` row; a ``warning`` means the reported robust accuracy may be
an overestimate and says what to do. They run on a small batch and cost a few forward/backward
passes, except :func:`check_stronger_attack`, which re-attacks only the images that survived.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..base import EvasionAttack
from ..inference import eval_mode
from ..validation import check_int


@dataclass
class Check:
    """One sanity check's outcome for one defense."""

    defense: str
    check: str
    result: str  # "ok" | "warning" | "info"
    detail: str

    def to_row(self) -> dict[str, Any]:
        return {"defense": self.defense, "check": self.check, "result": self.result, "detail": self.detail}


def check_randomness(label: str, model: nn.Module, x: torch.Tensor, declared_randomized: bool) -> Check:
    """Two forward passes on the same inputs: a model that is random but not declared so escapes EOT."""
    with eval_mode(model), torch.no_grad():
        a, b = model(x), model(x)
    random = not torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    if random and not declared_randomized:
        return Check(label, "randomness", "warning", "outputs differ between two identical calls but no "
                     "preprocessor declares randomized=True: attacks ran without EOT; declare it so EOT is used")
    if random:
        return Check(label, "randomness", "info", "randomized defense (declared): EOT attacks and draws are used")
    return Check(label, "randomness", "ok", "deterministic outputs")


def check_gradients(label: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Check:
    """Input gradients of the cross-entropy: zero or non-finite ones make gradient attacks blind."""
    xg = x.clone().requires_grad_(True)
    with eval_mode(model):
        loss = F.cross_entropy(model(xg), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, xg)
    flat = grad.flatten(1)
    nonfinite = int((~torch.isfinite(flat)).any(1).sum())
    zero = int((flat.abs().amax(1) == 0).sum())
    n = x.shape[0]
    if nonfinite:
        return Check(label, "gradients", "warning", f"{nonfinite}/{n} images have NaN/inf input gradients: "
                     "use BPDA for the failing part or fix the numerics")
    if zero > 0.1 * n:
        return Check(label, "gradients", "warning", f"{zero}/{n} images have an all-zero input gradient (shattered "
                     "or masked gradients): use BPDA or a gradient-free attack (AutoAttack's Square)")
    return Check(label, "gradients", "ok", f"{zero}/{n} images with zero gradient, none non-finite")


def check_logits(label: str, model: nn.Module, x: torch.Tensor) -> Check:
    """Outputs that already look like probabilities (non-negative, rows summing to 1) weaken CE attacks."""
    with eval_mode(model), torch.no_grad():
        out = model(x)
    probs = bool((out >= 0).all()) and bool(torch.allclose(out.sum(1), torch.ones_like(out[:, 0]), atol=1e-3))
    if probs:
        return Check(label, "logits", "warning", "the model returns probabilities, not logits: cross-entropy on them "
                     "saturates; return logits (remove the final softmax) for the evaluation")
    return Check(label, "logits", "ok", "outputs are logits")


def check_stronger_attack(label: str, model: nn.Module, attack: EvasionAttack, x: torch.Tensor, y: torch.Tensor,
                          robust_frac: torch.Tensor, *, seed: int | None, draws: int, batch_size: int,
                          shard: tuple[int, int] | None = None, tolerance: float = 0.02,
                          max_images: int = 64) -> Check | None:
    """Re-attack (at most ``max_images`` of) the images that survived ``attack`` in every draw with a
    stronger setting: twice the steps, one more restart, twice the EOT draws on a randomized model.
    Robust accuracy should not keep falling; it is a sanity check, so its cost is capped.

    Returns None when the attack has no steps/restarts to raise (e.g. AutoAttack) or nothing survived.
    """
    from .metrics import robust_accuracy

    check_int(max_images, "max_images", minimum=1)
    if not all(hasattr(attack, k) for k in ("steps", "restarts")):
        return None
    survivors = torch.nonzero(robust_frac >= 1.0).flatten()[:max_images]
    if survivors.numel() == 0:
        return None
    stronger = attack.with_options(steps=2 * attack.steps, restarts=attack.restarts + 1,
                                   eot_samples=attack.eot_samples * 2 if attack.eot_samples > 1 else 1)
    res = robust_accuracy(model, stronger, x[survivors], y[survivors], batch_size=batch_size, progress=False,
                          seed=None if seed is None else seed + 7919, draws=draws, shard=shard)
    broken = int((res.robust_frac < 0.5).sum())
    allowed = max(1, int(tolerance * survivors.numel()))
    what = f"{stronger.label()} (steps {stronger.steps}, restarts {stronger.restarts}; on up to {max_images} survivors)"
    if broken > allowed:
        return Check(label, "stronger attack", "warning",
                     f"{what} broke {broken} of the {survivors.numel()} images that survived {attack.label()}: "
                     "robust accuracy keeps falling with more steps / restarts / EOT, so the reported number "
                     "overestimates robustness; raise the attack budget")
    return Check(label, "stronger attack", "ok", f"{what} broke {broken} of {survivors.numel()} survivors")


def sanity_checks(label: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, declared_randomized: bool,
                  n: int = 32) -> list[Check]:
    """The cheap checks (randomness, gradients, logits) on the first ``n`` images."""
    xs, ys = x[:n], y[:n]
    return [check_randomness(label, model, xs, declared_randomized), check_gradients(label, model, xs, ys),
            check_logits(label, model, xs)]
