"""Fine-Pruning: Liu, Dolan-Gavitt, Garg, "Fine-Pruning: Defending Against Backdooring Attacks on
Deep Neural Networks", RAID 2018.

The defender holds a little clean data. Backdoor behaviour tends to live in neurons of the last
convolutional layer that stay *dormant* on clean inputs, so:

1. measure the mean activation of every channel of the last convolutional feature map on the
   clean data;
2. prune channels in increasing order of that mean (the most dormant first), one at a time,
   and stop before the clean accuracy (on the defender's clean data) falls by more than
   ``max_prune_acc_drop`` (the paper prunes "until the accuracy on the validation set drops by
   4%"); ``prune_ratio`` fixes the pruned fraction instead;
3. fine-tune the pruned network on the clean data (the pruned channels stay pruned).

Where robustkit's version differs (said also in :class:`FinePruning`'s docstring):

- *Which layer.* "The last convolutional layer" is located by tracing one forward pass: the last
  4-D (N x C x H x W) output produced at or after the last ``nn.Conv2d`` call, before the
  classifier (``layer4`` of a PreActResNet18, the last conv stage of a SmallCNN / VGG).
  For a residual network this is the last block's output (conv branch + skip), as BackdoorBench
  does, since pruning only the branch's conv would leave the channel alive through the skip.
  ``layer=`` names another module. A model whose features after the last conv are tokens (a
  ViT, whose only conv is the patch embedding) or that has no conv layer is refused with
  :class:`~robustkit.errors.InputError`.
- *How a channel is pruned.* The paper removes the neuron. Here the channel is zeroed; in the
  returned model that is baked into weights so it survives ``save_checkpoint``: the columns of
  the first ``nn.Linear`` after the feature map that read the channel are set to zero (exact
  when the map reaches that layer through channel-wise pooling / flattening, which is checked
  numerically on the clean data; otherwise :class:`InputError` asks for another ``layer``).
  During the search and the fine-tuning the channel is zeroed by a forward hook, so the pruned
  columns get no gradient.
- *Stopping rule.* Accuracy is measured on the defender's class-balanced clean subset (the
  paper's validation set); the pruned count is the largest one whose accuracy drop stays within
  ``max_prune_acc_drop`` (default 0.04) of the unpruned model, capped at ``max_prune_ratio``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ..backdoor.metrics import backdoor_monitor
from ..base import ModelRepair, RepairResult, ResultDetails
from ..data.arrays import ArrayDataset
from ..errors import InputError
from ..inference import eval_mode
from ..registry import REPAIRS
from ..training import Monitor, PlainStep, fit
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


# --------------------------------------------------------------------------- tracing helpers
@dataclass
class TracedCall:
    """One module call of a traced forward pass (in completion order)."""

    name: str
    module: nn.Module
    shape: tuple[int, ...]


def trace_calls(model: nn.Module, x: torch.Tensor) -> list[TracedCall]:
    """Every named submodule call of one eval-mode forward of ``x``, in the order the calls finished.

    Only tensor outputs are recorded (a module returning a tuple records its first tensor).
    """
    calls: list[TracedCall] = []
    handles = []

    def make(name: str) -> Callable:
        def hook(mod: nn.Module, inp: Any, out: Any) -> None:
            t = out if isinstance(out, torch.Tensor) else next((o for o in out if isinstance(o, torch.Tensor)), None) \
                if isinstance(out, (tuple, list)) else None
            if t is not None:
                calls.append(TracedCall(name, mod, tuple(t.shape)))
        return hook

    for name, m in model.named_modules():
        if name:
            handles.append(m.register_forward_hook(make(name)))
    try:
        with torch.no_grad(), eval_mode(model):
            model(x.to(model_device(model)))
    finally:
        for h in handles:
            h.remove()
    return calls


def _refuse_tokens(model: nn.Module, calls: list[TracedCall], after: int, method: str) -> None:
    if any(len(c.shape) == 3 for c in calls[after + 1:]):
        raise InputError(
            f"{method} needs a convolutional network: {type(model).__name__}'s features after its last "
            "convolution are tokens (a Vision Transformer's only conv is the patch embedding)")


def last_conv_feature_map(model: nn.Module, x: torch.Tensor, method: str = "Fine-Pruning") -> str:
    """Name of the module producing the last convolutional feature map (see the module docstring)."""
    calls = trace_calls(model, x)
    conv_idx = [i for i, c in enumerate(calls) if isinstance(c.module, nn.Conv2d)]
    if not conv_idx:
        raise InputError(f"{method} needs a convolutional layer; {type(model).__name__} has no nn.Conv2d")
    last_conv = conv_idx[-1]
    _refuse_tokens(model, calls, last_conv, method)
    # the outermost module finishing last with the conv's output shape (its BN / ReLU, or the residual block)
    shape = calls[last_conv].shape
    maps = [i for i in range(last_conv, len(calls)) if calls[i].shape == shape]
    return calls[maps[-1]].name


class ChannelMask:
    """A forward hook zeroing the channels ``pruned`` of a module's (N x C x ...) output."""

    def __init__(self, module: nn.Module, channels: int):
        self.keep = torch.ones(channels)
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, mod: nn.Module, inp: Any, out: torch.Tensor) -> torch.Tensor:
        m = self.keep.to(out.device, out.dtype).view(1, -1, *([1] * (out.dim() - 2)))
        return out * m

    def set(self, pruned: list[int]) -> None:
        self.keep.fill_(1.0)
        if pruned:
            self.keep[torch.as_tensor(pruned, dtype=torch.long)] = 0.0

    def remove(self) -> None:
        self.handle.remove()


def channel_means(model: nn.Module, module: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Mean activation of every output channel of ``module`` over the images ``x`` (and the spatial positions)."""
    sums: list[torch.Tensor] = []

    def hook(mod: nn.Module, inp: Any, out: torch.Tensor) -> None:
        if out.dim() < 2:
            raise InputError("the pruned layer must output N x C (x H x W) activations")
        sums.append(out.detach().transpose(0, 1).flatten(1).mean(1).cpu() * out.shape[0])

    h = module.register_forward_hook(hook)
    dev = model_device(model)
    try:
        with torch.no_grad(), eval_mode(model):
            for s in range(0, x.shape[0], batch_size):
                model(x[s:s + batch_size].to(dev))
    finally:
        h.remove()
    return torch.stack(sums).sum(0) / x.shape[0]


def _bake_into_linear(model: nn.Module, layer: nn.Module, pruned: list[int], channels: int, x: torch.Tensor,
                      mask: ChannelMask) -> str:
    """Zero the columns of the first ``nn.Linear`` after ``layer`` reading the pruned channels; check exactness."""
    calls = trace_calls(model, x[:2])
    idx = next(i for i, c in enumerate(calls) if c.module is layer)
    lin = next((c for c in calls[idx + 1:] if isinstance(c.module, nn.Linear)), None)
    if lin is None:
        raise InputError("Fine-Pruning: no nn.Linear after the pruned feature map to bake the pruning into")
    fc: nn.Linear = lin.module  # type: ignore[assignment]
    if fc.in_features % channels:
        raise InputError(f"Fine-Pruning: {lin.name} reads {fc.in_features} features, not a multiple of the "
                         f"{channels} pruned channels; pass layer= naming the feature map that feeds it")
    per = fc.in_features // channels
    mask.set(pruned)
    with torch.no_grad(), eval_mode(model):
        want = model(x.to(model_device(model)))
        mask.set([])
        saved = fc.weight.detach().clone()
        for c in pruned:
            fc.weight[:, c * per:(c + 1) * per] = 0.0
        got = model(x.to(model_device(model)))
    if not torch.allclose(got, want, rtol=1e-4, atol=1e-4 * max(1.0, float(want.abs().max()))):
        with torch.no_grad():
            fc.weight.copy_(saved)
        raise InputError(f"Fine-Pruning: zeroing the channels in {lin.name} does not reproduce the pruned network "
                         "(the feature map reaches it through more than pooling); pass layer= naming another map")
    return lin.name


# --------------------------------------------------------------------------- details
@dataclass
class FinePruningDetails(ResultDetails):
    """The pruned layer, the ranking, the pruning sweep (clean accuracy, and ASR when measured) and the guard."""

    layer: str
    channels: int
    pruned: int
    pruned_ratio: float
    baked_into: str
    clean_samples: int
    acc_unpruned: float
    acc_pruned: float
    pruned_channels: list[int] = field(default_factory=list)
    sweep: list[dict[str, float]] = field(default_factory=list)
    holdout_samples: int = 0
    holdout_acc_before: float | None = None
    holdout_acc_after: float | None = None
    max_acc_drop: float | None = None
    collapsed: bool = False

    def tables(self) -> list[tuple[str, list[dict[str, Any]]]]:
        return [("Fine-Pruning sweep (channels pruned in increasing order of clean mean activation)", self.sweep)]

    def figures(self, out_dir: Any) -> list[str]:
        if not self.sweep:
            return []
        from ..eval.plots import plt, save_figure

        fig, ax = plt.subplots(figsize=(6, 3.6))
        xs = [r["pruned_ratio"] * 100 for r in self.sweep]
        ax.plot(xs, [100 * r["clean_acc"] for r in self.sweep], "-", label="clean accuracy (defender's data)")
        if any("asr" in r for r in self.sweep):
            ax.plot(xs, [100 * r.get("asr", float("nan")) for r in self.sweep], "--", label="ASR (test)")
        ax.axvline(100 * self.pruned_ratio, color="k", lw=0.8, ls=":", label="chosen")
        ax.set_xlabel(f"channels of {self.layer} pruned (%)")
        ax.set_ylabel("%")
        ax.set_ylim(0, 105)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title("Fine-Pruning")
        return [save_figure(fig, Path(out_dir) / "fine_pruning_sweep.png").name]


# --------------------------------------------------------------------------- defense
@REPAIRS.register("fine_pruning")
class FinePruning(ModelRepair):
    """Fine-Pruning (Liu et al., RAID 2018): prune the last conv layer's dormant channels, then fine-tune.

    Args:
        max_prune_acc_drop: stop pruning before the clean accuracy on the defender's data falls
            by more than this (the paper's 4%).
        prune_ratio: prune exactly this fraction of channels instead (``None``: the stopping rule).
        max_prune_ratio: never prune more than this fraction.
        layer: module name of the feature map to prune (``None``: the last conv feature map).
        epochs, lr, momentum, weight_decay, batch_size, schedule: the fine-tuning (SGD, through
            :func:`robustkit.training.fit`); ``epochs=0`` skips it (pruning only).
        clean_ratio: the class-balanced share of the defender's clean data used (default 5%).
        max_acc_drop, holdout_ratio: the shared collapse guard (:mod:`robustkit.repair.guard`).

    Simplifications against the paper (see the module docstring): the pruned channel is zeroed
    and baked into the next linear layer's columns; the layer is found by tracing; the clean
    subset doubles as the paper's validation set.
    """

    def __init__(self, max_prune_acc_drop: float = 0.04, prune_ratio: float | None = None,
                 max_prune_ratio: float = 0.95, layer: str | None = None, epochs: int = 10, lr: float = 0.01,
                 momentum: float = 0.9, weight_decay: float = 5e-4, batch_size: int = 128,
                 clean_ratio: float = 0.05, schedule: str = "cosine", eval_every: int = 1, seed: int = 0, *,
                 max_acc_drop: float = MAX_ACC_DROP, holdout_ratio: float = HOLDOUT_RATIO):
        self.max_prune_acc_drop = check_bound(max_prune_acc_drop, "max_prune_acc_drop")
        if prune_ratio is not None:
            prune_ratio = check_bound(prune_ratio, "prune_ratio")
        self.prune_ratio = prune_ratio
        self.max_prune_ratio = check_bound(max_prune_ratio, "max_prune_ratio")
        if layer is not None and not isinstance(layer, str):
            raise InputError(f"layer must be a module name or None, got {layer!r}")
        self.layer = layer
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
            raise InputError(f"epochs must be an integer >= 0, got {epochs!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not 0 < clean_ratio <= 1:
            raise InputError(f"clean_ratio must be in (0, 1], got {clean_ratio!r}")
        self.epochs, self.lr, self.momentum, self.weight_decay = epochs, float(lr), float(momentum), float(weight_decay)
        self.batch_size, self.clean_ratio, self.schedule = batch_size, float(clean_ratio), schedule
        self.eval_every, self.seed = int(eval_every), int(seed)
        self.max_acc_drop = check_bound(max_acc_drop, "max_acc_drop")
        self.holdout_ratio = check_ratio(holdout_ratio, "holdout_ratio")

    # ------------------------------------------------------------------ pieces
    def locate(self, model: nn.Module, x: torch.Tensor) -> str:
        """The pruned layer's name (``layer`` when given, checked; else the last conv feature map)."""
        if self.layer is None:
            return last_conv_feature_map(model, x[:2])
        names = dict(model.named_modules())
        if self.layer not in names or not self.layer:
            raise InputError(f"Fine-Pruning: the model has no module named {self.layer!r}")
        return self.layer

    @staticmethod
    def pruning_order(means: torch.Tensor) -> list[int]:
        """Channels in increasing order of mean clean activation (ties: lower index first)."""
        return sorted(range(means.numel()), key=lambda c: (float(means[c]), c))

    def repair(self, model: nn.Module, clean_data: Dataset, *, test_data: Dataset | None = None,
               backdoor: Any = None, num_classes: int | None = None, inplace: bool = False,
               progress: bool = True) -> RepairResult:
        """Prune and fine-tune a copy of ``model`` (``inplace=True``: the model itself).

        History: an ``epoch 0`` row for the pruned network before fine-tuning (ACC / ASR / RA
        with ``test_data`` and ``backdoor``), then one row per fine-tuning epoch; the pruning
        sweep is in ``details.sweep``.
        """
        if not isinstance(model, nn.Module):
            raise InputError(f"model must be an nn.Module, got {type(model).__name__}")
        split = split_clean(clean_data, self.clean_ratio, self.holdout_ratio, self.seed)
        data: ArrayDataset = split.train
        acc_before = clean_accuracy(model, split.holdout)
        net = model if inplace else copy.deepcopy(model)
        name = self.locate(net, data.images)
        layer = dict(net.named_modules())[name]
        means = channel_means(net, layer, data.images)
        channels = means.numel()
        order = self.pruning_order(means)
        measure = backdoor_monitor(test_data, backdoor, num_classes)
        mask = ChannelMask(layer, channels)
        try:
            acc0 = clean_accuracy(net, data)
            sweep: list[dict[str, float]] = []
            cap = min(channels - 1, math.floor(self.max_prune_ratio * channels + 1e-9))
            fixed = None if self.prune_ratio is None else min(cap, round(self.prune_ratio * channels))
            chosen, acc_chosen = 0, acc0
            bar = progress_bar(cap + 1, "Fine-Pruning: prune", progress, unit="channel")
            for k in range(cap + 1):
                mask.set(order[:k])
                acc = clean_accuracy(net, data)
                row = {"pruned": k, "pruned_ratio": k / channels, "clean_acc": acc}
                if measure is not None and backdoor is not None:
                    row["asr"] = measure(net)["asr"]
                sweep.append(row)
                if fixed is not None:
                    if k == fixed:
                        chosen, acc_chosen = k, acc
                        break
                elif acc0 - acc <= self.max_prune_acc_drop + 1e-12:
                    chosen, acc_chosen = k, acc
                else:
                    break  # the paper stops at the first step past the bound
                bar.update(1)
            bar.close()
            mask.set(order[:chosen])
            history: list[dict[str, Any]] = []
            if self.epochs > 0:
                callbacks = [Monitor(measure, self.eval_every, self.epochs)] if measure is not None else []
                history = fit(net, data, PlainStep(), epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
                              optimizer="sgd", momentum=self.momentum, weight_decay=self.weight_decay,
                              schedule=self.schedule, callbacks=callbacks, seed=self.seed, progress=progress,
                              desc="Fine-Pruning: fine-tune")
            elif measure is not None:
                history = [{"epoch": 0, **measure(net)}]
            baked = _bake_into_linear(net, layer, order[:chosen], channels, data.images[:64], mask) if chosen else ""
        finally:
            mask.remove()
        check = check_collapse("FinePruning", acc_before, net, split.holdout, self.max_acc_drop)
        details = FinePruningDetails(
            layer=name, channels=channels, pruned=chosen, pruned_ratio=chosen / channels, baked_into=baked,
            clean_samples=len(data), acc_unpruned=acc0, acc_pruned=acc_chosen, pruned_channels=order[:chosen],
            sweep=sweep, holdout_samples=check.samples, holdout_acc_before=check.acc_before,
            holdout_acc_after=check.acc_after, max_acc_drop=self.max_acc_drop, collapsed=check.collapsed)
        return RepairResult(net, history, details, collapsed=check.collapsed)

    def __repr__(self) -> str:
        keys = ("max_prune_acc_drop", "prune_ratio", "layer", "epochs", "lr", "clean_ratio")
        return f"{type(self).__name__}(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in keys) + ")"
