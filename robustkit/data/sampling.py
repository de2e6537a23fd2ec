"""Sampling helpers: class-balanced subsets (the defender's small clean set)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import InputError
from .arrays import ArrayDataset, declared_classes, to_tensors


def class_balanced_subset(dataset: Dataset, ratio: float, seed: int = 0) -> ArrayDataset:
    """``round(ratio * n_c)`` samples (at least one) of every class ``c``, drawn with ``seed``.

    ``ratio = 1`` returns the whole set (as an :class:`ArrayDataset`).
    """
    if not (0 < float(ratio) <= 1):
        raise InputError(f"clean_ratio must be in (0, 1], got {ratio!r}")
    x, y = to_tensors(dataset)
    if x.shape[0] == 0:
        raise InputError("the clean data set is empty")
    if ratio >= 1:
        return ArrayDataset(x, y, declared_classes(dataset))
    rng = np.random.default_rng(seed)
    keep: list[np.ndarray] = []
    labels = y.numpy()
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = max(1, int(round(ratio * len(idx))))
        keep.append(rng.choice(idx, size=k, replace=False))
    chosen = torch.as_tensor(np.sort(np.concatenate(keep)), dtype=torch.long)
    return ArrayDataset(x[chosen], y[chosen], declared_classes(dataset))
