"""Fine-tuning based backdoor removal: vanilla fine-tuning and FT-SAM.

- :class:`FineTune`: plain SGD fine-tuning on a small clean set (the usual baseline).
- :class:`FTSAM`: Zhu, Wei, Shen, Fan, Wu, "Enhancing Fine-Tuning Based Backdoor Defense with
  Sharpness-Aware Minimization", ICCV 2023. Fine-tuning with *adaptive* SAM (ASAM, Kwon et al.,
  ICML 2021): at every step the weights are moved to the worst point of an ellipsoid whose
  axes are scaled by ``|w|``,

      eps = rho * T_w^2 g / ||T_w g||,   T_w = diag(|w| + eta),

  the gradient is taken there and the SGD step is applied from the original weights. The
  large-norm neurons that carry the backdoor get the largest perturbations, which pushes
  the model off the backdoor.

Both take the whole clean set the defender holds and use a class-balanced ``clean_ratio``
share of it (default 5%, the papers' setting); both return a new model and a per-epoch
history (loss, train accuracy, and ACC / ASR / RA when test data and the attack are given).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..base import ModelRepair, RepairResult
from ..data.arrays import ArrayDataset, to_tensors
from ..errors import InputError
from ..registry import REPAIRS
from ..utils import model_device


# --------------------------------------------------------------------------- data
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
        return ArrayDataset(x, y, getattr(dataset, "classes", None))
    rng = np.random.default_rng(seed)
    keep: list[np.ndarray] = []
    labels = y.numpy()
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = max(1, int(round(ratio * len(idx))))
        keep.append(rng.choice(idx, size=k, replace=False))
    chosen = torch.as_tensor(np.sort(np.concatenate(keep)), dtype=torch.long)
    return ArrayDataset(x[chosen], y[chosen], getattr(dataset, "classes", None))


# --------------------------------------------------------------------------- SAM
def _is_scaled(name: str) -> bool:
    """ASAM scales weight tensors (conv, linear, norm weights); biases and embeddings are not scaled."""
    return name.endswith("weight")


class AdaptiveSAM:
    """The two-pass (adaptive) SAM update around a base optimizer.

    Usage per batch: ``loss(w).backward(); sam.perturb(); loss(w + eps).backward();
    sam.restore(); optimizer.step()``. With ``adaptive=False`` it is plain SAM
    (Foret et al., ICLR 2021): ``eps = rho g / ||g||``.
    """

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], rho: float = 2.0, eta: float = 0.01,
                 adaptive: bool = True):
        if not rho > 0:
            raise InputError(f"rho must be > 0, got {rho!r}")
        if eta < 0:
            raise InputError(f"eta must be >= 0, got {eta!r}")
        self.params = [(n, p) for n, p in named_params if p.requires_grad]
        self.rho, self.eta, self.adaptive = float(rho), float(eta), bool(adaptive)
        self._eps: list[tuple[nn.Parameter, torch.Tensor]] = []

    def _scale(self, name: str, p: torch.Tensor) -> torch.Tensor | None:
        if self.adaptive and _is_scaled(name):
            return p.detach().abs() + self.eta
        return None

    @torch.no_grad()
    def perturbation(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """``eps`` for every parameter with a gradient (the formula above)."""
        scaled = []
        for name, p in self.params:
            if p.grad is None:
                continue
            t = self._scale(name, p)
            scaled.append((p, t, p.grad if t is None else t * p.grad))
        if not scaled:
            raise InputError("no parameter has a gradient: call backward() before perturb()")
        norm = torch.norm(torch.stack([tg.norm(2) for _, _, tg in scaled]), 2) + 1e-12
        return [(p, (tg if t is None else t * tg) * (self.rho / norm)) for p, t, tg in scaled]

    @torch.no_grad()
    def perturb(self) -> None:
        """Move the weights to ``w + eps`` (remembering ``eps``)."""
        self._eps = self.perturbation()
        for p, e in self._eps:
            p.add_(e)

    @torch.no_grad()
    def restore(self) -> None:
        """Move the weights back to ``w`` (the gradients, taken at ``w + eps``, are kept)."""
        for p, e in self._eps:
            p.sub_(e)
        self._eps = []


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers still normalize with batch statistics but do not update running stats (momentum 0)."""
    saved = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            saved.append((m, m.momentum))
            m.momentum = 0.0
    try:
        yield
    finally:
        for m, mom in saved:
            m.momentum = mom


# --------------------------------------------------------------------------- loop
def backdoor_monitor(test_data: Dataset | None, backdoor: Any, num_classes: int | None
                     ) -> Callable[[nn.Module], dict[str, float]] | None:
    """A function giving ``{acc, asr, ra}`` (or ``{acc}`` without an attack) for a model, or None."""
    if test_data is None:
        if backdoor is not None:
            raise InputError("measuring ASR needs test_data as well as the backdoor attack")
        return None
    from ..eval.backdoor import backdoor_metrics
    from ..eval.metrics import accuracy

    def measure(model: nn.Module) -> dict[str, float]:
        if backdoor is None:
            return {"acc": accuracy(model, test_data)}
        m = backdoor_metrics(model, backdoor, test_data, num_classes)
        return {"acc": m.acc, "asr": m.asr, "ra": m.ra}

    return measure


def finetune_loop(
    model: nn.Module,
    data: Dataset,
    *,
    epochs: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    batch_size: int,
    label_smoothing: float = 0.0,
    schedule: str = "cosine",
    sam: dict[str, Any] | None = None,
    trainable: Callable[[str, nn.Parameter], bool] | None = None,
    train_mode: Callable[[nn.Module], None] | None = None,
    monitor: Callable[[nn.Module], dict[str, float]] | None = None,
    eval_every: int = 1,
    seed: int = 0,
    progress: bool = True,
    desc: str = "fine-tune",
) -> list[dict[str, Any]]:
    """Fine-tune ``model`` in place with SGD (and adaptive SAM when ``sam`` holds its kwargs).

    ``trainable(name, param)`` selects the parameters to update (others are frozen for the
    loop and restored after); ``train_mode(model)`` replaces ``model.train()`` (e.g. to keep
    frozen BatchNorm layers in eval mode). ``monitor(model)`` is called before the first epoch
    (history row ``epoch 0``) and every ``eval_every`` epochs.
    """
    from ..training import make_scheduler

    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise InputError(f"epochs must be an integer >= 1, got {epochs!r}")
    if not lr > 0:
        raise InputError(f"lr must be > 0, got {lr!r}")
    if not 0 <= label_smoothing < 1:
        raise InputError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
    device = model_device(model)
    named = list(model.named_parameters())
    saved_flags = [(p, p.requires_grad) for _, p in named]
    if trainable is not None:
        for n, p in named:
            p.requires_grad_(p.requires_grad and trainable(n, p))
    params = [(n, p) for n, p in named if p.requires_grad]
    if not params:
        raise InputError("nothing to fine-tune: no parameter is trainable")
    opt = torch.optim.SGD([p for _, p in params], lr=lr, momentum=momentum, weight_decay=weight_decay)
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    sched = make_scheduler(opt, schedule, epochs * len(loader))
    asam = AdaptiveSAM(params, **sam) if sam is not None else None
    history: list[dict[str, Any]] = []
    if monitor is not None:
        history.append({"epoch": 0, **monitor(model)})
    bar = tqdm(total=epochs * len(loader), desc=desc, disable=None if progress else True, unit="batch", leave=False)
    try:
        for epoch in range(1, epochs + 1):
            (train_mode or nn.Module.train)(model)
            t0 = time.perf_counter()
            loss_sum = correct = seen = 0.0
            for x, y in loader:
                x, y = x.to(device), torch.as_tensor(y).to(device)
                opt.zero_grad(set_to_none=True)
                logits = model(x)
                loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
                if not torch.isfinite(loss):
                    raise RuntimeError(f"fine-tuning diverged at epoch {epoch} (loss {float(loss)}); lower lr (now {lr})")
                loss.backward()
                if asam is not None:
                    asam.perturb()
                    opt.zero_grad(set_to_none=True)
                    with frozen_bn_stats(model):
                        F.cross_entropy(model(x), y, label_smoothing=label_smoothing).backward()
                    asam.restore()
                opt.step()
                sched.step()
                n = y.numel()
                loss_sum += float(loss.detach()) * n
                correct += float((logits.detach().argmax(1) == y).sum())
                seen += n
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{loss_sum / seen:.3f}")
            row: dict[str, Any] = {"epoch": epoch, "loss": loss_sum / seen, "train_acc": correct / seen,
                                   "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}
            if monitor is not None and (epoch % max(1, eval_every) == 0 or epoch == epochs):
                row.update(monitor(model))
            history.append(row)
    finally:
        bar.close()
        for p, flag in saved_flags:
            p.requires_grad_(flag)
        model.eval()
    return history


# --------------------------------------------------------------------------- defenses
class _FineTuneRepair(ModelRepair):
    """Shared arguments and bookkeeping of :class:`FineTune` and :class:`FTSAM`."""

    uses_sam = False

    def __init__(self, epochs: int = 100, lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 5e-4,
                 batch_size: int = 256, label_smoothing: float = 0.0, clean_ratio: float = 0.05,
                 schedule: str = "cosine", eval_every: int = 1, seed: int = 0):
        if not 0 < clean_ratio <= 1:
            raise InputError(f"clean_ratio must be in (0, 1], got {clean_ratio!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.epochs, self.lr, self.momentum, self.weight_decay = epochs, float(lr), float(momentum), float(weight_decay)
        self.batch_size, self.label_smoothing, self.clean_ratio = batch_size, float(label_smoothing), float(clean_ratio)
        self.schedule, self.eval_every, self.seed = schedule, int(eval_every), int(seed)

    def _sam(self) -> dict[str, Any] | None:
        return None

    def repair(self, model: nn.Module, clean_data: Dataset, *, test_data: Dataset | None = None,
               backdoor: Any = None, num_classes: int | None = None, inplace: bool = False,
               progress: bool = True) -> RepairResult:
        """Fine-tune a copy of ``model`` (``inplace=True``: the model itself) on the clean subset.

        ``clean_data`` is all the clean data the defender holds; a class-balanced
        ``clean_ratio`` share is used. With ``test_data`` (and ``backdoor``, the attack whose
        trigger is measured) the history holds ACC (and ASR / RA) before and after each epoch.
        """
        if not isinstance(model, nn.Module):
            raise InputError(f"model must be an nn.Module, got {type(model).__name__}")
        subset = class_balanced_subset(clean_data, self.clean_ratio, self.seed)
        net = model if inplace else copy.deepcopy(model)
        monitor = backdoor_monitor(test_data, backdoor, num_classes)
        history = finetune_loop(
            net, subset, epochs=self.epochs, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
            batch_size=self.batch_size, label_smoothing=self.label_smoothing, schedule=self.schedule,
            sam=self._sam(), monitor=monitor, eval_every=self.eval_every, seed=self.seed, progress=progress,
            desc=type(self).__name__,
        )
        details = {"clean_samples": len(subset), "steps_per_epoch": math.ceil(len(subset) / self.batch_size)}
        return RepairResult(net, history, details)

    def __repr__(self) -> str:
        keys = ("epochs", "lr", "batch_size", "label_smoothing", "clean_ratio")
        return f"{type(self).__name__}(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in keys) + ")"


@REPAIRS.register("finetune")
class FineTune(_FineTuneRepair):
    """Vanilla fine-tuning on a class-balanced clean subset: the baseline of FT-SAM's Table 1.

    Same budget as :class:`FTSAM` (SGD lr 0.01, momentum 0.9, weight decay 5e-4, batch 256,
    cosine schedule, 5% clean data) but plain cross-entropy steps without label smoothing.
    """


@REPAIRS.register("ft_sam")
class FTSAM(_FineTuneRepair):
    """FT-SAM (Zhu et al., ICCV 2023): fine-tuning with adaptive sharpness-aware minimization.

    Defaults are the paper's CIFAR-10 setting: ``rho = 2`` (use 8 for GTSRB / Tiny-ImageNet),
    SGD lr 0.01, momentum 0.9, weight decay 5e-4, batch 256, 100 epochs, cosine schedule,
    label smoothing 0.1, 5% class-balanced clean data. ``T_w = |w| + eta`` on weight tensors
    (``eta = 0.01`` as in the ASAM code FT-SAM builds on; biases are unscaled); on the
    second (perturbed) forward pass BatchNorm running statistics are not updated
    (momentum 0). Epochs here are passes over the clean subset, so with small data keep the
    number of *steps* in mind (``details['steps_per_epoch']``).
    """

    uses_sam = True

    def __init__(self, rho: float = 2.0, eta: float = 0.01, adaptive: bool = True, epochs: int = 100,
                 lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 5e-4, batch_size: int = 256,
                 label_smoothing: float = 0.1, clean_ratio: float = 0.05, schedule: str = "cosine",
                 eval_every: int = 1, seed: int = 0):
        super().__init__(epochs, lr, momentum, weight_decay, batch_size, label_smoothing, clean_ratio, schedule,
                         eval_every, seed)
        if not rho > 0:
            raise InputError(f"rho must be > 0, got {rho!r}")
        if eta < 0:
            raise InputError(f"eta must be >= 0, got {eta!r}")
        self.rho, self.eta, self.adaptive = float(rho), float(eta), bool(adaptive)

    def _sam(self) -> dict[str, Any]:
        return {"rho": self.rho, "eta": self.eta, "adaptive": self.adaptive}

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", rho={self.rho}, eta={self.eta})"
