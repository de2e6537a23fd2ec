"""Supervised training loop for classifiers (optionally with a train-time preprocessor)."""

from __future__ import annotations

import math
from dataclasses import dataclass
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .errors import ConfigError, InputError
from .eval.metrics import accuracy
from .utils import model_device


def make_optimizer(
    model: nn.Module, name: str = "sgd", lr: float = 0.05, momentum: float = 0.9, weight_decay: float = 5e-4
) -> torch.optim.Optimizer:
    """SGD with Nesterov-free momentum (the papers' setting) or AdamW."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise InputError("model has no trainable parameters")
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ConfigError(f"unknown optimizer {name!r}; use 'sgd' or 'adamw'", "optimizer")


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, total_steps: int, warmup_steps: int = 0):
    """Per-step LR schedule: ``"cosine"`` (with optional linear warm-up) or ``"constant"``."""
    if schedule not in ("cosine", "constant"):
        raise ConfigError(f"unknown schedule {schedule!r}; use 'cosine' or 'constant'", "schedule")

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_classifier(
    model: nn.Module,
    train_data: Dataset,
    *,
    epochs: int = 10,
    lr: float = 0.05,
    batch_size: int = 64,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    schedule: str = "cosine",
    warmup_epochs: float = 0.0,
    label_smoothing: float = 0.0,
    preprocess: nn.Module | None = None,
    val_data: Dataset | None = None,
    seed: int = 0,
    progress: bool = True,
    desc: str = "train",
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Train ``model`` in place with cross-entropy; return one history row per epoch.

    ``preprocess`` (e.g. a noise + bilateral preprocessor) is applied to every training
    batch before the model, as defenses trained with their preprocessing need. The model
    stays on its device; batches are moved to it. ``on_epoch_end(epoch, row)`` may add keys
    to the epoch's history row (e.g. ASR) or write a checkpoint.
    """
    if not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"epochs must be an integer >= 1, got {epochs!r}", "epochs")
    if not (lr > 0):
        raise ConfigError(f"lr must be > 0, got {lr!r}", "lr")
    if len(train_data) == 0:  # type: ignore[arg-type]
        raise InputError("training set is empty")
    device = model_device(model)
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(train_data, batch_size=batch_size, shuffle=True, generator=gen, drop_last=False)
    opt = make_optimizer(model, optimizer, lr, momentum, weight_decay)
    steps_per_epoch = len(loader)
    sched = make_scheduler(opt, schedule, epochs * steps_per_epoch, int(warmup_epochs * steps_per_epoch))
    history: list[dict[str, Any]] = []
    bar = tqdm(total=epochs * steps_per_epoch, desc=desc, disable=None if progress else True, unit="batch", leave=False)
    for epoch in range(1, epochs + 1):
        model.train()
        if preprocess is not None:
            preprocess.train()
        t0 = time.perf_counter()
        loss_sum = correct = seen = 0.0
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), torch.as_tensor(y).to(device, non_blocking=True)
            if preprocess is not None:
                with torch.no_grad():
                    x = preprocess(x)
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
            if not torch.isfinite(loss):
                raise RuntimeError(f"training diverged at epoch {epoch} (loss {float(loss)}); lower lr (now {lr})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            n = y.numel()
            loss_sum += float(loss.detach()) * n
            correct += float((logits.argmax(1) == y).sum())
            seen += n
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        row: dict[str, Any] = {
            "epoch": epoch,
            "loss": loss_sum / seen,
            "train_acc": correct / seen,
            "lr": opt.param_groups[0]["lr"],
            "seconds": time.perf_counter() - t0,
        }
        if val_data is not None:
            row["val_acc"] = accuracy(model, val_data)
        if on_epoch_end is not None:
            on_epoch_end(epoch, row)
            model.train()
        history.append(row)
    bar.close()
    model.eval()
    return history


@dataclass
class TrainResult:
    """The trained model, its per-epoch history and final metrics."""

    model: nn.Module
    history: list[dict[str, Any]]
    metrics: dict[str, float]
    checkpoints: list[str]


def train(
    model: nn.Module,
    train_data: Dataset,
    test_data: Dataset | None = None,
    *,
    backdoor: Any = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 0,
    model_name: str | None = None,
    **kwargs: Any,
) -> TrainResult:
    """Train a classifier (in place) and report clean accuracy, and ASR / RA when ``backdoor`` is given.

    ``backdoor`` is the :class:`~robustkit.base.BackdoorAttack` whose trigger is measured on
    ``test_data`` after every epoch (history keys ``asr``, ``ra``). With ``checkpoint_dir``, a
    robustkit checkpoint is written atomically every ``checkpoint_every`` epochs (0: only the
    last) as ``epoch_XXX.pt`` plus ``last.pt``. Other keyword arguments go to
    :func:`train_classifier` (epochs, lr, optimizer, ...).
    """
    from .eval.backdoor import backdoor_metrics
    from .models.loaders import save_checkpoint

    epochs = kwargs.get("epochs", 10)
    saved: list[str] = []
    ckdir = Path(checkpoint_dir) if checkpoint_dir is not None else None

    def on_epoch_end(epoch: int, row: dict[str, Any]) -> None:
        if backdoor is not None and test_data is not None:
            m = backdoor_metrics(model, backdoor, test_data)
            row.update(asr=m.asr, ra=m.ra)
        if ckdir is not None and ((checkpoint_every and epoch % checkpoint_every == 0) or epoch == epochs):
            path = save_checkpoint(model, ckdir / f"epoch_{epoch:03d}.pt", name=model_name, **{k: v for k, v in row.items() if isinstance(v, (int, float))})
            saved.append(str(path))

    history = train_classifier(model, train_data, val_data=test_data, on_epoch_end=on_epoch_end, **kwargs)
    if ckdir is not None and saved:
        import shutil

        from .io import atomic_path

        with atomic_path(ckdir / "last.pt") as tmp:
            shutil.copyfile(saved[-1], tmp)
        saved.append(str(ckdir / "last.pt"))
    last = history[-1]
    metrics = {k: float(last[k]) for k in ("val_acc", "asr", "ra") if k in last}
    return TrainResult(model, history, metrics, saved)
