"""NAD - Neural Attention Distillation: Li, Lyu, Koren, Lyu, Li, Ma, "Neural Attention Distillation:
Erasing Backdoor Triggers from Deep Neural Networks", ICLR 2021.

1. *Teacher*: a copy of the backdoored model fine-tuned with cross-entropy on the defender's
   clean subset (5%).
2. *Student*: the backdoored model trained on the same subset with

       L = CE(f_S(x), y) + sum_l beta_l * || A_T^l / ||A_T^l||_2 - A_S^l / ||A_S^l||_2 ||_2

   where ``A^l = sum_c |a_c^l|^p`` (``p = 2``) is the attention map of layer group ``l``'s
   activation ``a^l`` (N x C x H x W -> N x HW) and the norm is averaged over the batch
   (:func:`attention_map`, :func:`attention_distance`). The teacher is frozen (eval mode).

Both trainings run through :func:`robustkit.training.fit` (the student with :class:`NADStep`).

Layer groups: the outputs of the network's last ``groups`` (3) resolution stages, found by tracing
one forward pass: the last conv or container module finishing at each spatial size (for a
PreActResNet18 ``layer2``, ``layer3``, ``layer4``, the paper's choice for its ResNets; for a
SmallCNN the two conv stages and the last pooled map). ``layers=`` names them instead. A model
without conv feature maps (a ViT) is refused with :class:`~robustkit.errors.InputError`.

Simplifications: the paper's code writes the distance as the mean of squared differences; here
it is the paper's equation (an L2 norm per image), so ``betas`` are on that scale (default 10 for
every group, chosen on the digits benchmark; the paper's 500-5000 belong to the squared-mean
form). One ``beta`` list entry per layer group (a single number is used for all).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..backdoor.metrics import backdoor_monitor
from ..base import ModelRepair, RepairResult, ResultDetails
from ..errors import InputError
from ..registry import REPAIRS
from ..training import Monitor, PlainStep, TrainStep, fit, unwrap
from ..training.steps import _check_finite
from .fine_pruning import _refuse_tokens, trace_calls
from .guard import (
    HOLDOUT_RATIO,
    MAX_ACC_DROP,
    check_bound,
    check_collapse,
    check_ratio,
    clean_accuracy,
    split_clean,
)


def attention_map(a: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """``sum_c |a_c|^p`` flattened and L2-normalized: N x C x H x W -> N x HW (unit rows)."""
    if a.dim() != 4:
        raise InputError(f"attention maps need N x C x H x W activations, got shape {tuple(a.shape)}")
    am = a.abs().pow(p).sum(1).flatten(1)
    return F.normalize(am, p=2, dim=1)


def attention_distance(a_student: torch.Tensor, a_teacher: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Batch mean of ``|| A_T / ||A_T|| - A_S / ||A_S|| ||_2`` (NAD's loss term for one layer group)."""
    return (attention_map(a_teacher, p) - attention_map(a_student, p)).norm(p=2, dim=1).mean()


def stage_outputs(model: nn.Module, x: torch.Tensor, groups: int = 3, method: str = "NAD") -> list[str]:
    """Names of the modules ending the last ``groups`` resolution stages (see the module docstring)."""
    calls = trace_calls(model, x[:2])
    convs = [i for i, c in enumerate(calls) if isinstance(c.module, nn.Conv2d)]
    if not convs:
        raise InputError(f"{method} needs convolutional feature maps; {type(model).__name__} has no nn.Conv2d")
    _refuse_tokens(model, calls, convs[-1], method)
    ends: dict[tuple[int, int], str] = {}
    for c in calls[convs[0]:]:
        # convs and containers only: a leaf BN / ReLU may already belong to the next stage (pre-activation blocks)
        structural = isinstance(c.module, nn.Conv2d) or any(True for _ in c.module.children())
        if structural and len(c.shape) == 4 and c.shape[2] * c.shape[3] > 1:
            ends.pop(c.shape[2:], None)  # keep insertion order = order of the stage's last call
            ends[c.shape[2:]] = c.name
    names = list(ends.values())
    if not names:
        raise InputError(f"{method}: {type(model).__name__} has no spatial feature map larger than 1x1")
    return names[-groups:]


class _Capture:
    """Forward hooks storing the outputs of named modules."""

    def __init__(self, model: nn.Module, names: Sequence[str]):
        mods = dict(model.named_modules())
        missing = [n for n in names if n not in mods or not n]
        if missing:
            raise InputError(f"NAD: the model has no module named {missing}")
        self.out: dict[str, torch.Tensor] = {}
        self.handles = [mods[n].register_forward_hook(self._make(n)) for n in names]
        self.names = list(names)

    def _make(self, name: str):
        def hook(mod: nn.Module, inp: Any, out: Any) -> None:
            self.out[name] = out
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class NADStep(TrainStep):
    """``CE(student(x), y) + sum_l beta_l * attention_distance(student_l, teacher_l)`` (teacher frozen, eval mode)."""

    def __init__(self, teacher: nn.Module, layers: Sequence[str], betas: Sequence[float], p: float = 2.0):
        super().__init__()
        if len(betas) != len(layers):
            raise InputError(f"NAD: {len(betas)} betas for {len(layers)} layer groups")
        self.teacher, self.layers, self.betas, self.p = teacher.eval(), list(layers), [float(b) for b in betas], float(p)
        for q in teacher.parameters():
            q.requires_grad_(False)
        self._t = _Capture(teacher, self.layers)
        self._s: _Capture | None = None

    def setup(self, model: nn.Module, params: list[tuple[str, nn.Parameter]]) -> None:
        self.close_student()
        self._s = _Capture(unwrap(model), self.layers)

    def close_student(self) -> None:
        if self._s is not None:
            self._s.remove()
            self._s = None

    def close(self) -> None:
        self.close_student()
        self._t.remove()

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._s is None:
            raise RuntimeError("NADStep.setup() was not called (use it through robustkit.training.fit)")
        with torch.no_grad():
            self.teacher(x)
        logits = model(x)
        loss = self.loss(logits, y)
        for name, beta in zip(self.layers, self.betas):
            loss = loss + beta * attention_distance(self._s.out[name], self._t.out[name].detach(), self.p)
        _check_finite(loss)
        loss.backward()
        return loss.detach(), logits.detach()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "layers": self.layers, "betas": self.betas, "p": self.p}


@dataclass
class NADDetails(ResultDetails):
    """Layer groups and betas, the teacher's test metrics (when measured), the collapse guard."""

    layers: list[str]
    betas: list[float]
    clean_samples: int
    teacher_epochs: int
    teacher_acc: float | None = None
    teacher_asr: float | None = None
    holdout_samples: int = 0
    holdout_acc_before: float | None = None
    holdout_acc_after: float | None = None
    max_acc_drop: float | None = None
    collapsed: bool = False


@REPAIRS.register("nad")
class NAD(ModelRepair):
    """Neural Attention Distillation (Li et al., ICLR 2021): fine-tuned teacher, attention distillation.

    Args:
        teacher_epochs, teacher_lr: the teacher's fine-tuning (paper: 10 epochs, lr 0.01).
        epochs, lr: the student's training (paper: 20 epochs, lr 0.01).
        betas: weight of each layer group's attention term (see the module docstring on scale).
        p: attention-map power (2).
        layers: module names of the layer groups (``None``: the last ``groups`` stage outputs).
        groups: how many stages when ``layers`` is ``None`` (3).
        clean_ratio: class-balanced share of the defender's clean data (5%, the paper's).
        max_acc_drop, holdout_ratio: the collapse guard (:mod:`robustkit.repair.guard`).
    """

    def __init__(self, teacher_epochs: int = 10, teacher_lr: float = 0.01, epochs: int = 20, lr: float = 0.01,
                 betas: float | Sequence[float] = 10.0, p: float = 2.0, layers: Sequence[str] | None = None,
                 groups: int = 3, momentum: float = 0.9, weight_decay: float = 5e-4, batch_size: int = 64,
                 clean_ratio: float = 0.05, eval_every: int = 1, seed: int = 0, *,
                 max_acc_drop: float = MAX_ACC_DROP, holdout_ratio: float = HOLDOUT_RATIO):
        for name, v in (("teacher_epochs", teacher_epochs), ("epochs", epochs), ("groups", groups),
                        ("batch_size", batch_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"{name} must be an integer >= 1, got {v!r}")
        bl = [betas] if isinstance(betas, (int, float)) else list(betas)
        if not bl or any(isinstance(b, bool) or not isinstance(b, (int, float)) or b < 0 for b in bl):
            raise InputError(f"betas must be a number >= 0 or a list of them, got {betas!r}")
        if not p > 0:
            raise InputError(f"p must be > 0, got {p!r}")
        if layers is not None and (isinstance(layers, str) or not all(isinstance(n, str) for n in layers)):
            raise InputError(f"layers must be a list of module names, got {layers!r}")
        if not 0 < clean_ratio <= 1:
            raise InputError(f"clean_ratio must be in (0, 1], got {clean_ratio!r}")
        self.teacher_epochs, self.teacher_lr, self.epochs, self.lr = teacher_epochs, float(teacher_lr), epochs, float(lr)
        self.betas, self.p, self.layers, self.groups = [float(b) for b in bl], float(p), \
            (list(layers) if layers is not None else None), groups
        self.momentum, self.weight_decay, self.batch_size = float(momentum), float(weight_decay), batch_size
        self.clean_ratio, self.eval_every, self.seed = float(clean_ratio), int(eval_every), int(seed)
        self.max_acc_drop = check_bound(max_acc_drop, "max_acc_drop")
        self.holdout_ratio = check_ratio(holdout_ratio, "holdout_ratio")

    def _fit_kw(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "optimizer": "sgd", "momentum": self.momentum,
                "weight_decay": self.weight_decay, "schedule": "cosine", "seed": self.seed}

    def repair(self, model: nn.Module, clean_data: Dataset, *, test_data: Dataset | None = None,
               backdoor: Any = None, num_classes: int | None = None, inplace: bool = False,
               progress: bool = True) -> RepairResult:
        """Fine-tune a teacher copy, then distil its attention into a copy of ``model`` (``inplace``: the model)."""
        if not isinstance(model, nn.Module):
            raise InputError(f"model must be an nn.Module, got {type(model).__name__}")
        split = split_clean(clean_data, self.clean_ratio, self.holdout_ratio, self.seed)
        layers = self.layers or stage_outputs(model, split.train.images, self.groups)
        betas = self.betas * len(layers) if len(self.betas) == 1 else self.betas
        if len(betas) != len(layers):
            raise InputError(f"NAD: {len(self.betas)} betas for {len(layers)} layer groups {layers}")
        acc_before = clean_accuracy(model, split.holdout)
        measure = backdoor_monitor(test_data, backdoor, num_classes)
        teacher = copy.deepcopy(model)
        fit(teacher, split.train, PlainStep(), epochs=self.teacher_epochs, lr=self.teacher_lr, progress=progress,
            desc="NAD: teacher", **self._fit_kw())
        t_metrics = measure(teacher) if measure is not None else {}
        net = model if inplace else copy.deepcopy(model)
        step = NADStep(teacher, layers, betas, self.p)
        callbacks = [Monitor(measure, self.eval_every, self.epochs)] if measure is not None else []
        try:
            history = fit(net, split.train, step, epochs=self.epochs, lr=self.lr, callbacks=callbacks,
                          progress=progress, desc="NAD: student", **self._fit_kw())
        finally:
            step.close()
        check = check_collapse("NAD", acc_before, net, split.holdout, self.max_acc_drop)
        details = NADDetails(layers, list(betas), len(split.train), self.teacher_epochs, t_metrics.get("acc"),
                             t_metrics.get("asr"), check.samples, check.acc_before, check.acc_after,
                             self.max_acc_drop, check.collapsed)
        return RepairResult(net, history, details, collapsed=check.collapsed)

    def __repr__(self) -> str:
        keys = ("teacher_epochs", "epochs", "lr", "betas", "layers", "clean_ratio")
        return f"{type(self).__name__}(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in keys) + ")"
