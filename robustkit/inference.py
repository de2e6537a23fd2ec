"""Inference helpers every layer uses: :func:`eval_mode`, :func:`predict`, :func:`accuracy`,
:func:`is_randomized`."""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .errors import InputError
from .utils import batches, model_device
from .validation import check_images, check_labels


def is_randomized(model: nn.Module) -> bool:
    """True when any module of ``model`` declares ``randomized`` (its output is random)."""
    return any(getattr(m, "randomized", False) for m in model.modules())


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put ``models`` in eval mode for the block and restore *every* submodule's own mode after.

    ``model.train(was_training)`` would set one flag on the whole tree (a model whose
    BatchNorm was deliberately frozen in eval mode inside a training model would come back
    in train mode); this restores each module's flag as it was, also on an exception.
    """
    saved = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for m, flag in saved:
            m.training = flag


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Predicted labels for a tensor of images (model in eval mode, on its own device)."""
    check_images(x, "x")
    device = model_device(model)
    with eval_mode(model):
        out = [model(x[s].to(device)).argmax(1).cpu() for s in batches(x.shape[0], batch_size)]
    return torch.cat(out)


@torch.no_grad()
def output_classes(model: nn.Module, x: torch.Tensor) -> int:
    """How many classes ``model`` outputs: one eval-mode forward of the first image of ``x``.

    Use with :func:`~robustkit.validation.check_num_classes` before scoring a checkpoint on a
    data set (every module's mode is restored; nothing is trained).
    """
    check_images(x, "x")
    with eval_mode(model):
        logits = model(x[:1].to(model_device(model)))
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise InputError(f"the model must return N x num_classes logits, got {shape}")
    return int(logits.shape[1])


@torch.no_grad()
def accuracy(model: nn.Module, data: Dataset | tuple[torch.Tensor, torch.Tensor], batch_size: int = 256) -> float:
    """Top-1 accuracy on a dataset of (image, label) pairs or an ``(x, y)`` tensor pair.

    Every batch is validated like any other input (float N x C x H x W in [0, 1], finite,
    integer labels), an empty data set raises instead of scoring 0.0, and a label the model
    cannot output (label >= number of logits: a checkpoint trained on fewer classes) raises
    :class:`~robustkit.errors.InputError` instead of being silently counted as wrong.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if isinstance(data, (tuple, list)):
        if len(data) != 2:
            raise InputError(f"data must be a Dataset or an (x, y) pair, got a {type(data).__name__} of {len(data)} items")
        x, y = data
        check_images(x, "x")
        y = check_labels(y, x.shape[0], "y", convert=True)
        pairs: Iterable = ((x[s], y[s]) for s in batches(x.shape[0], batch_size))
    else:
        if not isinstance(data, Dataset) and not hasattr(data, "__getitem__"):
            raise InputError(f"data must be a Dataset of (image, label) pairs or an (x, y) pair, got {type(data).__name__}")
        try:
            n = len(data)  # type: ignore[arg-type]
        except TypeError:
            raise InputError(f"data must be a sized Dataset, got {type(data).__name__} without len()") from None
        if n == 0:
            raise InputError("data is empty: accuracy of zero samples is undefined")
        pairs = _dataset_batches(data, batch_size)
    device = model_device(model)
    correct = total = 0
    with eval_mode(model):
        for xb, yb in pairs:
            logits = model(xb.to(device))
            if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != xb.shape[0]:
                shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
                raise InputError(f"the model must return N x num_classes logits, got {shape} for {xb.shape[0]} images")
            if int(yb.max()) >= logits.shape[1]:
                raise InputError(
                    f"the data has class index {int(yb.max())} but the model outputs only {logits.shape[1]} classes "
                    "(a checkpoint trained on another data set?)"
                )
            correct += int((logits.argmax(1).cpu() == yb.cpu()).sum())
            total += int(yb.numel())
    if total == 0:
        raise InputError("data is empty: accuracy of zero samples is undefined")
    return correct / total


def _dataset_batches(data: Dataset, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Validated ``(images, labels)`` batches of a dataset of (image, label) pairs."""
    for i, batch in enumerate(DataLoader(data, batch_size=batch_size, shuffle=False)):
        if not isinstance(batch, (list, tuple)) or len(batch) != 2:
            raise InputError("data must yield (image, label) pairs")
        xb, yb = batch
        where = f"images of data (batch {i})"
        if not isinstance(xb, torch.Tensor):
            raise InputError(f"{where} must be tensors, got {type(xb).__name__}")
        check_images(xb, where)
        if not isinstance(yb, torch.Tensor):
            try:
                yb = torch.as_tensor(yb)
            except (TypeError, ValueError, RuntimeError):
                raise InputError(f"labels of data (batch {i}) must be integer class indices") from None
        yield xb, check_labels(yb.reshape(-1), xb.shape[0], f"labels of data (batch {i})", convert=True)
