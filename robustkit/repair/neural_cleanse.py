"""Neural Cleanse: Wang, Yao, Shan, Li, Viswanath, Zheng, Zhao, "Neural Cleanse: Identifying and
Mitigating Backdoor Attacks in Neural Networks", IEEE S&P 2019 - in PyTorch.

1. *Reverse engineering, per label* ``t``: optimize a mask ``m`` (H x W, in [0, 1]) and a pattern
   ``p`` (C x H x W, in [0, 1]) so that the stamped images ``x' = (1 - m) * x + m * p`` of the
   defender's clean data are classified as ``t``, with loss ``CE(f(x'), t) + lambda * |m|_1``.
   ``m`` and ``p`` are parametrized through ``tanh`` (``m = tanh(w) / 2 + 0.5``) and optimized
   with Adam (lr 0.1, betas (0.5, 0.9)); ``lambda`` starts at ``init_cost`` (1e-3) and is
   adapted after every epoch as in the paper's code: multiplied by ``cost_multiplier`` (1.5)
   after ``patience`` (5) epochs in a row in which the reversed trigger's success rate reaches
   ``attack_succ_threshold`` (0.99), divided by ``cost_multiplier ** 1.5`` after ``patience``
   epochs in a row below it. The kept trigger is the one with the smallest ``|m|_1`` among the
   epochs that reached the threshold (or the last one if none did).
2. *Detection* (:func:`anomaly_index`): with ``L`` the labels' mask norms ``|m|_1``, the anomaly
   index of a label is ``|L - median(L)| / (1.4826 * MAD)``, ``MAD = median(|L - median(L)|)``
   (1.4826 makes MAD a consistent estimator of a normal standard deviation). A label whose norm
   is *below* the median with index above ``threshold`` (2: > 95% probability of being an
   outlier) is flagged as infected; the detected target is the flagged label with the largest
   index.
3. *Mitigation by unlearning*: fine-tune (through :func:`robustkit.training.fit`) on the clean
   data where a ``stamp_ratio`` (20%, the paper's) share of every batch carries the reversed
   trigger of the detected target (``unlearn_all_flagged=True``: of every flagged label), keeping
   the *true* labels.

Simplifications (said in :class:`NeuralCleanse`'s docstring too): a fixed number of epochs per
label instead of the code's early stop; the defender's class-balanced ``clean_ratio`` subset is
the reverse-engineering data (the paper uses its held clean set); the unlearning uses the same
subset for ``epochs`` epochs (the paper: one epoch on 10% of the training data). When no label is
flagged the model is returned unchanged (a copy) and ``details.target`` is ``None``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..backdoor.metrics import backdoor_monitor
from ..base import ModelRepair, RepairResult, ResultDetails
from ..data.arrays import ArrayDataset
from ..errors import InputError
from ..filtering.detectors import DETECTORS, ModelScanner
from ..inference import eval_mode, output_classes
from ..registry import REPAIRS
from ..training import Monitor, TrainStep, fit
from ..training.steps import _check_finite
from ..utils import model_device, progress_bar
from .guard import (
    HOLDOUT_RATIO,
    MAX_ACC_DROP,
    check_bound,
    check_collapse,
    check_ratio,
    clean_accuracy,
    split_clean,
)

#: Consistency constant of the median absolute deviation for normally distributed data.
MAD_CONSISTENCY = 1.4826


def anomaly_index(norms: torch.Tensor) -> torch.Tensor:
    """``|L - median(L)| / (1.4826 * MAD)`` for every label's mask norm ``L`` (MAD = median |L - median|).

    The median of an even count is the mean of the two middle values (as NumPy's). A MAD of 0
    (half the labels share one norm) gives ``inf`` for the others and 0 for those equal to the median.
    """
    v = torch.as_tensor(norms, dtype=torch.float64).flatten()
    if v.numel() < 2:
        raise InputError("the anomaly index needs the mask norms of at least 2 labels")
    med = v.quantile(0.5)
    dev = (v - med).abs()
    mad = dev.quantile(0.5) * MAD_CONSISTENCY
    if float(mad) == 0.0:
        return torch.where(dev == 0, torch.zeros_like(dev), torch.full_like(dev, math.inf))
    return dev / mad


def stamp(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """``(1 - m) * x + m * p`` with ``m`` broadcast over the channels."""
    return (1 - mask) * x + mask * pattern


@dataclass
class ReversedTrigger:
    """One label's reverse-engineered trigger: mask (H x W), pattern (C x H x W), ``|m|_1``, success rate."""

    label: int
    mask: torch.Tensor
    pattern: torch.Tensor
    l1: float
    asr: float
    cost: float


def reverse_engineer(model: nn.Module, x: torch.Tensor, label: int, *, epochs: int = 30, batch_size: int = 32,
                     lr: float = 0.1, init_cost: float = 1e-3, cost_multiplier: float = 1.5, patience: int = 5,
                     attack_succ_threshold: float = 0.99, seed: int = 0, progress: Any = None) -> ReversedTrigger:
    """Neural Cleanse's optimization for one ``label`` over clean images ``x`` (model in eval mode, unchanged)."""
    dev = model_device(model)
    n, c, h, w = x.shape
    g = torch.Generator().manual_seed(seed * 1000 + label)
    mask_w = (torch.rand(1, 1, h, w, generator=g) * 2 - 1).to(dev)
    pattern_w = (torch.rand(1, c, h, w, generator=g) * 2 - 1).to(dev)
    mask_w.requires_grad_(True)
    pattern_w.requires_grad_(True)
    opt = torch.optim.Adam([mask_w, pattern_w], lr=lr, betas=(0.5, 0.9))
    cost = init_cost
    up = down = 0
    best: tuple[float, torch.Tensor, torch.Tensor, float] | None = None
    last: tuple[float, torch.Tensor, torch.Tensor, float] | None = None
    target = torch.full((batch_size,), label, dtype=torch.long, device=dev)
    saved = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with eval_mode(model):
            for _ in range(epochs):
                order = torch.randperm(n, generator=g)
                hits = seen = 0.0
                for s in range(0, n, batch_size):
                    xb = x[order[s:s + batch_size]].to(dev)
                    m = torch.tanh(mask_w) / 2 + 0.5
                    p = torch.tanh(pattern_w) / 2 + 0.5
                    logits = model(stamp(xb, m, p))
                    t = target[: xb.shape[0]]
                    loss = F.cross_entropy(logits, t) + cost * m.sum()
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    hits += float((logits.argmax(1) == t).sum())
                    seen += xb.shape[0]
                asr = hits / seen
                with torch.no_grad():
                    m = torch.tanh(mask_w) / 2 + 0.5
                    p = torch.tanh(pattern_w) / 2 + 0.5
                    l1 = float(m.sum())
                last = (l1, m[0, 0].detach().cpu().clone(), p[0].detach().cpu().clone(), asr)
                if asr >= attack_succ_threshold and (best is None or l1 < best[0]):
                    best = last
                # the paper's cost schedule
                if asr >= attack_succ_threshold:
                    up, down = up + 1, 0
                else:
                    up, down = 0, down + 1
                if up >= patience:
                    up, cost = 0, cost * cost_multiplier
                elif down >= patience:
                    down, cost = 0, cost / cost_multiplier ** 1.5
                if progress is not None:
                    progress.update(1)
    finally:
        for p, flag in zip(model.parameters(), saved):
            p.requires_grad_(flag)
    chosen = best or last
    assert chosen is not None
    # success rate of the kept trigger over all of x
    with torch.no_grad(), eval_mode(model):
        m, p = chosen[1].to(dev), chosen[2].to(dev)
        hits = sum(float((model(stamp(x[s:s + 256].to(dev), m, p)).argmax(1) == label).sum())
                   for s in range(0, n, 256))
    return ReversedTrigger(label, chosen[1], chosen[2], chosen[0], hits / n, cost)


class UnlearnStep(TrainStep):
    """Cross-entropy on a batch whose ``stamp_ratio`` share carries a reversed trigger (true labels kept).

    Which samples are stamped, and with which trigger when there are several, is drawn from the
    step's generator (seeded by :func:`fit`'s ``seed``).
    """

    def __init__(self, triggers: list[tuple[torch.Tensor, torch.Tensor]], stamp_ratio: float = 0.2):
        super().__init__()
        if not triggers:
            raise InputError("UnlearnStep needs at least one (mask, pattern) trigger")
        self.triggers, self.stamp_ratio = triggers, float(stamp_ratio)
        self._gen = torch.Generator().manual_seed(0)

    def set_seed(self, seed: int) -> None:
        self._gen = torch.Generator().manual_seed(seed)

    def stamp_batch(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        chosen = torch.rand(n, generator=self._gen) < self.stamp_ratio
        which = torch.randint(len(self.triggers), (n,), generator=self._gen)
        out = x.clone()
        for i, (m, p) in enumerate(self.triggers):
            sel = (chosen & (which == i)).to(x.device)
            if bool(sel.any()):
                out[sel] = stamp(x[sel], m.to(x.device), p.to(x.device))
        return out

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(self.stamp_batch(x))
        loss = self.loss(logits, y)
        _check_finite(loss)
        loss.backward()
        return loss.detach(), logits.detach()


@dataclass
class NeuralCleanseDetails(ResultDetails):
    """Per-label mask norms, anomaly indices, success rates of the reversed triggers, the flagged
    labels and the detected target; the reversed masks and patterns; the unlearning and the guard."""

    target: int | None
    flagged: list[int]
    threshold: float
    l1: list[float]
    anomaly: list[float]
    reversed_asr: list[float]
    clean_samples: int
    unlearned: bool
    masks: torch.Tensor | None = None
    patterns: torch.Tensor | None = None
    holdout_samples: int = 0
    holdout_acc_before: float | None = None
    holdout_acc_after: float | None = None
    max_acc_drop: float | None = None
    collapsed: bool = False

    @property
    def target_anomaly_index(self) -> float | None:
        return None if self.target is None else self.anomaly[self.target]

    def summary(self) -> dict[str, Any]:
        out = super().summary()
        out["max_anomaly_index_below_median"] = max(
            (a for a, l in zip(self.anomaly, self.l1) if l < sorted(self.l1)[len(self.l1) // 2]), default=None)
        return out

    def tables(self) -> list[tuple[str, list[dict[str, Any]]]]:
        rows = [{"label": k, "mask_l1": l, "anomaly_index": a, "reversed_asr": r, "flagged": k in self.flagged}
                for k, (l, a, r) in enumerate(zip(self.l1, self.anomaly, self.reversed_asr))]
        return [("Neural Cleanse: reversed trigger per label (anomaly index = |L1 - median| / (1.4826 MAD))", rows)]

    def figures(self, out_dir: Any) -> list[str]:
        from ..eval.plots import plt, save_figure

        names = []
        k = len(self.l1)
        fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * k + 1), 3.2))
        colors = ["tab:red" if i in self.flagged else "tab:blue" for i in range(k)]
        ax.bar(range(k), [min(a, 10.0) for a in self.anomaly], color=colors)
        ax.axhline(self.threshold, color="k", ls="--", lw=0.8, label=f"threshold {self.threshold:g}")
        ax.set_xticks(range(k))
        ax.set_xlabel("label (red: flagged, mask norm below the median)")
        ax.set_ylabel("anomaly index")
        ax.legend(fontsize=8)
        ax.set_title("Neural Cleanse anomaly index")
        names.append(save_figure(fig, Path(out_dir) / "neural_cleanse_anomaly.png").name)
        if self.masks is not None and self.patterns is not None:
            fig, axes = plt.subplots(2, k, figsize=(1.1 * k, 2.6), squeeze=False)
            for i in range(k):
                m, p = self.masks[i, 0], self.patterns[i]
                img = (m * p).permute(1, 2, 0).numpy()
                axes[0][i].imshow(m.numpy(), cmap="gray", vmin=0, vmax=1)
                axes[1][i].imshow(img[..., 0] if img.shape[2] == 1 else img, cmap="gray" if img.shape[2] == 1 else None,
                                  vmin=0, vmax=1)
                axes[0][i].set_title(f"{i}{'*' if i in self.flagged else ''}\n|m|={self.l1[i]:.0f}", fontsize=7)
                for a in (axes[0][i], axes[1][i]):
                    a.axis("off")
            axes[0][0].text(-0.3, 0.5, "mask", transform=axes[0][0].transAxes, ha="right", fontsize=7)
            axes[1][0].text(-0.3, 0.5, "m * p", transform=axes[1][0].transAxes, ha="right", fontsize=7)
            names.append(save_figure(fig, Path(out_dir) / "neural_cleanse_triggers.png").name)
        return names


@REPAIRS.register("neural_cleanse")
class NeuralCleanse(ModelRepair):
    """Neural Cleanse (Wang et al., S&P 2019): reverse-engineer a trigger per label, flag outliers
    by the MAD anomaly index, unlearn the reversed trigger of the flagged label(s).

    Args:
        epochs_per_label, batch_size, lr, init_cost, cost_multiplier, patience,
            attack_succ_threshold: the reverse engineering (see :func:`reverse_engineer`; the
            paper's values except the epoch count).
        threshold: anomaly-index threshold (2).
        epochs, unlearn_lr, stamp_ratio: the unlearning fine-tuning (SGD through ``fit``; 20% stamped).
        unlearn_all_flagged: unlearn the reversed triggers of every flagged label (default: only the
            detected target's, the one with the largest anomaly index).
        clean_ratio: class-balanced share of the defender's clean data used (default 5%).
        max_acc_drop, holdout_ratio: the collapse guard (:mod:`robustkit.repair.guard`).

    :meth:`detect` runs steps 1-2 only. Simplifications: see the module docstring.
    """

    def __init__(self, epochs_per_label: int = 30, batch_size: int = 32, lr: float = 0.1, init_cost: float = 1e-3,
                 cost_multiplier: float = 1.5, patience: int = 5, attack_succ_threshold: float = 0.99,
                 threshold: float = 2.0, epochs: int = 10, unlearn_lr: float = 0.005, stamp_ratio: float = 0.2,
                 momentum: float = 0.9, weight_decay: float = 5e-4, clean_ratio: float = 0.05, eval_every: int = 1,
                 seed: int = 0, *, unlearn_all_flagged: bool = False, max_acc_drop: float = MAX_ACC_DROP,
                 holdout_ratio: float = HOLDOUT_RATIO):
        for name, v, low in (("epochs_per_label", epochs_per_label, 1), ("batch_size", batch_size, 1),
                             ("patience", patience, 1), ("epochs", epochs, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise InputError(f"{name} must be an integer >= {low}, got {v!r}")
        for name, v in (("lr", lr), ("unlearn_lr", unlearn_lr), ("cost_multiplier", cost_multiplier),
                        ("threshold", threshold)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise InputError(f"{name} must be a finite number > 0, got {v!r}")
        if cost_multiplier <= 1:
            raise InputError(f"cost_multiplier must be > 1, got {cost_multiplier!r}")
        if not (isinstance(init_cost, (int, float)) and init_cost >= 0):
            raise InputError(f"init_cost must be >= 0, got {init_cost!r}")
        self.epochs_per_label, self.batch_size, self.lr, self.init_cost = epochs_per_label, batch_size, float(lr), float(init_cost)
        self.cost_multiplier, self.patience = float(cost_multiplier), patience
        self.attack_succ_threshold = check_bound(attack_succ_threshold, "attack_succ_threshold")
        self.threshold, self.epochs, self.unlearn_lr = float(threshold), epochs, float(unlearn_lr)
        self.stamp_ratio = check_bound(stamp_ratio, "stamp_ratio")
        self.momentum, self.weight_decay = float(momentum), float(weight_decay)
        if not 0 < clean_ratio <= 1:
            raise InputError(f"clean_ratio must be in (0, 1], got {clean_ratio!r}")
        self.clean_ratio, self.eval_every, self.seed = float(clean_ratio), int(eval_every), int(seed)
        self.unlearn_all_flagged = bool(unlearn_all_flagged)
        self.max_acc_drop = check_bound(max_acc_drop, "max_acc_drop")
        self.holdout_ratio = check_ratio(holdout_ratio, "holdout_ratio")

    def reverse_all(self, model: nn.Module, data: ArrayDataset, num_classes: int | None = None,
                    progress: bool = True) -> list[ReversedTrigger]:
        x = data.images
        k = num_classes or output_classes(model, x)
        bar = progress_bar(k * self.epochs_per_label, "Neural Cleanse: reverse", progress, unit="epoch")
        try:
            return [reverse_engineer(model, x, t, epochs=self.epochs_per_label, batch_size=self.batch_size, lr=self.lr,
                                     init_cost=self.init_cost, cost_multiplier=self.cost_multiplier,
                                     patience=self.patience, attack_succ_threshold=self.attack_succ_threshold,
                                     seed=self.seed, progress=bar) for t in range(k)]
        finally:
            bar.close()

    def flag(self, triggers: list[ReversedTrigger]) -> tuple[list[float], list[int], int | None]:
        """(anomaly indices, flagged labels, detected target) from the reversed triggers."""
        norms = torch.tensor([t.l1 for t in triggers], dtype=torch.float64)
        idx = anomaly_index(norms)
        med = float(norms.quantile(0.5))
        flagged = [i for i in range(len(triggers)) if float(norms[i]) < med and float(idx[i]) > self.threshold]
        target = max(flagged, key=lambda i: float(idx[i])) if flagged else None
        return [float(a) for a in idx], flagged, target

    def detect(self, model: nn.Module, clean_data: Dataset, num_classes: int | None = None,
               progress: bool = True) -> NeuralCleanseDetails:
        """Reverse engineering and the MAD test only (the model is not changed)."""
        split = split_clean(clean_data, self.clean_ratio, self.holdout_ratio, self.seed)
        return self._detect(model, split.train, num_classes, progress)[0]

    def _detect(self, model: nn.Module, data: ArrayDataset, num_classes: int | None, progress: bool
                ) -> tuple[NeuralCleanseDetails, list[ReversedTrigger]]:
        if not isinstance(model, nn.Module):
            raise InputError(f"model must be an nn.Module, got {type(model).__name__}")
        triggers = self.reverse_all(model, data, num_classes, progress)
        anomaly, flagged, target = self.flag(triggers)
        details = NeuralCleanseDetails(
            target=target, flagged=flagged, threshold=self.threshold, l1=[t.l1 for t in triggers], anomaly=anomaly,
            reversed_asr=[t.asr for t in triggers], clean_samples=len(data), unlearned=False,
            masks=torch.stack([t.mask for t in triggers]).unsqueeze(1), patterns=torch.stack([t.pattern for t in triggers]))
        return details, triggers

    def repair(self, model: nn.Module, clean_data: Dataset, *, test_data: Dataset | None = None,
               backdoor: Any = None, num_classes: int | None = None, inplace: bool = False,
               progress: bool = True) -> RepairResult:
        """Detect, then unlearn the flagged label(s)' reversed trigger on a copy of ``model``."""
        split = split_clean(clean_data, self.clean_ratio, self.holdout_ratio, self.seed)
        acc_before = clean_accuracy(model, split.holdout) if isinstance(model, nn.Module) else 0.0
        details, triggers = self._detect(model, split.train, num_classes, progress)
        net = model if inplace else copy.deepcopy(model)
        measure = backdoor_monitor(test_data, backdoor, num_classes)
        history: list[dict[str, Any]] = []
        if details.flagged and self.epochs > 0:
            labels = details.flagged if self.unlearn_all_flagged else [details.target]
            step = UnlearnStep([(triggers[i].mask, triggers[i].pattern) for i in labels], self.stamp_ratio)
            callbacks = [Monitor(measure, self.eval_every, self.epochs)] if measure is not None else []
            history = fit(net, split.train, step, epochs=self.epochs, lr=self.unlearn_lr, batch_size=self.batch_size,
                          optimizer="sgd", momentum=self.momentum, weight_decay=self.weight_decay, schedule="cosine",
                          callbacks=callbacks, seed=self.seed, progress=progress, desc="Neural Cleanse: unlearn")
            details.unlearned = True
        elif measure is not None:
            history = [{"epoch": 0, **measure(net)}]
        check = check_collapse("NeuralCleanse", acc_before, net, split.holdout, self.max_acc_drop)
        details.holdout_samples, details.holdout_acc_before = check.samples, check.acc_before
        details.holdout_acc_after, details.max_acc_drop, details.collapsed = check.acc_after, self.max_acc_drop, check.collapsed
        return RepairResult(net, history, details, collapsed=check.collapsed)

    def __repr__(self) -> str:
        keys = ("epochs_per_label", "init_cost", "threshold", "epochs", "unlearn_lr", "clean_ratio")
        return f"{type(self).__name__}(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in keys) + ")"


@DETECTORS.register("neural_cleanse")
class NeuralCleanseScan(ModelScanner):
    """Neural Cleanse's *detection* alone as a registered model scanner (the ``detect`` step):
    steps 1-2 of :class:`NeuralCleanse` - a reversed trigger per label, the MAD anomaly index, the
    flagged labels and the detected target - without the unlearning. The parameters are
    :class:`NeuralCleanse`'s detection parameters, with the same defaults."""

    def __init__(self, epochs_per_label: int = 30, batch_size: int = 32, lr: float = 0.1, init_cost: float = 1e-3,
                 cost_multiplier: float = 1.5, patience: int = 5, attack_succ_threshold: float = 0.99,
                 threshold: float = 2.0, clean_ratio: float = 0.05, seed: int = 0):
        self.nc = NeuralCleanse(epochs_per_label=epochs_per_label, batch_size=batch_size, lr=lr, init_cost=init_cost,
                                cost_multiplier=cost_multiplier, patience=patience,
                                attack_succ_threshold=attack_succ_threshold, threshold=threshold,
                                clean_ratio=clean_ratio, seed=seed)

    def scan(self, model: nn.Module, clean_data: Dataset, num_classes: int | None = None,
             progress: bool = True) -> NeuralCleanseDetails:
        """The reversed triggers, anomaly indices, flagged labels and detected target (``model`` unchanged)."""
        return self.nc.detect(model, clean_data, num_classes, progress)

    def __repr__(self) -> str:
        keys = ("epochs_per_label", "init_cost", "threshold", "clean_ratio")
        return "NeuralCleanseScan(" + ", ".join(f"{k}={getattr(self.nc, k)!r}" for k in keys) + ")"
