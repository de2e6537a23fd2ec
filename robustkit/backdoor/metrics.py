"""Backdoor metrics in BackdoorBench's conventions (../shared/REFERENCES.md section 6).

- ACC: clean test accuracy.
- ASR: on triggered test images whose true label is not the target (all-to-one), the fraction
  classified as the attacker's label.
- RA (robust accuracy): on the same triggered images, the fraction classified as their true label.
- DER (defense effectiveness rating): ``[max(0, ASR_before - ASR_after) - max(0, ACC_before - ACC_after) + 1] / 2``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from ..data.arrays import to_tensors
from ..errors import InputError
from ..inference import accuracy, predict


@dataclass
class BackdoorMetrics:
    acc: float
    asr: float
    ra: float
    n_clean: int
    n_triggered: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def triggered_test_set(attack: Any, test: Dataset, num_classes: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triggered copies of the test images that count for ASR: ``(x_triggered, y_true, y_target)``."""
    x, y = to_tensors(test)
    k = num_classes or int(y.max()) + 1
    keep = torch.ones_like(y, dtype=torch.bool) if attack.all_to_all else y != attack.target
    if not bool(keep.any()):
        raise InputError("the test set has no sample outside the target class: ASR is undefined")
    xs, ys = x[keep], y[keep]
    return attack.apply(xs), ys, attack.target_labels(ys, k)


def backdoor_metrics(model: nn.Module, attack: Any, test: Dataset, num_classes: int | None = None,
                     batch_size: int = 256) -> BackdoorMetrics:
    """ACC on the clean test set, ASR and RA on its triggered non-target images."""
    x, y = to_tensors(test)
    acc = float((predict(model, x, batch_size) == y).float().mean())
    xt, yt, target = triggered_test_set(attack, test, num_classes)
    pred = predict(model, xt, batch_size)
    return BackdoorMetrics(
        acc=acc,
        asr=float((pred == target).float().mean()),
        ra=float((pred == yt).float().mean()),
        n_clean=int(y.numel()),
        n_triggered=int(yt.numel()),
    )


def defense_effectiveness_rating(before: BackdoorMetrics | dict, after: BackdoorMetrics | dict) -> float:
    """DER = [max(0, dASR) - max(0, dACC) + 1] / 2 with drops measured before -> after (in [0, 1])."""
    b = before.to_dict() if hasattr(before, "to_dict") else before
    a = after.to_dict() if hasattr(after, "to_dict") else after
    return (max(0.0, b["asr"] - a["asr"]) - max(0.0, b["acc"] - a["acc"]) + 1) / 2


def backdoor_monitor(test_data: Dataset | None, backdoor: Any, num_classes: int | None
                     ) -> Callable[[nn.Module], dict[str, float]] | None:
    """A function giving ``{acc, asr, ra}`` (or ``{acc}`` without an attack) for a model, or None."""
    if test_data is None:
        if backdoor is not None:
            raise InputError("measuring ASR needs test_data as well as the backdoor attack")
        return None

    def measure(model: nn.Module) -> dict[str, float]:
        if backdoor is None:
            return {"acc": accuracy(model, test_data)}
        m = backdoor_metrics(model, backdoor, test_data, num_classes)
        return {"acc": m.acc, "asr": m.asr, "ra": m.ra}

    return measure
