"""The collapse guard every repair shares: a held-out part of the defender's clean data, the
input model's clean accuracy on it, and a loud flag when the repaired model fell too far below.

A repair must never hand back a model whose clean accuracy collapsed without saying so. The
defender holds ``clean_data``; a repair trains on a class-balanced ``clean_ratio`` share of it
(:func:`split_clean`). A further class-balanced ``holdout_ratio`` share, disjoint from the
training share and never trained on, is the *held-out clean split*. Clean accuracy on it is
measured for the input model and for the repaired model; when it fell by more than
``max_acc_drop`` (absolute, default :data:`MAX_ACC_DROP` = 0.10, i.e. 10 points) the result's
``collapsed`` flag is set and a :class:`RuntimeWarning` names both numbers
(:func:`check_collapse`). The numbers are also recorded in the repair's typed details.

Caveat written into the docs: the held-out images usually come from the split the suspect was
trained on, so the input model's accuracy there is its *training* accuracy (near 1); the bound
is on the drop, which a fine-tuning that merely forgets a little stays well inside.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from torch import nn
from torch.utils.data import Dataset

from ..data.arrays import ArrayDataset, declared_classes, to_tensors
from ..errors import InputError, RepairError
from ..inference import predict

#: Default bound on the held-out clean-accuracy drop of a repair (absolute, 10 points).
MAX_ACC_DROP = 0.10
#: Default share of the defender's clean data held out (never trained on) for the guard.
HOLDOUT_RATIO = 0.05


SuppressionError = RepairError  # the name skip suppression raises; defined with the other errors


def check_bound(value: float, name: str) -> float:
    """A bound in [0, 1] (accuracy points as a fraction)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value <= 1:
        raise InputError(f"{name} must be a number in [0, 1] (a drop in accuracy, 0.1 = 10 points), got {value!r}")
    return float(value)


def check_ratio(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 < value < 1:
        raise InputError(f"{name} must be a number in (0, 1), got {value!r}")
    return float(value)


@dataclass
class CleanSplit:
    """The defender's training share and its held-out clean split (``holdout_source`` says where it came from)."""

    train: ArrayDataset
    holdout: ArrayDataset
    holdout_source: str


def _balanced_pick(labels: np.ndarray, pool: np.ndarray, ratio: float, totals: dict[int, int],
                   rng: np.random.Generator) -> np.ndarray:
    """``round(ratio * totals[c])`` (at least 1, at most what is left) indices of each class from ``pool``."""
    out = []
    for c, total in totals.items():
        idx = pool[labels[pool] == c]
        k = min(len(idx), max(1, int(round(ratio * total))))
        if k:
            out.append(rng.choice(idx, size=k, replace=False))
    return np.sort(np.concatenate(out)) if out else np.zeros(0, dtype=np.int64)


def _balanced_indices(labels: np.ndarray, ratio: float, seed: int) -> np.ndarray:
    """The indices :func:`~robustkit.data.sampling.class_balanced_subset` draws (same generator, same order)."""
    if ratio >= 1:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    keep = [rng.choice(idx, size=max(1, int(round(ratio * len(idx)))), replace=False)
            for idx in (np.flatnonzero(labels == c) for c in np.unique(labels))]
    return np.sort(np.concatenate(keep))


def split_clean(clean_data: Dataset, clean_ratio: float, holdout_ratio: float = HOLDOUT_RATIO,
                seed: int = 0) -> CleanSplit:
    """The class-balanced training share (the same draw as
    :func:`~robustkit.data.sampling.class_balanced_subset`) and a class-balanced held-out share of
    ``holdout_ratio`` of every class, drawn from the clean data *outside* the training share.

    When nothing is left over (``clean_ratio = 1``), the held-out share is carved out of the
    training share instead (those images are then not trained on); ``holdout_source`` says which.
    """
    if isinstance(clean_ratio, bool) or not isinstance(clean_ratio, (int, float)) or not 0 < clean_ratio <= 1:
        raise InputError(f"clean_ratio must be in (0, 1], got {clean_ratio!r}")
    holdout_ratio = check_ratio(holdout_ratio, "holdout_ratio")
    x, y = to_tensors(clean_data)
    if x.shape[0] == 0:
        raise InputError("the clean data set is empty")
    labels = y.numpy()
    classes = declared_classes(clean_data)
    used = _balanced_indices(labels, clean_ratio, seed)
    totals = {int(c): int((labels == c).sum()) for c in np.unique(labels)}
    rng = np.random.default_rng([seed, 1])
    rest = np.setdiff1d(np.arange(len(labels)), used)
    source = "clean data outside the training share"
    if not rest.size:  # everything is trained on: hold out part of the training share instead
        rest, source = used, "part of the training share (not trained on)"
    hold = _balanced_pick(labels, rest, holdout_ratio, totals, rng)
    train = np.setdiff1d(used, hold)
    if not train.size:
        raise InputError("the clean data is too small to hold out a clean split for the collapse check")
    return CleanSplit(ArrayDataset(x[train], y[train], classes), ArrayDataset(x[hold], y[hold], classes), source)


def clean_accuracy(model: nn.Module, data: ArrayDataset, batch_size: int = 256) -> float:
    """Top-1 accuracy on ``data`` (model in eval mode; every module's mode restored after)."""
    return float((predict(model, data.images, batch_size) == data.labels).float().mean())


@dataclass
class CollapseCheck:
    """Held-out clean accuracy before and after a repair, the bound and the verdict."""

    acc_before: float
    acc_after: float
    max_acc_drop: float
    samples: int
    collapsed: bool

    @property
    def drop(self) -> float:
        return self.acc_before - self.acc_after


def check_collapse(name: str, acc_before: float, model: nn.Module, holdout: ArrayDataset, max_acc_drop: float,
                   stacklevel: int = 3) -> CollapseCheck:
    """Measure ``model`` on ``holdout``; warn (``RuntimeWarning``) when it fell more than ``max_acc_drop`` below ``acc_before``."""
    after = clean_accuracy(model, holdout)
    collapsed = acc_before - after > max_acc_drop + 1e-12
    if collapsed:
        warnings.warn(
            f"{name}: the repaired model's clean accuracy on {len(holdout)} held-out clean images fell from "
            f"{acc_before:.1%} to {after:.1%} ({(acc_before - after) * 100:.1f} points, bound max_acc_drop="
            f"{max_acc_drop:g}); the repair collapsed the model - RepairResult.collapsed is set",
            RuntimeWarning, stacklevel=stacklevel)
    return CollapseCheck(acc_before, after, max_acc_drop, len(holdout), collapsed)
