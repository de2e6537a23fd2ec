"""In-memory image datasets, the ``DataBundle`` every dataset factory returns, and helpers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ..errors import InputError
from ..validation import check_images, check_labels


class ArrayDataset(Dataset):
    """Images (float N x C x H x W in [0, 1]) and integer labels held in memory."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str] | None = None):
        check_images(images, "images")
        check_labels(labels, images.shape[0], "labels")
        self.images = images.float().contiguous()
        self.labels = labels.long().contiguous()
        n_cls = int(self.labels.max()) + 1 if self.labels.numel() else 0
        if classes is not None and len(classes) < n_cls:
            raise InputError(f"labels go up to {n_cls - 1} but only {len(classes)} class names were given")
        self.classes = list(classes) if classes is not None else [str(i) for i in range(n_cls)]

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.images.shape[2], self.images.shape[3])

    def subset(self, indices: Sequence[int] | torch.Tensor | np.ndarray) -> "ArrayDataset":
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return ArrayDataset(self.images[idx], self.labels[idx], self.classes)

    def __repr__(self) -> str:
        return f"ArrayDataset(n={len(self)}, shape={tuple(self.images.shape[1:])}, classes={self.num_classes})"


@dataclass
class DataBundle:
    """A train / test pair plus what a model needs to know about the images."""

    train: Dataset
    test: Dataset
    num_classes: int
    channels: int
    image_size: tuple[int, int]
    classes: list[str] = field(default_factory=list)
    name: str = ""

    def __repr__(self) -> str:
        return (f"DataBundle({self.name!r}: {len(self.train)} train / {len(self.test)} test, "  # type: ignore[arg-type]
                f"{self.channels}x{self.image_size[0]}x{self.image_size[1]}, {self.num_classes} classes)")


def to_tensors(dataset: Dataset, max_samples: int | None = None, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack a dataset of (image, label) pairs into ``(x, y)`` tensors (the first ``max_samples``)."""
    n = len(dataset)  # type: ignore[arg-type]
    if max_samples is not None:
        if max_samples < 1:
            raise InputError(f"max_samples must be >= 1, got {max_samples}")
        n = min(n, max_samples)
    if isinstance(dataset, ArrayDataset):
        return dataset.images[:n], dataset.labels[:n]
    if isinstance(dataset, Subset) and isinstance(dataset.dataset, ArrayDataset):
        idx = torch.as_tensor(list(dataset.indices[:n]), dtype=torch.long)
        return dataset.dataset.images[idx], dataset.dataset.labels[idx]
    view = Subset(dataset, range(n)) if n < len(dataset) else dataset  # type: ignore[arg-type]
    xs, ys = [], []
    for xb, yb in DataLoader(view, batch_size=batch_size, shuffle=False):
        xs.append(xb)
        ys.append(torch.as_tensor(yb))
    if not xs:
        raise InputError("dataset is empty")
    return torch.cat(xs).float(), torch.cat(ys).long()


def stratified_split(labels: Sequence[int] | torch.Tensor | np.ndarray, test_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic per-class split: ``round(test_fraction * n_c)`` of each class go to test."""
    if not 0 < test_fraction < 1:
        raise InputError(f"test_fraction must be in (0, 1), got {test_fraction}")
    y = np.asarray(labels).astype(np.int64)
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        k = int(round(test_fraction * len(idx)))
        if len(idx) > 1:
            k = min(max(k, 1), len(idx) - 1)
        test_idx.append(idx[:k])
        train_idx.append(idx[k:])
    tr, te = np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(test_idx))
    # shuffle once so that the first n test samples are class-mixed (evaluate's n_samples)
    return rng.permutation(tr), rng.permutation(te)


def bundle_from_arrays(
    name: str, x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
    classes: Sequence[str] | None = None,
) -> DataBundle:
    n_cls = int(max(int(y_train.max()), int(y_test.max()))) + 1
    classes = list(classes) if classes is not None else [str(i) for i in range(n_cls)]
    train = ArrayDataset(x_train, y_train, classes)
    test = ArrayDataset(x_test, y_test, classes)
    if train.images.shape[1:] != test.images.shape[1:]:
        raise InputError(f"train images {tuple(train.images.shape[1:])} and test images {tuple(test.images.shape[1:])} differ in shape")
    return DataBundle(train, test, len(classes), train.channels, train.image_size, classes, name)
