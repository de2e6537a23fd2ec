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
A further ``holdout_ratio`` share (default 5%), never trained on, guards against collapse: a
held-out clean-accuracy drop above ``max_acc_drop`` (default 0.10) sets
``RepairResult.collapsed`` and warns (:mod:`robustkit.repair.guard`).

``lr="auto"`` (FT-SAM's default; an option of :class:`FineTune`) sets the learning rate from the
suspect's own sharpness instead of the paper's fixed 0.01 (issue #15, docs/repair.md):
``lr = LR_AUTO_FRACTION * 2 (1 + momentum) / lambda_max``, where ``lambda_max`` is the top
eigenvalue of the Hessian of the fine-tuning loss on the clean subset (:func:`top_hessian_eigenvalue`)
and ``2 (1 + momentum) / lambda_max`` is the largest learning rate at which heavy-ball SGD is
stable along that direction (the edge of stability). A victim trained with a larger learning rate
sits in a flatter minimum and gets a proportionally larger fine-tuning step; the training recipe
itself is never needed.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..backdoor.metrics import backdoor_monitor
from ..base import ModelRepair, RepairResult, ResultDetails
from ..data.augment import AUGMENT_SEED_OFFSET, augment_for, check_augment, check_padding
from ..errors import InputError
from ..registry import REPAIRS
from ..training import Monitor, PlainStep, SAMStep, fit
from ..utils import model_device
from .guard import HOLDOUT_RATIO, MAX_ACC_DROP, check_bound, check_collapse, check_ratio, clean_accuracy, split_clean

#: ``lr="auto"``: the fraction of the edge-of-stability learning rate ``2 (1 + momentum) / lambda_max``
#: used. Chosen on the digits victims of ``benchmarks/ftsam_recipe.py`` (lr 0.01 and 0.05), checked
#: on the CIFAR-10 subset victims; docs/repair.md has the numbers.
LR_AUTO_FRACTION = 0.2
#: ``lr="auto"`` never goes outside these bounds (a guard against a degenerate curvature estimate:
#: an lr-0.1 digits victim read as lambda_max < 4 gave lr 0.2, at which FT-SAM diverged).
LR_AUTO_BOUNDS = (1e-3, 0.1)
#: The paper's learning rate: the fallback when the curvature estimate is not positive.
PAPER_LR = 0.01
#: Augmentation of the clean batches during fine-tuning (:mod:`robustkit.data.augment`).
DEFAULT_AUGMENT: str | None = "crop"


# --------------------------------------------------------------------------- curvature
def top_eigenvalue(matvec: Callable[[list[torch.Tensor]], list[torch.Tensor]], start: list[torch.Tensor],
                   iters: int) -> float:
    """Largest (algebraic) eigenvalue of the symmetric operator ``matvec`` (vectors are lists of tensors),
    by ``iters`` Lanczos steps from ``start``: the largest eigenvalue of the tridiagonal matrix the
    three-term recurrence builds (Lanczos 1950; no reorthogonalization, so memory stays at three
    vectors: lost orthogonality repeats converged Ritz values but keeps them inside the spectrum).

    Unlike power iteration, which converges to the eigenvalue of largest *magnitude*, this finds the
    top of an indefinite spectrum (a Hessian whose most negative curvature dominates, as on digits
    victims with label smoothing on 67 images) and converges faster for the same number of products.
    """
    norm = torch.sqrt(sum((a * a).sum() for a in start))
    q = [a / norm for a in start]
    q_prev: list[torch.Tensor] | None = None
    alphas: list[float] = []
    betas: list[float] = []
    for _ in range(iters):
        w = matvec(q)
        alpha = float(sum((a * b).sum() for a, b in zip(w, q)))
        if not math.isfinite(alpha):
            return alpha
        w = [a - alpha * b for a, b in zip(w, q)]
        if q_prev is not None:
            w = [a - betas[-1] * b for a, b in zip(w, q_prev)]
        alphas.append(alpha)
        beta = float(torch.sqrt(sum((a * a).sum() for a in w)))
        if not math.isfinite(beta) or beta <= 1e-10 * max(1.0, abs(alpha)):
            break  # an invariant subspace: the Ritz values are exact
        betas.append(beta)
        q_prev, q = q, [a / beta for a in w]
    k = len(alphas)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if k > 1:
        off = torch.tensor(betas[:k - 1], dtype=torch.float64)
        t += torch.diag(off, 1) + torch.diag(off, -1)
    return float(torch.linalg.eigvalsh(t).max())


def top_hessian_eigenvalue(model: nn.Module, data: Dataset, *, batch_size: int = 256, label_smoothing: float = 0.0,
                           iters: int = 20, seed: int = 0, augment: Callable[..., torch.Tensor] | None = None) -> float:
    """Largest Hessian eigenvalue of the mean cross-entropy over ``data`` (:func:`top_eigenvalue`:
    Lanczos on Hessian-vector products, Pearlmutter's double backprop).

    The loss is the one fine-tuning minimises: the model in train mode (BatchNorm normalises with
    the statistics of each batch, as SGD sees it), batches of ``batch_size`` in a fixed order,
    ``label_smoothing`` as given. BatchNorm running statistics and every module's mode are
    restored afterwards; the model's weights are not changed. Deterministic for a given ``seed``
    (the start vector) up to float reduction order. With ``augment`` (what fine-tuning applies to
    its batches) the loss is over one augmented copy of ``data``, drawn once from ``seed``: a victim
    trained without augmentation is sharper on shifted images than on its own. ``iters`` Lanczos
    steps cost ``iters`` Hessian-vector products over ``data``.
    """
    if iters < 1:
        raise InputError(f"iters must be >= 1, got {iters!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise InputError("model has no trainable parameters")
    device = model_device(model)
    from ..data.arrays import to_tensors

    x, y = to_tensors(data)
    if x.shape[0] == 0:
        raise InputError("the clean data set is empty")
    if augment is not None:
        x = augment(x, torch.Generator().manual_seed(seed + AUGMENT_SEED_OFFSET))
    batches = [(x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)) for i in range(0, len(x), batch_size)]
    if len(batches) > 1 and len(batches[-1][0]) == 1:  # a 1-image batch has no BatchNorm statistics
        batches = batches[:-1]
    n = sum(len(b[0]) for b in batches)
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    modes = [(m, m.training) for m in model.modules()]

    def hvp(v: list[torch.Tensor]) -> list[torch.Tensor]:
        hv = [torch.zeros_like(p) for p in params]
        for xb, yb in batches:
            loss = F.cross_entropy(model(xb), yb, label_smoothing=label_smoothing) * (len(xb) / n)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            dot = sum((a * b).sum() for a, b in zip(grads, v))
            for acc, h in zip(hv, torch.autograd.grad(dot, params)):
                acc.add_(h)
        return hv

    g = torch.Generator().manual_seed(seed)
    start = [torch.randn(p.shape, generator=g).to(device) for p in params]
    try:
        model.train()
        return top_eigenvalue(hvp, start, iters)
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for m, mode in modes:
            m.training = mode


def edge_of_stability_lr(sharpness: float, momentum: float) -> float:
    """``2 (1 + momentum) / sharpness``: the largest learning rate at which heavy-ball SGD with this
    momentum is stable on a quadratic of curvature ``sharpness``."""
    return 2.0 * (1.0 + momentum) / sharpness


# --------------------------------------------------------------------------- loop
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
    augment: Callable[..., torch.Tensor] | None = None,
) -> list[dict[str, Any]]:
    """Fine-tune ``model`` in place with SGD (and adaptive SAM when ``sam`` holds its kwargs).

    A thin front of :func:`robustkit.training.fit` (:class:`SAMStep` or :class:`PlainStep`);
    ``monitor(model)`` gives an ``epoch 0`` row and is called every ``eval_every`` epochs;
    ``augment`` (:class:`robustkit.data.augment.CropFlip`) transforms every batch.
    """
    step = SAMStep(**sam, label_smoothing=label_smoothing) if sam is not None else PlainStep(label_smoothing)
    callbacks = [Monitor(monitor, eval_every, epochs)] if monitor is not None else []
    return fit(model, data, step, epochs=epochs, lr=lr, batch_size=batch_size, optimizer="sgd", momentum=momentum,
               weight_decay=weight_decay, schedule=schedule, trainable=trainable, train_mode=train_mode,
               callbacks=callbacks, seed=seed, progress=progress, desc=desc, augment=augment)


# --------------------------------------------------------------------------- defenses
@dataclass
class FineTuneDetails(ResultDetails):
    """What :class:`FineTune` / :class:`FTSAM` used (the clean subset's size, steps per epoch) and the
    collapse guard: clean accuracy on the held-out clean split before and after, the bound, the verdict."""

    clean_samples: int
    steps_per_epoch: int
    steps: int = 0
    holdout_samples: int = 0
    holdout_acc_before: float | None = None
    holdout_acc_after: float | None = None
    max_acc_drop: float | None = None
    collapsed: bool = False
    lr: float | None = None
    lr_rule: str = "given"
    sharpness: float | None = None
    augment: str = "none"


class _FineTuneRepair(ModelRepair):
    """Shared arguments and bookkeeping of :class:`FineTune` and :class:`FTSAM`."""

    uses_sam = False

    def __init__(self, epochs: int = 100, lr: float | str = 0.01, momentum: float = 0.9, weight_decay: float = 5e-4,
                 batch_size: int = 256, label_smoothing: float = 0.0, clean_ratio: float = 0.05,
                 schedule: str = "cosine", eval_every: int = 1, seed: int = 0, *,
                 max_acc_drop: float = MAX_ACC_DROP, holdout_ratio: float = HOLDOUT_RATIO,
                 augment: str | None = DEFAULT_AUGMENT, crop_padding: int | None = None):
        self.augment = check_augment(augment)
        self.crop_padding = check_padding(crop_padding)
        if not 0 < clean_ratio <= 1:
            raise InputError(f"clean_ratio must be in (0, 1], got {clean_ratio!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        if isinstance(lr, str):
            if lr != "auto":
                raise InputError(f"lr must be a positive number or 'auto', got {lr!r}")
        elif isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise InputError(f"lr must be a positive number or 'auto', got {lr!r}")
        else:
            lr = float(lr)
        self.epochs, self.lr, self.momentum, self.weight_decay = epochs, lr, float(momentum), float(weight_decay)
        self.batch_size, self.label_smoothing, self.clean_ratio = batch_size, float(label_smoothing), float(clean_ratio)
        self.schedule, self.eval_every, self.seed = schedule, int(eval_every), int(seed)
        self.max_acc_drop = check_bound(max_acc_drop, "max_acc_drop")
        self.holdout_ratio = check_ratio(holdout_ratio, "holdout_ratio")

    def _sam(self) -> dict[str, Any] | None:
        return None

    def resolve_lr(self, model: nn.Module, subset: Dataset, augment: Callable[..., torch.Tensor] | None = None
                   ) -> tuple[float, str, float | None]:
        """``(lr, rule, sharpness)``: the given ``lr``, or for ``lr="auto"``
        ``LR_AUTO_FRACTION * 2 (1 + momentum) / lambda_max`` clipped to ``LR_AUTO_BOUNDS``, with
        ``lambda_max`` the suspect's top Hessian eigenvalue of the fine-tuning loss on ``subset``
        (the paper's 0.01 with a ``RuntimeWarning`` if the estimate is not positive)."""
        if self.lr != "auto":
            return float(self.lr), "given", None
        lam = top_hessian_eigenvalue(model, subset, batch_size=self.batch_size, label_smoothing=self.label_smoothing,
                                     seed=self.seed, augment=augment)
        if not math.isfinite(lam) or lam <= 0:
            warnings.warn(f"{type(self).__name__}: lr='auto' got a non-positive curvature estimate ({lam:.3g}); "
                          f"using the paper's lr {PAPER_LR}", RuntimeWarning, stacklevel=3)
            return PAPER_LR, "auto (fallback: paper's lr)", lam
        lo, hi = LR_AUTO_BOUNDS
        rule_lr = LR_AUTO_FRACTION * edge_of_stability_lr(lam, self.momentum)
        if rule_lr > hi:
            warnings.warn(f"{type(self).__name__}: lr='auto' read lambda_max {lam:.3g} (the loss is nearly flat on "
                          f"this clean share) and capped the lr at {hi}; the estimate varies with the share on "
                          f"un-augmented images (docs/repair.md): keep augment='crop' or pass a fixed lr",
                          RuntimeWarning, stacklevel=3)
        lr = min(hi, max(lo, rule_lr))
        return lr, f"auto: {LR_AUTO_FRACTION:g} x 2(1+momentum)/lambda_max", lam

    def repair(self, model: nn.Module, clean_data: Dataset, *, test_data: Dataset | None = None,
               backdoor: Any = None, num_classes: int | None = None, inplace: bool = False,
               progress: bool = True) -> RepairResult:
        """Fine-tune a copy of ``model`` (``inplace=True``: the model itself) on the clean subset.

        ``clean_data`` is all the clean data the defender holds; a class-balanced
        ``clean_ratio`` share is used. With ``test_data`` (and ``backdoor``, the attack whose
        trigger is measured) the history holds ACC (and ASR / RA) before and after each epoch.

        Collapse guard (:mod:`robustkit.repair.guard`): a further class-balanced ``holdout_ratio``
        share of ``clean_data``, never trained on, measures clean accuracy before and after; a drop
        of more than ``max_acc_drop`` sets ``RepairResult.collapsed`` and warns (``RuntimeWarning``).
        """
        if not isinstance(model, nn.Module):
            raise InputError(f"model must be an nn.Module, got {type(model).__name__}")
        split = split_clean(clean_data, self.clean_ratio, self.holdout_ratio, self.seed)
        subset = split.train
        acc_before = clean_accuracy(model, split.holdout)
        net = model if inplace else copy.deepcopy(model)
        augment = augment_for(self.augment, subset, self.crop_padding)
        lr, rule, sharpness = self.resolve_lr(net, subset, augment)
        monitor = backdoor_monitor(test_data, backdoor, num_classes)
        history = finetune_loop(
            net, subset, epochs=self.epochs, lr=lr, momentum=self.momentum, weight_decay=self.weight_decay,
            batch_size=self.batch_size, label_smoothing=self.label_smoothing, schedule=self.schedule,
            sam=self._sam(), monitor=monitor, eval_every=self.eval_every, seed=self.seed, progress=progress,
            desc=type(self).__name__, augment=augment,
        )
        check = check_collapse(type(self).__name__, acc_before, net, split.holdout, self.max_acc_drop)
        per_epoch = math.ceil(len(subset) / self.batch_size)
        details = FineTuneDetails(len(subset), per_epoch, per_epoch * self.epochs, check.samples,
                                  check.acc_before, check.acc_after, self.max_acc_drop, check.collapsed,
                                  lr, rule, sharpness, augment.describe() if augment is not None else "none")
        return RepairResult(net, history, details, collapsed=check.collapsed)

    def __repr__(self) -> str:
        keys = ("epochs", "lr", "batch_size", "label_smoothing", "clean_ratio", "augment")
        return f"{type(self).__name__}(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in keys) + ")"


@REPAIRS.register("finetune")
class FineTune(_FineTuneRepair):
    """Vanilla fine-tuning on a class-balanced clean subset: the baseline of FT-SAM's Table 1.

    Same budget as :class:`FTSAM` (SGD momentum 0.9, weight decay 5e-4, batch 256, cosine
    schedule, 5% clean data, random crops) but plain cross-entropy steps without label smoothing.
    The default lr stays the paper's 0.01 (its vanilla-FT baseline); ``lr="auto"`` applies
    FT-SAM's rule (the sharpness of the plain cross-entropy), for a comparison at the same step
    size rule.
    """


@REPAIRS.register("ft_sam")
class FTSAM(_FineTuneRepair):
    """FT-SAM (Zhu et al., ICCV 2023): fine-tuning with adaptive sharpness-aware minimization.

    Defaults are the paper's CIFAR-10 setting except the learning rate: ``rho = 2`` (use 8 for
    GTSRB / Tiny-ImageNet), SGD momentum 0.9, weight decay 5e-4, batch 256, 100 epochs, cosine
    schedule over the whole budget, label smoothing 0.1 (on both passes), 5% class-balanced clean
    data. ``T_w = |w| + eta`` on weight tensors (``eta = 0.01`` as in the ASAM code FT-SAM builds
    on; biases are unscaled); on the second (perturbed) forward pass BatchNorm running statistics
    are not updated (momentum 0). Epochs here are passes over the clean subset, so with small data
    keep the number of *steps* in mind (``details['steps_per_epoch']``, ``details['steps']``): the
    paper's 100 epochs over 2,500 images at batch 256 are 1,000 SGD steps, 5% of a small set
    at batch 256 gives one step per epoch.

    **Augmentation: ``augment="crop"`` (default).** The clean batches are randomly cropped from
    the image zero-padded by ``crop_padding`` (default ``H / 8``: 4 pixels at 32x32), as the
    training transform BackdoorBench's FT-SAM code fine-tunes with (``RandomCrop(32, padding=4)``;
    it adds ``RandomHorizontalFlip`` on CIFAR-10 only: ``augment="crop_flip"``, right for natural
    images, wrong for digits or signs). ``augment=None`` fine-tunes on the images as they are
    (robustkit before issue #15's last round). Measured on digits 16x16 (docs/repair.md): the
    crops cut the ACC cost of repairing from 6.0 / 1.6 to 4.0 / 0.5 points on victims trained at
    lr 0.01 / 0.05, ASR staying at 0.0-0.2%.

    **Learning rate: ``lr="auto"`` (default), a departure from the paper.** The paper uses SGD
    lr 0.01, the learning rate its victims were trained with (BackdoorBench: SGD lr 0.01).
    Measured in ``benchmarks/ftsam_recipe.py`` (docs/repair.md, issue #15): on a victim trained
    with lr 0.05, FT-SAM at lr 0.01 leaves the backdoor (ASR 99% on digits) whatever the budget,
    clean-set size, label smoothing or rho; at a larger lr it removes it. ``lr="auto"`` reads
    the step off the suspect itself: ``lr = LR_AUTO_FRACTION (0.2) * 2 (1 + momentum) /
    lambda_max``, with ``lambda_max`` the top Hessian eigenvalue of the fine-tuning loss on the
    clean subset (:func:`top_hessian_eigenvalue`, 20 Lanczos steps: about the cost of 20
    epochs of plain fine-tuning on the subset, once). SGD with lr ``eta`` cannot settle where
    the curvature exceeds ``2 (1 + momentum) / eta``, so a victim trained with a larger lr sits in
    a flatter minimum (digits: lambda_max 58 at lr 0.01, 24 at lr 0.05) and gets a larger step
    (0.013 and 0.031); a victim like the paper's gets about the paper's lr. The fraction 0.2 was
    chosen on the digits victims and checked on the CIFAR-10 subset. With augmentation the curvature
    is read on augmented batches (what the steps see: a victim trained on uncropped images is
    sharper on crops; read on the raw images, an lr-0.05 digits victim got the 0.1 cap and
    collapsed). Pass a number (e.g.
    ``lr=0.01``) for the paper's exact setting; ``details['lr']`` / ``details['sharpness']``
    say what was used.
    """

    uses_sam = True

    def __init__(self, rho: float = 2.0, eta: float = 0.01, adaptive: bool = True, epochs: int = 100,
                 lr: float | str = "auto", momentum: float = 0.9, weight_decay: float = 5e-4, batch_size: int = 256,
                 label_smoothing: float = 0.1, clean_ratio: float = 0.05, schedule: str = "cosine",
                 eval_every: int = 1, seed: int = 0, *, max_acc_drop: float = MAX_ACC_DROP,
                 holdout_ratio: float = HOLDOUT_RATIO, augment: str | None = DEFAULT_AUGMENT,
                 crop_padding: int | None = None):
        super().__init__(epochs, lr, momentum, weight_decay, batch_size, label_smoothing, clean_ratio, schedule,
                         eval_every, seed, max_acc_drop=max_acc_drop, holdout_ratio=holdout_ratio, augment=augment,
                         crop_padding=crop_padding)
        if not rho > 0:
            raise InputError(f"rho must be > 0, got {rho!r}")
        if eta < 0:
            raise InputError(f"eta must be >= 0, got {eta!r}")
        self.rho, self.eta, self.adaptive = float(rho), float(eta), bool(adaptive)

    def _sam(self) -> dict[str, Any]:
        return {"rho": self.rho, "eta": self.eta, "adaptive": self.adaptive}

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", rho={self.rho}, eta={self.eta})"
