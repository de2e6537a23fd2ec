"""In-memory image datasets, the ``DataBundle`` every dataset factory returns, and helpers."""

from __future__ import annotations

import dataclasses

import numbers
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ..errors import InputError
from ..validation import check_images, check_labels

IndexLike = Sequence[int] | torch.Tensor | np.ndarray


def _as_index(indices: IndexLike, n: int) -> torch.Tensor:
    """Integer indices (or a boolean mask of length ``n``) as a 1-D int64 tensor."""
    arr = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices)
    if arr.dtype == bool:
        if arr.shape != (n,):
            raise InputError(f"a boolean mask must have shape ({n},), got {arr.shape}")
        arr = np.flatnonzero(arr)
    if arr.size == 0:
        arr = arr.astype(np.int64)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"indices must be a 1-D sequence of integers, got dtype {arr.dtype} shape {arr.shape}")
    if arr.size and (int(arr.min()) < -n or int(arr.max()) >= n):
        raise InputError(f"indices out of range for a dataset of {n} samples (min {int(arr.min())}, max {int(arr.max())})")
    return torch.from_numpy(arr.astype(np.int64))


class ArrayDataset(Dataset):
    """Images (float32 N x C x H x W in [0, 1]) and int64 labels held in memory.

    Labels of any integer dtype (int32, uint8, ...) are accepted and stored as int64, the dtype
    losses and indexing need; float labels are refused.

    ``classes`` names the classes (default ``"0"``, ``"1"``, ...); it may list more classes
    than the labels use, never fewer. ``ds[i]`` is ``(image C x H x W, int label)``.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str] | None = None):
        check_images(images, "images")
        labels = check_labels(labels, images.shape[0], "labels", convert=True)
        self.images: torch.Tensor = images.detach().float().contiguous()
        self.labels: torch.Tensor = labels.detach().long().contiguous()
        n_cls = int(self.labels.max()) + 1 if self.labels.numel() else 0
        if classes is not None:
            if isinstance(classes, str):
                raise InputError(f"classes must be a list of names, got the string {classes!r}")
            classes = [str(c) for c in classes]
            if len(classes) < n_cls:
                raise InputError(f"labels go up to {n_cls - 1} but only {len(classes)} class names were given")
        self.classes: list[str] = list(classes) if classes is not None else [str(i) for i in range(n_cls)]
        # False when the class list was inferred from max(label) + 1 (see declared_num_classes)
        self.classes_declared: bool = classes is not None

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

    def subset(self, indices: IndexLike) -> "ArrayDataset":
        """A new ``ArrayDataset`` with the samples at ``indices`` (ints or a boolean mask); same classes."""
        idx = _as_index(indices, len(self))
        if idx.numel() == 0:
            raise InputError("subset() needs at least one index (an ArrayDataset cannot be empty)")
        out = ArrayDataset(self.images[idx], self.labels[idx], self.classes)
        out.classes_declared = self.classes_declared
        return out

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

    def __post_init__(self) -> None:
        self.image_size = (int(self.image_size[0]), int(self.image_size[1]))
        self.classes = [str(c) for c in self.classes]

    @property
    def test_is_train(self) -> bool:
        """True when the test split is the training split itself (an ``.npz`` of ``x, y`` used as given):
        accuracy measured on it after training on it is not held-out accuracy."""
        return self.test is self.train

    def with_train(self, train: Dataset) -> "DataBundle":
        """The same bundle with another training split (poisoned, filtered, ...)."""
        return dataclasses.replace(self, train=train)

    def __repr__(self) -> str:
        return (f"DataBundle({self.name!r}: {len(self.train)} train / {len(self.test)} test, "  # type: ignore[arg-type]
                f"{self.channels}x{self.image_size[0]}x{self.image_size[1]}, {self.num_classes} classes)")


def declared_num_classes(dataset: Dataset) -> int | None:
    """The class count a dataset declares (through ``Subset`` s), or ``None`` if it declares none.

    An :class:`ArrayDataset` declares its ``classes`` when they were given (every dataset
    factory and :func:`bundle_from_arrays` give them); other datasets declare an integer
    ``num_classes`` or a ``classes`` list. A count inferred from ``max(label) + 1`` is not a
    declaration: a test set missing the last classes would understate it.
    """
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    if isinstance(dataset, ArrayDataset):
        return dataset.num_classes if dataset.classes_declared else None
    k = getattr(dataset, "num_classes", None)
    if isinstance(k, numbers.Integral) and not isinstance(k, bool) and k >= 1:
        return int(k)
    classes = getattr(dataset, "classes", None)
    if isinstance(classes, (list, tuple)) and classes:
        return len(classes)
    return None


def declared_classes(dataset: Dataset) -> list[str] | None:
    """The class names a dataset declares (through ``Subset`` s), or ``None`` (see :func:`declared_num_classes`)."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    if isinstance(dataset, ArrayDataset):
        return list(dataset.classes) if dataset.classes_declared else None
    classes = getattr(dataset, "classes", None)
    return [str(c) for c in classes] if isinstance(classes, (list, tuple)) and classes else None


def _resolve_array_subset(dataset: Dataset) -> tuple[ArrayDataset, torch.Tensor | None] | None:
    """``(base, indices)`` when ``dataset`` is an ArrayDataset or (nested) Subsets of one, else None."""
    chain: list[Sequence[int]] = []
    while isinstance(dataset, Subset):
        chain.append(dataset.indices)
        dataset = dataset.dataset
    if not isinstance(dataset, ArrayDataset):
        return None
    idx: torch.Tensor | None = None
    for ind in reversed(chain):  # innermost subset first
        cur = torch.as_tensor(np.asarray(ind, dtype=np.int64).reshape(-1))
        idx = cur if idx is None else idx[cur]
    return dataset, idx


def to_tensors(dataset: Dataset, max_samples: int | None = None, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack the first ``max_samples`` (default: all) ``(image, label)`` pairs into ``(x, y)``.

    ``x`` is float32 N x C x H x W in [0, 1] (checked), ``y`` int64 N (labels of another
    integer dtype are converted, float labels refused). An :class:`ArrayDataset` (or ``Subset`` of
    one) is read without a loop; for a whole ``ArrayDataset`` ``x`` shares its memory, so
    do not modify it in place.
    """
    n = len(dataset)  # type: ignore[arg-type]
    if max_samples is not None:
        if isinstance(max_samples, bool) or not isinstance(max_samples, numbers.Integral) or max_samples < 1:
            raise InputError(f"max_samples must be an integer >= 1 or None, got {max_samples!r}")
        n = min(n, int(max_samples))
    if n == 0:
        raise InputError("dataset is empty")
    resolved = _resolve_array_subset(dataset)
    if resolved is not None:
        base, idx = resolved
        if idx is None:
            return base.images[:n], base.labels[:n]
        idx = idx[:n]
        return base.images[idx], base.labels[idx]
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    view = Subset(dataset, range(n)) if n < len(dataset) else dataset  # type: ignore[arg-type]
    xs, ys = [], []
    for i, batch in enumerate(DataLoader(view, batch_size=batch_size, shuffle=False)):
        if not isinstance(batch, (list, tuple)) or len(batch) != 2:
            raise InputError("the dataset must yield (image, label) pairs")
        xb, yb = batch
        if not isinstance(xb, torch.Tensor):
            raise InputError(f"the dataset's images must be tensors, got {type(xb).__name__}")
        try:
            yb = torch.as_tensor(yb).reshape(-1)
        except (TypeError, ValueError, RuntimeError):
            raise InputError("the dataset's labels must be integer class indices") from None
        xs.append(xb)
        ys.append(check_labels(yb, xb.shape[0], f"labels of the dataset (batch {i})", convert=True))
    x = torch.cat(xs)
    if not x.is_floating_point():
        raise InputError(f"the dataset's images must be float in [0, 1], got dtype {x.dtype} (convert uint8 with x.float() / 255)")
    return check_images(x.float(), "images of the dataset"), torch.cat(ys)


def stratified_split(labels: IndexLike, test_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic per-class split of sample indices into ``(train_idx, test_idx)``.

    ``round(test_fraction * n_c)`` samples of each class ``c`` (at least one and at most
    ``n_c - 1`` when ``n_c > 1``) go to test. The same labels and seed always give the same
    split. Both returned index arrays are in a *shuffled* order (not file order): each split's
    indices are pooled, sorted (so the order does not depend on how the classes were
    visited), then permuted once with the same seeded generator, so that any prefix (an
    evaluation's ``n_samples``) is class-mixed. Use the indices' sorted copy for file order.
    """
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, numbers.Real) or not 0 < test_fraction < 1:
        raise InputError(f"test_fraction must be a number in (0, 1), got {test_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise InputError(f"seed must be an integer, got {seed!r}")
    y = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    if y.ndim != 1 or y.size == 0:
        raise InputError(f"labels must be a non-empty 1-D array of class indices, got shape {y.shape}")
    if not (np.issubdtype(y.dtype, np.integer) or (np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0))):
        raise InputError(f"labels must be integer class indices, got dtype {y.dtype}")
    y = y.astype(np.int64)
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
    if len(tr) == 0 or len(te) == 0:
        raise InputError(
            f"test_fraction={test_fraction} of {len(y)} samples leaves the {'train' if len(tr) == 0 else 'test'} split "
            "empty; use more samples per class or another test_fraction"
        )
    # the documented order: shuffled once, so that the first n test samples are class-mixed (evaluate's n_samples)
    return rng.permutation(tr), rng.permutation(te)


def bundle_from_arrays(
    name: str, x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
    classes: Sequence[str] | None = None,
) -> DataBundle:
    """A :class:`DataBundle` of two :class:`ArrayDataset` s sharing ``classes`` (default ``"0"``...)."""
    train = ArrayDataset(x_train, y_train, classes)
    test = ArrayDataset(x_test, y_test, classes)
    if classes is None:
        n_cls = max(train.num_classes, test.num_classes)
        train.classes = test.classes = [str(i) for i in range(n_cls)]
        train.classes_declared = test.classes_declared = True  # the bundle's class count covers both splits
    if train.images.shape[1:] != test.images.shape[1:]:
        raise InputError(f"train images {tuple(train.images.shape[1:])} and test images {tuple(test.images.shape[1:])} differ in shape")
    return DataBundle(train, test, train.num_classes, train.channels, train.image_size, list(train.classes), name)
