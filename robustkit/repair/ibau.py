"""I-BAU - Implicit Backdoor Adversarial Unlearning: Zeng, Chen, Park, Mao, Jin, Jia, "Adversarial
Unlearning of Backdoors via Implicit Hypergradient", ICLR 2022.

Unlearning as a min-max problem on the defender's clean data:

    min_theta  L_out(theta, delta*(theta)),   delta*(theta) = argmax_{||delta||_2 <= eps} L_in(theta, delta),

with ``L_in = L_out = CE(f_theta(clip(x + delta)), y)`` and one *universal* perturbation ``delta``
(C x H x W) shared by all images - the stand-in for an unknown trigger. Each round:

1. *Inner maximization* (:func:`universal_perturbation`): ``inner_steps`` normalized-gradient
   ascent steps of size ``eps / 4`` on the mean loss over the whole clean subset, projected onto
   the L2 ball of radius ``eps``, from ``delta = 0`` (model in eval mode, weights unchanged).
2. *Outer steps*, one per batch (:class:`IBAUStep`, run by :func:`robustkit.training.fit`): the
   hypergradient of ``L_out`` through ``delta*(theta)`` by the implicit function theorem. With the
   fixed-point map of the inner problem ``Phi(delta, theta) = delta + eta * grad_delta L_in``,

       dL/dtheta = grad_theta L_out + (d Phi / d theta)^T v,
       v = (I - d Phi / d delta)^{-T} grad_delta L_out,

   where ``v`` is approximated by ``fixed_point_iters`` (5) iterations of
   ``v <- (d Phi / d delta)^T v + grad_delta L_out`` (a truncated Neumann series, the paper's
   fixed-point method), all as vector-Jacobian products.

Defaults follow the paper's CIFAR-10 setting where it transfers: 5 rounds, ``fixed_point_iters``
5, an Adam-type outer optimizer (AdamW without weight decay, lr 1e-3), 5% clean data; the batch is
32 (the paper's 100 is larger than 5% of a small data set). ``eps`` is an L2 radius in [0, 1]
pixel units (default 2.5, about the paper's bound of 10 in normalized CIFAR-10 units).

Simplifications: the inner maximization uses normalized-gradient ascent within the L2 ball (the
reference code runs SGD with lr 10 on the regularized objective ``CE - 0.001 |delta|^2``, without a
ball); ``eta`` (the fixed-point map's step) is a parameter (default 0.1); the fixed-point iteration
starts from ``v = grad_delta L_out`` (the reference code starts from 0, one term fewer); every
image of a batch gets ``delta`` in the outer loss (the paper's objective; the reference code
perturbs 1% of each batch).

Known limitation (docs/baselines.md): the implicit gradient assumes ``delta`` is a stationary point
of the inner problem and ``sum_k (dPhi/ddelta)^k`` converges. On small victims with few clean
images the bounded perturbation saturates the loss on the ball's boundary, the Jacobian's spectral
radius is >= 1, ``|v|`` grows with every iteration, and the unlearning swings from round to round.
:class:`IBAUDetails` records ``neumann_growth_max`` (``|v_K| / |grad_delta L_out|``; about ``K + 1``
or more when the series does not converge).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..backdoor.metrics import backdoor_monitor
from ..base import ModelRepair, RepairResult, ResultDetails
from ..data.arrays import ArrayDataset
from ..errors import InputError
from ..inference import eval_mode
from ..registry import REPAIRS
from ..training import Monitor, TrainStep, fit, unwrap
from ..utils import model_device
from .guard import (
    HOLDOUT_RATIO,
    MAX_ACC_DROP,
    check_bound,
    check_collapse,
    check_ratio,
    clean_accuracy,
    split_clean,
)


def project_l2(delta: torch.Tensor, eps: float) -> torch.Tensor:
    """Onto the L2 ball of radius ``eps``."""
    n = float(delta.norm())
    return delta if n <= eps else delta * (eps / n)


def universal_perturbation(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int,
                           batch_size: int = 256) -> torch.Tensor:
    """One ``delta`` (C x H x W) maximizing the mean cross-entropy of ``model(clip(x + delta))`` within the L2 ball."""
    dev = model_device(model)
    delta = torch.zeros(x.shape[1:], device=dev)
    saved = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with eval_mode(model):
            for _ in range(steps):
                d = delta.clone().requires_grad_(True)
                for s in range(0, x.shape[0], batch_size):
                    xb, yb = x[s:s + batch_size].to(dev), y[s:s + batch_size].to(dev)
                    loss = F.cross_entropy(model((xb + d).clamp(0, 1)), yb, reduction="sum") / x.shape[0]
                    loss.backward()
                g = d.grad
                delta = project_l2(delta + (eps / 4) * g / g.norm().clamp_min(1e-12), eps).detach()
    finally:
        for p, flag in zip(model.parameters(), saved):
            p.requires_grad_(flag)
    return delta


class IBAUStep(TrainStep):
    """The outer step: the implicit hypergradient of ``CE(f(clip(x + delta)), y)`` into ``.grad``.

    ``delta`` is recomputed over ``data`` (the whole clean subset) at the start of every round of
    ``steps_per_round`` batches.
    """

    def __init__(self, data: ArrayDataset, eps: float, inner_steps: int, steps_per_round: int,
                 fixed_point_iters: int = 5, eta: float = 0.1):
        super().__init__()
        self.data, self.eps, self.inner_steps = data, float(eps), int(inner_steps)
        self.steps_per_round, self.fixed_point_iters, self.eta = int(steps_per_round), int(fixed_point_iters), float(eta)
        self.delta: torch.Tensor | None = None
        self.deltas: list[torch.Tensor] = []
        #: per outer step: ``|v_K| / |grad_delta L_out|`` - about ``K + 1`` when the fixed-point map's Jacobian
        #: has spectral radius ~1 (the Neumann series does not converge), far more when it is > 1
        self.neumann_growth: list[float] = []
        self._count = 0
        self._params: list[nn.Parameter] = []

    def setup(self, model: nn.Module, params: list[tuple[str, nn.Parameter]]) -> None:
        self._params = [p for _, p in params]
        self._count = 0

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._count % self.steps_per_round == 0:
            self.delta = universal_perturbation(unwrap(model), self.data.images, self.data.labels, self.eps,
                                                self.inner_steps)
            self.deltas.append(self.delta.detach().cpu())
        self._count += 1
        assert self.delta is not None
        params = self._params
        d = self.delta.to(x.device).clone().requires_grad_(True)
        logits = model((x + d).clamp(0, 1))
        loss_out = F.cross_entropy(logits, y)
        g_theta = torch.autograd.grad(loss_out, params, retain_graph=True, allow_unused=True)
        (g_delta,) = torch.autograd.grad(loss_out, d)
        # fixed-point map of the inner maximization: Phi = delta + eta * grad_delta L_in
        loss_in = F.cross_entropy(model((x + d).clamp(0, 1)), y)
        (gi,) = torch.autograd.grad(loss_in, d, create_graph=True)
        phi = d + self.eta * gi
        v = g_delta.clone()
        for _ in range(self.fixed_point_iters):
            (jv,) = torch.autograd.grad(phi, d, grad_outputs=v, retain_graph=True)
            v = jv + g_delta
        self.neumann_growth.append(float(v.norm() / g_delta.norm().clamp_min(1e-12)))
        indirect = torch.autograd.grad(phi, params, grad_outputs=v, allow_unused=True)
        for p, a, b in zip(params, g_theta, indirect):
            g = torch.zeros_like(p) if a is None else a.detach()
            if b is not None:
                g = g + b.detach()
            p.grad = g if p.grad is None else p.grad + g
        if not torch.isfinite(loss_out):
            raise FloatingPointError(f"loss is {float(loss_out)}")
        return loss_out.detach(), logits.detach()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "eps": self.eps, "inner_steps": self.inner_steps,
                "fixed_point_iters": self.fixed_point_iters, "eta": self.eta}


@dataclass
class IBAUDetails(ResultDetails):
    """Rounds, the perturbation's norm per round, the clean subset's size and the guard."""

    rounds: int
    eps: float
    clean_samples: int
    delta_norms: list[float]
    holdout_samples: int = 0
    holdout_acc_before: float | None = None
    holdout_acc_after: float | None = None
    max_acc_drop: float | None = None
    collapsed: bool = False
    #: the largest ``|v_K| / |grad_delta L_out|`` over the outer steps (see :class:`IBAUStep`)
    neumann_growth_max: float | None = None


@REPAIRS.register("i_bau")
class IBAU(ModelRepair):
    """I-BAU (Zeng et al., ICLR 2022): adversarial unlearning of a universal perturbation with implicit hypergradients.

    Args:
        rounds: outer rounds (passes over the clean subset; a new ``delta`` each round).
        eps: L2 radius of the universal perturbation ([0, 1] pixel units).
        inner_steps: ascent steps of the inner maximization per round.
        fixed_point_iters: iterations of the implicit-gradient fixed point (Neumann series).
        eta: step of the inner problem's fixed-point map.
        lr: outer learning rate (AdamW, no weight decay by default).
        batch_size, clean_ratio: the clean subset (class-balanced ``clean_ratio``, default 5%).
        freeze_bn: train with BatchNorm in eval mode (running statistics frozen), for tiny clean sets.
        max_acc_drop, holdout_ratio: the collapse guard (:mod:`robustkit.repair.guard`).
    """

    def __init__(self, rounds: int = 5, eps: float = 2.5, inner_steps: int = 5, fixed_point_iters: int = 5,
                 eta: float = 0.1, lr: float = 1e-3, weight_decay: float = 0.0, batch_size: int = 32,
                 clean_ratio: float = 0.05, freeze_bn: bool = False, eval_every: int = 1, seed: int = 0, *,
                 max_acc_drop: float = MAX_ACC_DROP, holdout_ratio: float = HOLDOUT_RATIO):
        for name, v in (("rounds", rounds), ("inner_steps", inner_steps), ("batch_size", batch_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"{name} must be an integer >= 1, got {v!r}")
        if isinstance(fixed_point_iters, bool) or not isinstance(fixed_point_iters, int) or fixed_point_iters < 0:
            raise InputError(f"fixed_point_iters must be an integer >= 0, got {fixed_point_iters!r}")
        for name, v in (("eps", eps), ("eta", eta), ("lr", lr)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise InputError(f"{name} must be a finite number > 0, got {v!r}")
        if not 0 < clean_ratio <= 1:
            raise InputError(f"clean_ratio must be in (0, 1], got {clean_ratio!r}")
        self.rounds, self.eps, self.inner_steps, self.fixed_point_iters = rounds, float(eps), inner_steps, fixed_point_iters
        self.eta, self.lr, self.weight_decay, self.batch_size = float(eta), float(lr), float(weight_decay), batch_size
        self.clean_ratio, self.eval_every, self.seed = float(clean_ratio), int(eval_every), int(seed)
        self.freeze_bn = bool(freeze_bn)
        self.max_acc_drop = check_bound(max_acc_drop, "max_acc_drop")
        self.holdout_ratio = check_ratio(holdout_ratio, "holdout_ratio")

    def repair(self, model: nn.Module, clean_data: Dataset, *, test_data: Dataset | None = None,
               backdoor: Any = None, num_classes: int | None = None, inplace: bool = False,
               progress: bool = True) -> RepairResult:
        """Unlearn on a copy of ``model`` (``inplace=True``: the model itself); one history row per round."""
        if not isinstance(model, nn.Module):
            raise InputError(f"model must be an nn.Module, got {type(model).__name__}")
        split = split_clean(clean_data, self.clean_ratio, self.holdout_ratio, self.seed)
        acc_before = clean_accuracy(model, split.holdout)
        net = model if inplace else copy.deepcopy(model)
        steps = math.ceil(len(split.train) / self.batch_size)
        step = IBAUStep(split.train, self.eps, self.inner_steps, steps, self.fixed_point_iters, self.eta)
        measure = backdoor_monitor(test_data, backdoor, num_classes)
        callbacks = [Monitor(measure, self.eval_every, self.rounds)] if measure is not None else []
        history = fit(net, split.train, step, epochs=self.rounds, lr=self.lr, batch_size=self.batch_size,
                      optimizer="adamw", weight_decay=self.weight_decay, schedule="constant", callbacks=callbacks,
                      train_mode=(lambda m: m.eval()) if self.freeze_bn else None,
                      seed=self.seed, progress=progress, desc="I-BAU")
        check = check_collapse("IBAU", acc_before, net, split.holdout, self.max_acc_drop)
        details = IBAUDetails(self.rounds, self.eps, len(split.train), [float(d.norm()) for d in step.deltas],
                              check.samples, check.acc_before, check.acc_after, self.max_acc_drop, check.collapsed,
                              max(step.neumann_growth, default=None))
        return RepairResult(net, history, details, collapsed=check.collapsed)

    def __repr__(self) -> str:
        keys = ("rounds", "eps", "inner_steps", "fixed_point_iters", "lr", "clean_ratio")
        return f"{type(self).__name__}(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in keys) + ")"
