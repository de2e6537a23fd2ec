"""Inference helpers every layer uses: :func:`eval_mode`, :func:`predict`, :func:`accuracy`."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .utils import batches, model_device
from .validation import check_images, check_labels


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
def accuracy(model: nn.Module, data: Dataset | tuple[torch.Tensor, torch.Tensor], batch_size: int = 256) -> float:
    """Top-1 accuracy on a dataset of (image, label) pairs or an ``(x, y)`` tensor pair."""
    if isinstance(data, tuple):
        x, y = data
        check_labels(y, x.shape[0])
        return float((predict(model, x, batch_size) == y.cpu()).float().mean())
    device = model_device(model)
    correct = total = 0
    with eval_mode(model):
        for xb, yb in DataLoader(data, batch_size=batch_size, shuffle=False):
            xb, yb = xb.to(device), torch.as_tensor(yb).to(device)
            correct += int((model(xb).argmax(1) == yb).sum())
            total += int(yb.numel())
    return correct / max(1, total)
