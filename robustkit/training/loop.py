"""The one training loop: :func:`fit` with a pluggable per-batch step and callbacks.

Plain training (:func:`robustkit.training.train_classifier`), the backdoor repairs (FineTune,
FT-SAM, skip suppression's stage fine-tuning) and adversarial training all run here; what
differs is the :class:`~robustkit.training.steps.TrainStep` and the callbacks.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..errors import ConfigError, InputError
from ..utils import model_device, progress_bar
from .optim import make_optimizer, make_scheduler
from .steps import PlainStep, TrainStep


class Callback:
    """Hooks of :func:`fit`; override what you need."""

    def on_fit_start(self, model: nn.Module, history: list[dict[str, Any]]) -> None:
        """Before the first epoch (may append an ``epoch 0`` row to ``history``)."""

    def on_epoch_end(self, model: nn.Module, epoch: int, row: dict[str, Any]) -> None:
        """After each epoch, with the model in eval mode; may add keys to ``row``."""


class Monitor(Callback):
    """Adds ``measure(model)`` (e.g. ``{acc, asr, ra}``) to an ``epoch 0`` row and every ``every`` epochs (and the last)."""

    def __init__(self, measure: Callable[[nn.Module], dict[str, float]], every: int = 1, epochs: int | None = None):
        self.measure, self.every, self.epochs = measure, max(1, int(every)), epochs

    def on_fit_start(self, model: nn.Module, history: list[dict[str, Any]]) -> None:
        history.append({"epoch": 0, **self.measure(model)})

    def on_epoch_end(self, model: nn.Module, epoch: int, row: dict[str, Any]) -> None:
        if epoch % self.every == 0 or epoch == self.epochs:
            row.update(self.measure(model))


class EpochEnd(Callback):
    """Adapts a plain ``fn(epoch, row)`` (the older ``on_epoch_end`` argument)."""

    def __init__(self, fn: Callable[[int, dict[str, Any]], None]):
        self.fn = fn

    def on_epoch_end(self, model: nn.Module, epoch: int, row: dict[str, Any]) -> None:
        self.fn(epoch, row)


def check_epochs_lr(epochs: Any, lr: Any) -> None:
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"epochs must be an integer >= 1, got {epochs!r}", "epochs")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ConfigError(f"lr must be > 0, got {lr!r}", "lr")


def fit(
    model: nn.Module,
    data: Dataset,
    step: TrainStep | None = None,
    *,
    epochs: int = 10,
    lr: float = 0.05,
    batch_size: int = 64,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    schedule: str = "cosine",
    warmup_epochs: float = 0.0,
    trainable: Callable[[str, nn.Parameter], bool] | None = None,
    train_mode: Callable[[nn.Module], None] | None = None,
    callbacks: Sequence[Callback] | Iterable[Callback] = (),
    seed: int = 0,
    progress: bool = True,
    desc: str = "train",
) -> list[dict[str, Any]]:
    """Train ``model`` in place; return one history row per epoch (plus rows callbacks add).

    Every epoch shuffles ``data`` with a generator seeded by ``seed``, calls ``step`` on each
    batch (default: :class:`PlainStep`, cross-entropy), then the optimizer and the per-step LR
    schedule. ``trainable(name, param)`` restricts the updated parameters (the others are
    frozen for the call and their ``requires_grad`` restored after); ``train_mode(model)``
    replaces ``model.train()`` (e.g. to keep frozen BatchNorm layers in eval mode). The model
    is in eval mode when callbacks run and when ``fit`` returns. A non-finite loss raises
    ``RuntimeError`` naming the epoch and the learning rate.
    """
    check_epochs_lr(epochs, lr)
    if len(data) == 0:  # type: ignore[arg-type]
        raise InputError("training set is empty")
    step = step or PlainStep()
    device = model_device(model)
    named = list(model.named_parameters())
    saved_flags = [(p, p.requires_grad) for _, p in named]
    if trainable is not None:
        for n, p in named:
            p.requires_grad_(p.requires_grad and trainable(n, p))
    try:
        params = [(n, p) for n, p in named if p.requires_grad]
        if not params:
            raise InputError("nothing to train: no parameter is trainable")
        loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
        opt = make_optimizer([p for _, p in params], optimizer, lr, momentum, weight_decay)
        steps_per_epoch = len(loader)
        sched = make_scheduler(opt, schedule, epochs * steps_per_epoch, int(warmup_epochs * steps_per_epoch))
        step.setup(model, params)
        callbacks = list(callbacks)
        history: list[dict[str, Any]] = []
        for cb in callbacks:
            cb.on_fit_start(model, history)
        bar = progress_bar(epochs * steps_per_epoch, desc, progress, unit="batch")
        try:
            for epoch in range(1, epochs + 1):
                (train_mode or nn.Module.train)(model)
                t0 = time.perf_counter()
                loss_sum = correct = seen = 0.0
                for x, y in loader:
                    x, y = x.to(device, non_blocking=True), torch.as_tensor(y).to(device, non_blocking=True)
                    opt.zero_grad(set_to_none=True)
                    try:
                        loss, logits = step(model, x, y)
                    except FloatingPointError as exc:
                        raise RuntimeError(f"{desc} diverged at epoch {epoch} ({exc}); lower lr (now {lr})") from None
                    opt.step()
                    sched.step()
                    n = y.numel()
                    loss_sum += float(loss) * n
                    correct += float((logits.argmax(1) == y).sum())
                    seen += n
                    bar.update(1)
                    bar.set_postfix(epoch=epoch, loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
                row: dict[str, Any] = {"epoch": epoch, "loss": loss_sum / seen, "train_acc": correct / seen,
                                       "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}
                model.eval()
                for cb in callbacks:
                    cb.on_epoch_end(model, epoch, row)
                history.append(row)
        finally:
            bar.close()
    finally:
        for p, flag in saved_flags:
            p.requires_grad_(flag)
        model.eval()
    return history
