"""ANP - Adversarial Neuron Pruning: Wu, Wang, "Adversarial Neuron Perturbations Purify Backdoored
Deep Neural Networks", NeurIPS 2021.

Backdoored networks are sensitive to adversarial perturbations of their neurons: perturbed a
little, they start predicting the target class on clean inputs. ANP learns a mask ``m in [0, 1]``
per neuron that keeps the network accurate *under* such perturbations; neurons whose mask falls
low are pruned. As in the paper's code the neurons are BatchNorm channels: channel ``k`` of a BN
layer (``y = gamma x_hat + beta``) becomes

    y' = gamma_k (m_k + delta_k) x_hat + beta_k (1 + xi_k),      |delta_k|, |xi_k| <= eps,

(:func:`perturbed_bn`), and the masks solve

    min_m  alpha * L(m, 0, 0) + (1 - alpha) * max_{delta, xi} L(m, delta, xi)

on the clean data: every iteration draws ``delta, xi ~ U(-eps, eps)``, takes ``anp_steps`` (1)
signed-gradient ascent steps of size ``eps / anp_steps`` on the cross-entropy (not clipped back to
the box afterwards, as in the paper's code; ``clip_noise=True`` clips), then one SGD step on the
masks (lr 0.2, momentum 0.9) of the weighted loss, the masks clipped to [0, 1] (:class:`ANPStep`;
the iterations run in :func:`robustkit.training.fit` with only the masks trainable). During the
mask optimization BatchNorm normalizes with the *batch* statistics (``bn_mode="batch"``), as the
paper's code does (``model.train()``), on a copy whose running statistics are thrown away.
Finally channels whose mask is below ``threshold`` (0.2) are pruned: their BN weight ``gamma`` is
set to 0 (as the paper's code does), so the pruning lives in the weights and survives
``save_checkpoint``. Defaults are the paper's: ``eps = 0.4``, ``alpha = 0.2``, 2,000 iterations
of batch 128, 1% clean data.

Why the batch statistics matter (measured on the digits victims, docs/baselines.md): with the
running statistics (``bn_mode="running"``, what robustkit did before) the masks of 45-63 of a
SmallCNN's 96 BN neurons fell below 0.2 and pruning them left 10% accuracy; with batch statistics
1-3 neurons fall below the threshold and clean accuracy is kept. (On such small networks those few
neurons do not carry the backdoor either.) What decides whether the low masks are the backdoor
neurons is how the *victim* was trained: on PreActResNet18 digits victims trained on random crops,
as the paper's are, 44-59 of 848 neurons fall below 0.2 and ASR drops to 0-17% on three of four
victim seeds (99-100% on all four trained on the bare images; ``benchmarks/anp_victims.py``).

Simplifications: iterations are rounded up to whole passes over the clean subset (the paper
samples batches with replacement); the mask optimization sees the clean images as they are by
default (``augment=None``); the paper's code uses random crops and flips, available as
``augment="crop"`` / ``"crop_flip"`` but measured worse on the digits victims. A model without
BatchNorm is refused
(:class:`~robustkit.errors.InputError`): the perturbed neurons are BN channels (a ViT, which has
LayerNorm instead, gets an error saying so).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..backdoor.metrics import backdoor_monitor
from ..data.augment import augment_for, check_augment, check_padding
from ..base import ModelRepair, RepairResult, ResultDetails
from ..errors import InputError
from ..registry import REPAIRS
from ..training import TrainStep, fit, unwrap
from ..training.steps import _check_finite
from .guard import (
    HOLDOUT_RATIO,
    MAX_ACC_DROP,
    check_bound,
    check_collapse,
    check_ratio,
    clean_accuracy,
    split_clean,
)

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def perturbed_bn(y: torch.Tensor, beta: torch.Tensor | None, mask: torch.Tensor, delta: torch.Tensor | None = None,
                 xi: torch.Tensor | None = None) -> torch.Tensor:
    """A BN output ``y = gamma x_hat + beta`` turned into ``gamma (m + delta) x_hat + beta (1 + xi)`` (per channel, dim 1)."""
    shape = (1, -1) + (1,) * (y.dim() - 2)
    b = torch.zeros_like(mask) if beta is None else beta
    scale = mask if delta is None else mask + delta
    shift = b if xi is None else b * (1 + xi)
    return scale.view(shape) * (y - b.view(shape)) + shift.view(shape)


class ANPNet(nn.Module):
    """The network with a mask (a trainable parameter) and a perturbation per BatchNorm channel (forward hooks)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.bn_names = [n for n, m in net.named_modules() if isinstance(m, _BN)]
        if not self.bn_names:
            raise InputError(_no_bn(net))
        mods = dict(net.named_modules())
        self.bns = [mods[n] for n in self.bn_names]
        self.masks = nn.ParameterList([nn.Parameter(torch.ones(bn.num_features, device=_dev(bn))) for bn in self.bns])
        self.deltas = [torch.zeros(bn.num_features, device=_dev(bn)) for bn in self.bns]
        self.xis = [torch.zeros(bn.num_features, device=_dev(bn)) for bn in self.bns]
        self.perturb = False
        self.handles = [bn.register_forward_hook(self._make(i)) for i, bn in enumerate(self.bns)]

    def _make(self, i: int):
        def hook(mod: nn.Module, inp: Any, out: torch.Tensor) -> torch.Tensor:
            beta = mod.bias if mod.affine else None
            if self.perturb:
                return perturbed_bn(out, beta, self.masks[i], self.deltas[i], self.xis[i])
            return perturbed_bn(out, beta, self.masks[i])
        return hook

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def noise(self) -> list[torch.Tensor]:
        return self.deltas + self.xis

    @torch.no_grad()
    def clip_masks(self) -> None:
        for m in self.masks:
            m.clamp_(0.0, 1.0)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _no_bn(model: nn.Module) -> str:
    msg = f"ANP perturbs BatchNorm neurons (as the paper does); {type(model).__name__} has no BatchNorm layer"
    if any(isinstance(m, nn.LayerNorm) for m in model.modules()):
        msg += (" - it normalizes with LayerNorm (a Vision Transformer?); ANP on LayerNorm neurons is not implemented "
                "in robustkit: use I-BAU, Neural Cleanse or STRIP for such models")
    return msg


def _dev(m: nn.Module) -> torch.device:
    for t in list(m.parameters()) + list(m.buffers()):
        return t.device
    return torch.device("cpu")


class ANPStep(TrainStep):
    """One ANP iteration on an :class:`ANPNet`: random start in the eps-box, ``anp_steps`` ascent
    steps on the perturbation, then the gradient of ``alpha * L_nat + (1 - alpha) * L_rob`` on the masks."""

    def __init__(self, eps: float = 0.4, anp_steps: int = 1, alpha: float = 0.2, clip_noise: bool = False):
        super().__init__()
        self.eps, self.anp_steps, self.alpha = float(eps), int(anp_steps), float(alpha)
        self.clip_noise = bool(clip_noise)
        self._gen = torch.Generator().manual_seed(0)

    def set_seed(self, seed: int) -> None:
        self._gen = torch.Generator().manual_seed(seed)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        net = unwrap(model)
        if not isinstance(net, ANPNet):
            raise InputError("ANPStep trains an ANPNet (the masks), not a bare model")
        net.clip_masks()  # the optimizer stepped since the last clip
        if self.eps > 0:
            for t in net.noise():
                t.copy_((torch.rand(t.shape, generator=self._gen) * 2 - 1).to(t.device) * self.eps)
            net.perturb = True
            for _ in range(self.anp_steps):
                noise = [t.requires_grad_(True) for t in net.noise()]
                grads = torch.autograd.grad(F.cross_entropy(model(x), y), noise)
                with torch.no_grad():
                    for t, g in zip(noise, grads):
                        t.add_(g.sign(), alpha=self.eps / self.anp_steps)
                        if self.clip_noise:
                            t.clamp_(-self.eps, self.eps)
                for t in noise:
                    t.requires_grad_(False)
            loss_rob = F.cross_entropy(model(x), y)
            net.perturb = False
        else:
            loss_rob = None
        logits = model(x)
        loss_nat = F.cross_entropy(logits, y)
        loss = loss_nat if loss_rob is None else self.alpha * loss_nat + (1 - self.alpha) * loss_rob
        _check_finite(loss)
        loss.backward()
        return loss.detach(), logits.detach()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "eps": self.eps, "anp_steps": self.anp_steps, "alpha": self.alpha,
                "clip_noise": self.clip_noise}


@dataclass
class ANPDetails(ResultDetails):
    """The masks per BN layer, the pruned channels, the threshold and the guard."""

    threshold: float
    pruned: int
    neurons: int
    iterations: int
    clean_samples: int
    pruned_per_layer: dict[str, list[int]] = field(default_factory=dict)
    masks: dict[str, list[float]] = field(default_factory=dict)
    sweep: list[dict[str, float]] = field(default_factory=list)
    holdout_samples: int = 0
    holdout_acc_before: float | None = None
    holdout_acc_after: float | None = None
    max_acc_drop: float | None = None
    collapsed: bool = False
    augment: str = "none"

    def tables(self) -> list[tuple[str, list[dict[str, Any]]]]:
        rows = [{"layer": n, "neurons": len(v), "pruned": len(self.pruned_per_layer.get(n, [])),
                 "min_mask": min(v), "mean_mask": sum(v) / len(v)} for n, v in self.masks.items()]
        return [("ANP masks per BatchNorm layer", rows)]

    def figures(self, out_dir: Any) -> list[str]:
        from ..eval.plots import plt, save_figure

        values = sorted(v for vs in self.masks.values() for v in vs)
        fig, ax = plt.subplots(figsize=(6, 3.4))
        ax.plot(range(len(values)), values, ".", ms=3)
        ax.axhline(self.threshold, color="tab:red", ls="--", lw=0.8, label=f"threshold {self.threshold:g}")
        ax.set_xlabel("neuron (sorted by mask)")
        ax.set_ylabel("mask")
        ax.set_ylim(-0.05, 1.05)
        ax.legend(fontsize=8)
        ax.set_title(f"ANP: {self.pruned} of {self.neurons} neurons pruned")
        return [save_figure(fig, Path(out_dir) / "anp_masks.png").name]


@REPAIRS.register("anp")
class ANP(ModelRepair):
    """Adversarial Neuron Pruning (Wu & Wang, NeurIPS 2021): masks robust to neuron perturbations, prune by threshold.

    Args:
        eps: perturbation budget of the BN neurons (0.4).
        anp_steps: ascent steps on the perturbation per iteration (1).
        alpha: weight of the unperturbed loss (0.2).
        mask_lr: SGD learning rate of the masks (0.2, momentum 0.9).
        iterations: mask-optimization iterations (2000; rounded up to whole passes).
        batch_size: 128.
        threshold: prune neurons whose mask is below it (0.2).
        clean_ratio: class-balanced share of the defender's clean data (1%, the paper's).
        max_prune_acc_drop: ``None`` (the paper): prune every neuron below ``threshold``. A number
            (robustkit's extension for small models and small clean sets, where the threshold alone
            can prune a network to chance): prune the candidates lowest mask first and stop before
            the clean accuracy on the defender's subset drops by more than this; the sweep is in
            ``details.sweep``.
        bn_mode: ``"batch"`` (the paper's code: BN on batch statistics during the mask optimization) or
            ``"running"`` (eval mode; collapses small networks, see the module docstring).
        clip_noise: clip the perturbation to ``[-eps, eps]`` after the ascent step (the paper's code does not).
        augment, crop_padding: ``None`` (default) optimizes the masks on the clean images as they are;
            ``"crop"`` / ``"crop_flip"`` on random crops (and flips) of them, as the paper's code does
            (:mod:`robustkit.data.augment`). Measured worse on the digits victims (docs/baselines.md).
        max_acc_drop, holdout_ratio: the collapse guard (:mod:`robustkit.repair.guard`).
    """

    def __init__(self, eps: float = 0.4, anp_steps: int = 1, alpha: float = 0.2, mask_lr: float = 0.2,
                 iterations: int = 2000, batch_size: int = 128, threshold: float = 0.2, clean_ratio: float = 0.01,
                 max_prune_acc_drop: float | None = None, seed: int = 0, bn_mode: str = "batch", clip_noise: bool = False,
                 augment: str | None = None, crop_padding: int | None = None,
                 *, max_acc_drop: float = MAX_ACC_DROP, holdout_ratio: float = HOLDOUT_RATIO):
        for name, v in (("anp_steps", anp_steps), ("iterations", iterations), ("batch_size", batch_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"{name} must be an integer >= 1, got {v!r}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
            raise InputError(f"eps must be a finite number >= 0, got {eps!r}")
        if not (isinstance(mask_lr, (int, float)) and mask_lr > 0):
            raise InputError(f"mask_lr must be > 0, got {mask_lr!r}")
        if not 0 < clean_ratio <= 1:
            raise InputError(f"clean_ratio must be in (0, 1], got {clean_ratio!r}")
        self.eps, self.anp_steps, self.alpha = float(eps), anp_steps, check_bound(alpha, "alpha")
        self.mask_lr, self.iterations, self.batch_size = float(mask_lr), iterations, batch_size
        self.threshold = check_bound(threshold, "threshold")
        self.max_prune_acc_drop = None if max_prune_acc_drop is None else check_bound(max_prune_acc_drop,
                                                                                      "max_prune_acc_drop")
        self.clean_ratio, self.seed = float(clean_ratio), int(seed)
        if bn_mode not in ("batch", "running"):
            raise InputError(f"bn_mode must be 'batch' (the paper's code) or 'running', got {bn_mode!r}")
        self.bn_mode, self.clip_noise = bn_mode, bool(clip_noise)
        self.augment, self.crop_padding = check_augment(augment), check_padding(crop_padding)
        self.max_acc_drop = check_bound(max_acc_drop, "max_acc_drop")
        self.holdout_ratio = check_ratio(holdout_ratio, "holdout_ratio")

    def optimize_masks(self, model: nn.Module, data: Dataset, progress: bool = True
                       ) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]], int]:
        """Run the mask optimization on a copy of ``model``; ``({bn name: mask}, loss history, iterations)``."""
        anp = ANPNet(copy.deepcopy(model))
        steps = math.ceil(len(data) / self.batch_size)  # type: ignore[arg-type]
        epochs = math.ceil(self.iterations / steps)
        augment = augment_for(self.augment, data, self.crop_padding)
        try:
            # bn_mode "batch": BN on batch statistics, as the paper's code (model.train()); the copy's running
            # statistics move, but only the masks leave this function and the pruning goes into the input's copy
            mode = (lambda m: m.train()) if self.bn_mode == "batch" else (lambda m: m.eval())
            rows = fit(anp, data, ANPStep(self.eps, self.anp_steps, self.alpha, self.clip_noise), epochs=epochs,
                       lr=self.mask_lr, batch_size=self.batch_size, optimizer="sgd", momentum=0.9, weight_decay=0.0,
                       schedule="constant", trainable=lambda n, p: n.startswith("masks."),
                       train_mode=mode, seed=self.seed, progress=progress, desc="ANP: masks",
                       augment=augment)
            anp.clip_masks()
            masks = {n: m.detach().cpu().clone() for n, m in zip(anp.bn_names, anp.masks)}
        finally:
            anp.remove()
        every = max(1, len(rows) // 50)
        history = [{"iteration": r["epoch"] * steps, "loss": r["loss"], "train_acc": r["train_acc"]}
                   for r in rows if r["epoch"] % every == 0 or r["epoch"] == len(rows)]
        return masks, history, epochs * steps

    def repair(self, model: nn.Module, clean_data: Dataset, *, test_data: Dataset | None = None,
               backdoor: Any = None, num_classes: int | None = None, inplace: bool = False,
               progress: bool = True) -> RepairResult:
        """Optimize the masks, then zero the BN weight of every channel whose mask is below ``threshold``.

        History: ``epoch 0`` (the input model) and ``epoch 1`` (the pruned one) with ACC / ASR / RA
        when measured; the mask-optimization losses are rows with ``iteration``.
        """
        if not isinstance(model, nn.Module):
            raise InputError(f"model must be an nn.Module, got {type(model).__name__}")
        if not any(isinstance(m, _BN) for m in model.modules()):
            raise InputError(_no_bn(model))
        split = split_clean(clean_data, self.clean_ratio, self.holdout_ratio, self.seed)
        acc_before = clean_accuracy(model, split.holdout)
        measure = backdoor_monitor(test_data, backdoor, num_classes)
        history: list[dict[str, Any]] = [{"epoch": 0, **measure(model)}] if measure is not None else []
        masks, trace, iters = self.optimize_masks(model, split.train, progress)
        history += trace
        net = model if inplace else copy.deepcopy(model)
        mods = dict(net.named_modules())
        # candidates: every neuron whose mask is below the threshold, lowest mask first
        cands = sorted(((float(v), name, int(i)) for name, m in masks.items() for i, v in enumerate(m)
                        if float(v) < self.threshold), key=lambda t: (t[0], t[1], t[2]))
        for _, name, _ in cands:
            if not mods[name].affine:
                raise InputError(f"ANP: BatchNorm layer {name} has no affine weight (gamma) to prune")
        pruned: dict[str, list[int]] = {}
        sweep: list[dict[str, float]] = []
        acc0 = clean_accuracy(net, split.train)
        with torch.no_grad():
            for k, (value, name, i) in enumerate(cands, 1):
                saved = float(mods[name].weight[i])
                mods[name].weight[i] = 0.0
                if self.max_prune_acc_drop is not None:
                    acc = clean_accuracy(net, split.train)
                    sweep.append({"pruned": k, "mask": value, "clean_acc": acc})
                    if acc0 - acc > self.max_prune_acc_drop + 1e-12:
                        mods[name].weight[i] = saved  # the paper's threshold, stopped before this neuron
                        break
                pruned.setdefault(name, []).append(i)
        if measure is not None:
            history.append({"epoch": 1, **measure(net)})
        check = check_collapse("ANP", acc_before, net, split.holdout, self.max_acc_drop)
        n_pruned = sum(len(v) for v in pruned.values())
        details = ANPDetails(self.threshold, n_pruned, sum(m.numel() for m in masks.values()), iters, len(split.train),
                             pruned, {n: [float(v) for v in m] for n, m in masks.items()}, sweep, check.samples,
                             check.acc_before, check.acc_after, self.max_acc_drop, check.collapsed,
                             self.augment or "none")
        return RepairResult(net, history, details, collapsed=check.collapsed)

    def __repr__(self) -> str:
        keys = ("eps", "alpha", "iterations", "threshold", "clean_ratio", "bn_mode", "augment")
        return f"{type(self).__name__}(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in keys) + ")"
