"""Backdoor metrics in BackdoorBench's conventions (../shared/REFERENCES.md section 6).

- ACC: clean test accuracy.
- ASR: on triggered test images whose true label is not the target (all-to-one), the fraction
  classified as the attacker's label.
- RA (robust accuracy): on the same triggered images, the fraction classified as their true label.
- DER (defense effectiveness rating): ``[max(0, ASR_before - ASR_after) - max(0, ACC_before - ACC_after) + 1] / 2``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from ..data.arrays import to_tensors
from ..errors import InputError
from ..inference import accuracy, predict
from .poisoned import resolve_num_classes


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
    """Triggered copies of the test images that count for ASR: ``(x_triggered, y_true, y_target)``.

    The class count is ``num_classes`` if given, else the one ``test`` declares (a
    :class:`~robustkit.data.DataBundle` split, a ``Subset`` of one, a dataset with
    ``num_classes`` or ``classes``). It is never inferred from ``max(test label) + 1`` for an
    all-to-all attack (a test set missing the last class would map its labels to the wrong
    targets): without a known count that raises :class:`InputError`. The target (all-to-one)
    and every label must be below the count.
    """
    x, y = to_tensors(test)
    k = resolve_num_classes(test, y, attack, num_classes, "measuring the attack success rate")
    keep = torch.ones_like(y, dtype=torch.bool) if attack.all_to_all else y != attack.target
    if not bool(keep.any()):
        raise InputError("the test set has no sample outside the target class: ASR is undefined")
    xs, ys = x[keep], y[keep]
    return attack.apply(xs), ys, attack.target_labels(ys, k)


def backdoor_metrics(model: nn.Module, attack: Any, test: Dataset, num_classes: int | None = None,
                     batch_size: int = 256) -> BackdoorMetrics:
    """ACC on the clean test set, ASR and RA on its triggered non-target images."""
    x, y = to_tensors(test)
    xt, yt, target = triggered_test_set(attack, test, num_classes)
    acc = accuracy(model, (x, y), batch_size)  # also refuses labels the model cannot output
    pred = predict(model, xt, batch_size)
    return BackdoorMetrics(
        acc=acc,
        asr=float((pred == target).float().mean()),
        ra=float((pred == yt).float().mean()),
        n_clean=int(y.numel()),
        n_triggered=int(yt.numel()),
    )


def _rates(metrics: BackdoorMetrics | dict, name: str) -> tuple[float, float]:
    d = metrics.to_dict() if hasattr(metrics, "to_dict") else metrics
    if not isinstance(d, dict) or "acc" not in d or "asr" not in d:
        raise InputError(f"{name} must be BackdoorMetrics or a mapping with 'acc' and 'asr', got {metrics!r}")
    out = []
    for key in ("acc", "asr"):
        v = d[key]
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)) or not 0 <= v <= 1:
            hint = " (fractions in [0, 1], not percentages)" if isinstance(v, numbers.Real) and 1 < v <= 100 else ""
            raise InputError(f"{name}[{key!r}] must be a finite fraction in [0, 1], got {v!r}{hint}")
        out.append(float(v))
    return out[0], out[1]


def defense_effectiveness_rating(before: BackdoorMetrics | dict, after: BackdoorMetrics | dict) -> float:
    """DER = [max(0, dASR) - max(0, dACC) + 1] / 2 with drops measured before -> after (in [0, 1]).

    ``acc`` and ``asr`` must be fractions in [0, 1]: percentages (e.g. 97.5) or NaN raise
    :class:`InputError` instead of giving a rating outside [0, 1].
    """
    b_acc, b_asr = _rates(before, "before")
    a_acc, a_asr = _rates(after, "after")
    return (max(0.0, b_asr - a_asr) - max(0.0, b_acc - a_acc) + 1) / 2


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
