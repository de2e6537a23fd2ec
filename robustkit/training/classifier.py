"""Classifier training: :func:`train_classifier` (cross-entropy, optional train-time preprocessor) and
:func:`train` (adds per-epoch ASR / RA for a backdoor and atomic checkpoints)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from torch import nn
from torch.utils.data import Dataset

from ..backdoor.metrics import backdoor_metrics
from ..data.augment import augment_for
from ..errors import InputError
from ..inference import accuracy
from ..io import atomic_path
from ..models.checkpoints import save_checkpoint
from .loop import Callback, EpochEnd, fit
from .steps import PlainStep, TrainStep


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
    step: TrainStep | None = None,
    callbacks: Sequence[Callback] = (),
    augment: str | None = None,
    crop_padding: int | None = None,
) -> list[dict[str, Any]]:
    """Train ``model`` in place with cross-entropy; return one history row per epoch.

    ``preprocess`` (e.g. a noise + bilateral preprocessor) is applied to every training
    batch before the model, as defenses trained with their preprocessing need. The model
    stays on its device; batches are moved to it. ``on_epoch_end(epoch, row)`` may add keys
    to the epoch's history row (e.g. ASR) or write a checkpoint. Runs :func:`fit` with a
    :class:`PlainStep`, or with ``step`` (e.g. :class:`~robustkit.training.TRADESStep`, which
    holds its own preprocessor) and extra ``callbacks`` (e.g.
    :class:`~robustkit.training.RobustAccuracy`), run before ``val_data`` / ``on_epoch_end``.
    ``augment`` (``"crop"``, ``"crop_flip"`` or ``None``) randomly crops (zero padding ``crop_padding``,
    default H/8) and flips every training batch (:mod:`robustkit.data.augment`), the usual CIFAR-10
    training transform; the preprocessor and the step see the augmented batch.
    """
    if step is not None and (preprocess is not None or label_smoothing):
        raise InputError("pass preprocess / label_smoothing to the step itself when you give step=")
    callbacks = list(callbacks)
    if val_data is not None:
        callbacks.append(EpochEnd(lambda epoch, row: row.__setitem__("val_acc", accuracy(model, val_data))))
    if on_epoch_end is not None:
        callbacks.append(EpochEnd(on_epoch_end))
    step = step if step is not None else PlainStep(label_smoothing, preprocess)
    return fit(model, train_data, step, epochs=epochs, lr=lr, batch_size=batch_size,
               optimizer=optimizer, momentum=momentum, weight_decay=weight_decay, schedule=schedule,
               warmup_epochs=warmup_epochs, callbacks=callbacks, seed=seed, progress=progress, desc=desc,
               augment=augment_for(augment, train_data, crop_padding))


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
    num_classes: int | None = None,
    **kwargs: Any,
) -> TrainResult:
    """Train a classifier (in place) and report clean accuracy, and ASR / RA when ``backdoor`` is given.

    ``backdoor`` is the :class:`~robustkit.base.BackdoorAttack` whose trigger is measured on
    ``test_data`` after every epoch (history keys ``asr``, ``ra``; ``num_classes`` for all-to-all
    targets when the test set does not declare its classes). With ``checkpoint_dir``, a
    robustkit checkpoint is written atomically every ``checkpoint_every`` epochs (0: only the
    last) as ``epoch_XXX.pt`` plus ``last.pt``. Other keyword arguments go to
    :func:`train_classifier` (epochs, lr, optimizer, ...).
    """
    epochs = kwargs.get("epochs", 10)
    saved: list[str] = []
    ckdir = Path(checkpoint_dir) if checkpoint_dir is not None else None

    def on_epoch_end(epoch: int, row: dict[str, Any]) -> None:
        if backdoor is not None and test_data is not None:
            m = backdoor_metrics(model, backdoor, test_data, num_classes)
            row.update(asr=m.asr, ra=m.ra)
        if ckdir is not None and ((checkpoint_every and epoch % checkpoint_every == 0) or epoch == epochs):
            path = save_checkpoint(model, ckdir / f"epoch_{epoch:03d}.pt", name=model_name, **{k: v for k, v in row.items() if isinstance(v, (int, float))})
            saved.append(str(path))

    history = train_classifier(model, train_data, val_data=test_data, on_epoch_end=on_epoch_end, **kwargs)
    if ckdir is not None and saved:
        with atomic_path(ckdir / "last.pt") as tmp:
            shutil.copyfile(saved[-1], tmp)
        saved.append(str(ckdir / "last.pt"))
    last = history[-1]
    metrics = {k: float(last[k]) for k in ("val_acc", "clean_acc", "pgd_acc", "asr", "ra") if k in last}
    return TrainResult(model, history, metrics, saved)
