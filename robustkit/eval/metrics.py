"""Accuracy under clean and adversarial inputs, batched, with progress bars."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..base import EvasionAttack
from ..utils import batches, model_device
from ..validation import check_images, check_labels


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Predicted labels for a tensor of images (model in eval mode, on its own device)."""
    check_images(x, "x")
    device = model_device(model)
    was_training = model.training
    model.eval()
    out = [model(x[s].to(device)).argmax(1).cpu() for s in batches(x.shape[0], batch_size)]
    model.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def accuracy(model: nn.Module, data: Dataset | tuple[torch.Tensor, torch.Tensor], batch_size: int = 256) -> float:
    """Top-1 accuracy on a dataset of (image, label) pairs or an ``(x, y)`` tensor pair."""
    if isinstance(data, tuple):
        x, y = data
        check_labels(y, x.shape[0])
        return float((predict(model, x, batch_size) == y.cpu()).float().mean())
    device = model_device(model)
    was_training = model.training
    model.eval()
    correct = total = 0
    for xb, yb in DataLoader(data, batch_size=batch_size, shuffle=False):
        xb, yb = xb.to(device), torch.as_tensor(yb).to(device)
        correct += int((model(xb).argmax(1) == yb).sum())
        total += int(yb.numel())
    model.train(was_training)
    return correct / max(1, total)


@dataclass
class AttackResult:
    """Outcome of one attack on one model over a set of examples."""

    clean_accuracy: float
    robust_accuracy: float
    n: int
    seconds: float
    clean_correct: torch.Tensor = field(repr=False)
    robust_correct: torch.Tensor = field(repr=False)
    x_adv: torch.Tensor | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "clean_accuracy": self.clean_accuracy,
            "robust_accuracy": self.robust_accuracy,
            "n": self.n,
            "seconds": self.seconds,
        }


def robust_accuracy(
    model: nn.Module,
    attack: EvasionAttack,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 256,
    keep_adversarials: bool = False,
    progress: bool = True,
    desc: str = "attack",
) -> AttackResult:
    """Attack every example and count it robust if it is classified correctly both
    clean and under attack (the AutoAttack / RobustBench convention).
    """
    check_images(x, "x")
    check_labels(y, x.shape[0])
    device = model_device(model)
    clean_ok, robust_ok, advs = [], [], []
    n_done = n_robust = 0
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    bar = tqdm(total=x.shape[0], desc=desc, disable=None if progress else True, unit="img", leave=False)
    for s in batches(x.shape[0], batch_size):
        xb, yb = x[s].to(device), y[s].to(device)
        with torch.no_grad():
            c = model(xb).argmax(1) == yb
        x_adv = attack(model, xb, yb)
        with torch.no_grad():
            r = (model(x_adv).argmax(1) == yb) & c
        clean_ok.append(c.cpu())
        robust_ok.append(r.cpu())
        if keep_adversarials:
            advs.append(x_adv.cpu())
        n_done += int(r.numel())
        n_robust += int(r.sum())
        bar.update(xb.shape[0])
        bar.set_postfix(robust=f"{n_robust / n_done:.3f}")
    bar.close()
    model.train(was_training)
    clean_correct, robust_correct = torch.cat(clean_ok), torch.cat(robust_ok)
    return AttackResult(
        clean_accuracy=float(clean_correct.float().mean()),
        robust_accuracy=float(robust_correct.float().mean()),
        n=int(x.shape[0]),
        seconds=time.perf_counter() - t0,
        clean_correct=clean_correct,
        robust_correct=robust_correct,
        x_adv=torch.cat(advs) if keep_adversarials else None,
    )
