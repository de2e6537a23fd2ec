"""I-BAU - Implicit Backdoor Adversarial Unlearning: Zeng, Chen, Park, Mao, Jin, Jia, "Adversarial
Unlearning of Backdoors via Implicit Hypergradient", ICLR 2022.

Unlearning as a min-max problem on the defender's clean data:

    min_theta  L_out(theta, delta*(theta)),   delta*(theta) = argmax_{||delta||_2 <= eps} L_in(theta, delta),

with ``L_in = L_out = CE(f_theta(clip(x + delta)), y)`` and one *universal* perturbation ``delta``
(C x H x W) shared by all images - the stand-in for an unknown trigger. Each round:

1. *Inner maximization* (:func:`universal_perturbation`): ``inner_steps`` (30) normalized-gradient
   ascent steps of size ``eps / 4`` on the mean loss over the whole clean subset, projected onto
   the L2 ball of radius ``eps``, from ``delta = 0`` (model in eval mode, weights unchanged).
2. *Outer steps*, one per batch (:class:`IBAUStep`, run by :func:`robustkit.training.fit`): the
   hypergradient of ``L_out`` through ``delta*(theta)`` by the implicit function theorem,

       dL/dtheta = grad_theta L_out + (d grad_delta L_in / d theta)^T u,

   where ``u`` solves the adjoint of the inner problem's first-order (KKT) system. The maximizer lies
   on the sphere ``|delta| = eps`` with ``grad_delta L_in = mu delta`` (multiplier ``mu >= 0``); with
   ``H`` the Hessian of ``L_in`` in ``delta`` and ``P`` the projector onto the sphere's tangent space,
   ``u`` is the tangent solution of ``P (mu I - H) P u = P grad_delta L_out`` (the bordered KKT matrix
   ``[[mu I - H, delta], [delta^T, 0]]`` eliminated), found by conjugate gradients
   (:func:`tangent_cg`, ``cg_iters`` 20, relative residual ``cg_tol`` 1e-3), all products as
   Hessian-vector / vector-Jacobian products.

Why not the paper's fixed-point (Neumann) iteration. The paper computes ``u`` with ``K`` iterations
of ``v <- (dPhi/ddelta)^T v + grad_delta L_out`` on the ascent map ``Phi = delta + eta grad_delta L_in``
(its code: gradient descent on ``-L_in + 0.001 |delta|^2``, step 0.1). That series converges only if
the spectral radius of ``dPhi/ddelta = I + eta H`` is below 1, i.e. if ``H`` is negative definite. For a
ReLU network with BatchNorm in eval mode the logits are piecewise linear in the input, so ``H`` is the
cross-entropy's Gauss-Newton term ``J^T (diag p - p p^T) J``: positive semi-definite (measured on the
digits victims: smallest eigenvalue -1e-7, largest 0.001-14). Every eigenvalue of ``I + eta H`` is then
>= 1 for *any* step ``eta``: no step size makes the ascent map contractive, ``|v_K|`` grows at least
like ``K + 1`` (and geometrically where ``H`` is large), and there is no interior maximizer (a convex
function's maximum over a ball is on its boundary). On the sphere the relevant operator is
``mu I - H`` on the tangent space, positive definite at a strict local maximizer (the second-order
condition), so CG applies. ``hypergrad="neumann"`` keeps the paper's method for comparison.

Defaults. 5 rounds, AdamW (the paper's Adam; no weight decay), batch 32 (the paper's 100 is larger
than 5% of a small data set), 5% clean data, ``eps`` 2.5 as an L2 radius in [0, 1] pixel units (about
the paper's 10 in normalized CIFAR-10 units), BatchNorm frozen (``freeze_bn=True``: the reference code
runs the whole defense in ``model.eval()``; in train mode the batch mean cancels part of a universal
perturbation and the inner solution does not match the network being trained), ``lr`` 3e-4 (the
paper's 1e-3 took clean accuracy to 20-37% on the digits victims: 66 images, 3 steps per round).

Simplifications: the inner maximization is normalized-gradient ascent within the L2 ball (the
reference code runs SGD with lr 10 on the regularized objective ``CE - 0.001 |delta|^2`` without a
ball); ``H`` and the mixed term are evaluated on the current outer batch (a stochastic estimate, as
the reference code evaluates its fixed-point map on one batch), ``mu`` on the whole clean subset;
every image of a batch gets ``delta`` in the outer loss (the paper's objective; the reference code
perturbs 1% of each batch: ``perturb_ratio``). Where CG meets non-positive curvature (``delta`` is not
a strict local maximizer, e.g. an inexact inner solution; 3-6 of 15 steps on the digits victims) the
implicit function theorem does not apply and the step uses the direct term alone (``u = 0``; Danskin's
gradient), counted in ``details.negative_curvature_steps``.

Diagnostics (:class:`IBAUDetails`): per round the KKT residual ``|P grad| / |grad|`` of the inner
solution and ``mu``; CG's largest iteration count and residual; the ratio of the indirect to the direct
term; ``neumann_growth_max`` for ``hypergrad="neumann"``. Results and limits: docs/baselines.md (I-BAU).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable

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
                           batch_size: int = 256, return_grad: bool = False):
    """One ``delta`` (C x H x W) maximizing the mean cross-entropy of ``model(clip(x + delta))`` within the L2 ball.

    ``steps`` normalized-gradient ascent steps of size ``eps / 4`` from 0, each projected onto the ball.
    ``return_grad=True`` also returns the gradient of the mean loss at the returned ``delta`` (one more pass),
    from which :class:`IBAUStep` takes the KKT multiplier and the stationarity residual.
    """
    dev = model_device(model)
    delta = torch.zeros(x.shape[1:], device=dev)
    saved = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)

    def grad_at(dv: torch.Tensor) -> torch.Tensor:
        d = dv.clone().requires_grad_(True)
        for s in range(0, x.shape[0], batch_size):
            xb, yb = x[s:s + batch_size].to(dev), y[s:s + batch_size].to(dev)
            loss = F.cross_entropy(model((xb + d).clamp(0, 1)), yb, reduction="sum") / x.shape[0]
            loss.backward()
        assert d.grad is not None
        return d.grad

    try:
        with eval_mode(model):
            for _ in range(steps):
                g = grad_at(delta)
                delta = project_l2(delta + (eps / 4) * g / g.norm().clamp_min(1e-12), eps).detach()
            g_final = grad_at(delta).detach() if return_grad else None
    finally:
        for p, flag in zip(model.parameters(), saved):
            p.requires_grad_(flag)
    return (delta, g_final) if return_grad else delta


def kkt_multiplier(delta: torch.Tensor, grad: torch.Tensor, eps: float, rtol: float = 1e-4) -> tuple[float, float, bool]:
    """``(mu, residual, on_boundary)`` of the inner problem's first-order (KKT) condition at ``delta``.

    On the sphere ``|delta| = eps`` a maximizer satisfies ``grad = mu * delta`` with ``mu >= 0``;
    ``mu = max(0, <grad, delta>) / |delta|^2`` (least squares) and the residual is the share of the
    gradient that is tangent to the sphere, ``|P grad| / |grad|`` with ``P = I - delta delta^T / |delta|^2``
    (0 at an exact KKT point). Inside the ball ``mu = 0`` and the residual is 1 unless the gradient vanishes.
    """
    gn = float(grad.norm())
    n = float(delta.norm())
    if n < eps * (1 - rtol):
        return 0.0, (0.0 if gn == 0 else 1.0), False
    u = delta.flatten() / n
    g = grad.flatten()
    radial = float(g @ u)
    tangential = float((g - radial * u).norm())
    return max(radial, 0.0) / n, (tangential / gn if gn > 0 else 0.0), True


def tangent_cg(hvp: Callable[[torch.Tensor], torch.Tensor], rhs: torch.Tensor, delta: torch.Tensor | None,
               mu: float, iters: int, tol: float) -> tuple[torch.Tensor, dict[str, Any]]:
    """Solve ``P (mu I - H) P u = P rhs`` for ``u`` in the tangent space by conjugate gradients.

    ``hvp(w) = H w`` (the inner loss's Hessian in ``delta``), ``P`` the projector onto the tangent space of the
    sphere at ``delta`` (``delta=None``: ``P = I``, an interior point). The operator is symmetric, and positive
    definite on the tangent space at a strict local maximizer on the sphere (the second-order condition); CG
    stops at ``iters`` iterations, at relative residual ``tol``, or at a direction of non-positive curvature
    (the point is then not a strict local maximizer and the implicit function theorem does not apply: ``u = 0``
    is returned and ``info["negative_curvature"]`` is set). ``info``: ``iters``, ``residual`` (CG's recursive
    ``|r| / |P rhs|``; 1 after negative curvature), ``negative_curvature``.
    """
    if delta is None:
        def proj(w: torch.Tensor) -> torch.Tensor:
            return w
    else:
        unit = delta / delta.norm()

        def proj(w: torch.Tensor) -> torch.Tensor:
            return w - (w * unit).sum() * unit

    def op(w: torch.Tensor) -> torch.Tensor:
        return proj(mu * w - hvp(w))

    b = proj(rhs)
    bn = float(b.norm())
    x = torch.zeros_like(b)
    info: dict[str, Any] = {"iters": 0, "residual": 0.0, "negative_curvature": False}
    if bn == 0:
        return x, info
    r = b.clone()
    p = r.clone()
    rs = float((r * r).sum())
    k = 0
    # never below float32's resolution: past it the recursion's curvature p.Ap is rounding noise
    tol = max(tol, 1e-6 if b.dtype == torch.float32 else 1e-12)
    while k < iters and math.sqrt(rs) > tol * bn:
        ap = op(p)
        pap = float((p * ap).sum())
        if not pap > 0:
            info.update(iters=k, residual=1.0, negative_curvature=True)
            return torch.zeros_like(b), info
        alpha = rs / pap
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = float((r * r).sum())
        p = r + (rs_new / rs) * p
        rs = rs_new
        k += 1
    info["iters"], info["residual"] = k, math.sqrt(rs) / bn
    return x, info


class IBAUStep(TrainStep):
    """The outer step: the implicit hypergradient of ``CE(f(clip(x + delta)), y)`` into ``.grad``.

    ``delta`` is recomputed over ``data`` (the whole clean subset) at the start of every round of
    ``steps_per_round`` batches. ``hypergrad="cg"`` (default) solves the KKT system of the ball-constrained inner
    maximization by conjugate gradients on the sphere's tangent space (:func:`tangent_cg`);
    ``hypergrad="neumann"`` is the paper's fixed-point method on ``Phi = delta + eta grad_delta L`` (truncated
    Neumann series; it does not converge for ReLU networks, see the module docstring).
    """

    def __init__(self, data: ArrayDataset, eps: float, inner_steps: int, steps_per_round: int,
                 fixed_point_iters: int = 5, eta: float = 0.1, hypergrad: str = "cg", cg_iters: int = 20,
                 cg_tol: float = 1e-3, perturb_ratio: float = 1.0):
        super().__init__()
        self.data, self.eps, self.inner_steps = data, float(eps), int(inner_steps)
        self.steps_per_round, self.fixed_point_iters, self.eta = int(steps_per_round), int(fixed_point_iters), float(eta)
        self.hypergrad, self.cg_iters, self.cg_tol = hypergrad, int(cg_iters), float(cg_tol)
        self.perturb_ratio = float(perturb_ratio)
        self.delta: torch.Tensor | None = None
        #: the KKT multiplier of the current round's ``delta`` (0 inside the ball)
        self.mu = 0.0
        self.on_boundary = True
        self.deltas: list[torch.Tensor] = []
        #: per round: ``|P grad| / |grad|`` at ``delta`` over the clean subset (0 at an exact KKT point)
        self.kkt_residuals: list[float] = []
        self.mus: list[float] = []
        #: per outer step (``neumann``): ``|v_K| / |grad_delta L_out|`` - about ``K + 1`` when the fixed-point map's
        #: Jacobian has spectral radius ~1 (the Neumann series does not converge), far more when it is > 1
        self.neumann_growth: list[float] = []
        #: per outer step (``cg``): CG iterations, final relative residual, negative curvature met
        self.solver: list[dict[str, Any]] = []
        #: per outer step: ``|indirect term| / |direct term|`` of the hypergradient
        self.indirect_ratio: list[float] = []
        self._count = 0
        self._params: list[nn.Parameter] = []

    def setup(self, model: nn.Module, params: list[tuple[str, nn.Parameter]]) -> None:
        self._params = [p for _, p in params]
        self._count = 0

    def new_round(self, model: nn.Module) -> None:
        """The inner maximization over the whole clean subset, its KKT multiplier and residual."""
        delta, grad = universal_perturbation(unwrap(model), self.data.images, self.data.labels, self.eps,
                                             self.inner_steps, return_grad=True)
        self.delta = delta
        self.mu, res, self.on_boundary = kkt_multiplier(delta, grad, self.eps)
        self.deltas.append(delta.detach().cpu())
        self.kkt_residuals.append(res)
        self.mus.append(self.mu)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._count % self.steps_per_round == 0:
            self.new_round(model)
        self._count += 1
        assert self.delta is not None
        params = self._params
        d = self.delta.to(x.device).clone().requires_grad_(True)
        k = x.shape[0] if self.perturb_ratio >= 1 else max(1, int(round(self.perturb_ratio * x.shape[0])))
        # the batch is shuffled by fit: perturbing its first k images is a random choice of k
        mask = torch.zeros(x.shape[0], 1, 1, 1, device=x.device)
        mask[:k] = 1.0
        logits = model((x + mask * d).clamp(0, 1))
        loss_out = F.cross_entropy(logits, y)
        if not torch.isfinite(loss_out):
            raise FloatingPointError(f"loss is {float(loss_out)}")
        g_theta = torch.autograd.grad(loss_out, params, retain_graph=True, allow_unused=True)
        (g_delta,) = torch.autograd.grad(loss_out, d)
        # the inner loss on this batch (every image perturbed): its delta-gradient, with the graph kept for
        # Hessian-vector products in delta and the mixed term d/dtheta (grad_delta L_in . u)
        loss_in = F.cross_entropy(model((x + d).clamp(0, 1)), y)
        (gi,) = torch.autograd.grad(loss_in, d, create_graph=True)
        if self.hypergrad == "neumann":
            phi = d + self.eta * gi
            v = g_delta.clone()
            for _ in range(self.fixed_point_iters):
                (jv,) = torch.autograd.grad(phi, d, grad_outputs=v, retain_graph=True)
                v = jv + g_delta
            self.neumann_growth.append(float(v.norm() / g_delta.norm().clamp_min(1e-12)))
            indirect = torch.autograd.grad(phi, params, grad_outputs=v, allow_unused=True)
        else:
            def hvp(w: torch.Tensor) -> torch.Tensor:
                (hw,) = torch.autograd.grad(gi, d, grad_outputs=w, retain_graph=True)
                return hw.detach()

            u, info = tangent_cg(hvp, g_delta.detach(), self.delta.to(x.device) if self.on_boundary else None,
                                 self.mu, self.cg_iters, self.cg_tol)
            self.solver.append(info)
            indirect = torch.autograd.grad(gi, params, grad_outputs=u, allow_unused=True)
        dn = ind = 0.0
        for p, a, b in zip(params, g_theta, indirect):
            g = torch.zeros_like(p) if a is None else a.detach()
            dn += float((g * g).sum())
            if b is not None:
                g = g + b.detach()
                ind += float((b * b).sum())
            p.grad = g if p.grad is None else p.grad + g
        self.indirect_ratio.append(math.sqrt(ind) / max(math.sqrt(dn), 1e-12))
        return loss_out.detach(), logits.detach()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "eps": self.eps, "inner_steps": self.inner_steps, "hypergrad": self.hypergrad,
                "fixed_point_iters": self.fixed_point_iters, "eta": self.eta, "cg_iters": self.cg_iters,
                "cg_tol": self.cg_tol, "perturb_ratio": self.perturb_ratio}


@dataclass
class IBAUDetails(ResultDetails):
    """Rounds, the perturbation per round, the hypergradient's diagnostics, the clean subset's size and the guard."""

    rounds: int
    eps: float
    clean_samples: int
    delta_norms: list[float]
    holdout_samples: int = 0
    holdout_acc_before: float | None = None
    holdout_acc_after: float | None = None
    max_acc_drop: float | None = None
    collapsed: bool = False
    #: the largest ``|v_K| / |grad_delta L_out|`` over the outer steps (``hypergrad="neumann"`` only)
    neumann_growth_max: float | None = None
    hypergrad: str = "cg"
    #: per round: ``|P grad| / |grad|`` of the inner loss at ``delta`` (0 at an exact KKT point of the inner problem)
    kkt_residuals: list[float] | None = None
    #: per round: the KKT multiplier ``mu`` (``grad = mu delta`` on the sphere)
    kkt_multipliers: list[float] | None = None
    #: ``cg``: the most CG iterations any step used, the largest final relative residual, steps that met
    #: non-positive curvature (the indirect term then stops at the iterate reached)
    cg_iters_max: int | None = None
    cg_residual_max: float | None = None
    negative_curvature_steps: int = 0
    #: ``|indirect| / |direct|`` hypergradient terms: mean and max over the outer steps
    indirect_ratio_mean: float | None = None
    indirect_ratio_max: float | None = None


@REPAIRS.register("i_bau")
class IBAU(ModelRepair):
    """I-BAU (Zeng et al., ICLR 2022): adversarial unlearning of a universal perturbation with implicit hypergradients.

    Args:
        rounds: outer rounds (passes over the clean subset; a new ``delta`` each round).
        eps: L2 radius of the universal perturbation ([0, 1] pixel units).
        inner_steps: ascent steps of the inner maximization per round.
        hypergrad: ``"cg"`` (default): the KKT system of the ball-constrained inner problem, solved by conjugate
            gradients on the sphere's tangent space; ``"neumann"``: the paper's truncated fixed-point iteration on
            ``Phi = delta + eta grad_delta L`` (kept for comparison; it does not converge on ReLU networks).
        cg_iters, cg_tol: CG's iteration cap and relative-residual tolerance.
        fixed_point_iters, eta: the ``neumann`` method's iterations and fixed-point step.
        perturb_ratio: share of each batch that gets ``delta`` in the outer loss (1: the paper's objective;
            the reference code uses 0.01).
        lr: outer learning rate. optimizer: ``"adamw"`` (default; the paper's Adam, no weight decay by default) or
            ``"sgd"`` (momentum 0.9).
        batch_size, clean_ratio: the clean subset (class-balanced ``clean_ratio``, default 5%).
        freeze_bn: train with BatchNorm in eval mode (running statistics frozen), as the reference code does.
        max_acc_drop, holdout_ratio: the collapse guard (:mod:`robustkit.repair.guard`).
    """

    HYPERGRADS = ("cg", "neumann")

    def __init__(self, rounds: int = 5, eps: float = 2.5, inner_steps: int = 30, fixed_point_iters: int = 5,
                 eta: float = 0.1, lr: float = 3e-4, weight_decay: float = 0.0, batch_size: int = 32,
                 clean_ratio: float = 0.05, freeze_bn: bool = True, eval_every: int = 1, seed: int = 0, *,
                 hypergrad: str = "cg", cg_iters: int = 20, cg_tol: float = 1e-3, perturb_ratio: float = 1.0,
                 optimizer: str = "adamw", max_acc_drop: float = MAX_ACC_DROP, holdout_ratio: float = HOLDOUT_RATIO):
        for name, v in (("rounds", rounds), ("inner_steps", inner_steps), ("batch_size", batch_size),
                        ("cg_iters", cg_iters)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"{name} must be an integer >= 1, got {v!r}")
        if isinstance(fixed_point_iters, bool) or not isinstance(fixed_point_iters, int) or fixed_point_iters < 0:
            raise InputError(f"fixed_point_iters must be an integer >= 0, got {fixed_point_iters!r}")
        for name, v in (("eps", eps), ("eta", eta), ("lr", lr), ("cg_tol", cg_tol)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise InputError(f"{name} must be a finite number > 0, got {v!r}")
        if hypergrad not in self.HYPERGRADS:
            raise InputError(f"hypergrad must be one of {self.HYPERGRADS}, got {hypergrad!r}")
        if not 0 < clean_ratio <= 1:
            raise InputError(f"clean_ratio must be in (0, 1], got {clean_ratio!r}")
        if optimizer not in ("adamw", "sgd"):
            raise InputError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}")
        if isinstance(perturb_ratio, bool) or not isinstance(perturb_ratio, (int, float)) or not 0 < perturb_ratio <= 1:
            raise InputError(f"perturb_ratio must be in (0, 1], got {perturb_ratio!r}")
        self.rounds, self.eps, self.inner_steps, self.fixed_point_iters = rounds, float(eps), inner_steps, fixed_point_iters
        self.eta, self.lr, self.weight_decay, self.batch_size = float(eta), float(lr), float(weight_decay), batch_size
        self.clean_ratio, self.eval_every, self.seed = float(clean_ratio), int(eval_every), int(seed)
        self.freeze_bn = bool(freeze_bn)
        self.hypergrad, self.cg_iters, self.cg_tol = hypergrad, cg_iters, float(cg_tol)
        self.perturb_ratio, self.optimizer = float(perturb_ratio), optimizer
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
        step = IBAUStep(split.train, self.eps, self.inner_steps, steps, self.fixed_point_iters, self.eta,
                        self.hypergrad, self.cg_iters, self.cg_tol, self.perturb_ratio)
        measure = backdoor_monitor(test_data, backdoor, num_classes)
        callbacks = [Monitor(measure, self.eval_every, self.rounds)] if measure is not None else []
        history = fit(net, split.train, step, epochs=self.rounds, lr=self.lr, batch_size=self.batch_size,
                      optimizer=self.optimizer, weight_decay=self.weight_decay, schedule="constant", callbacks=callbacks,
                      train_mode=(lambda m: m.eval()) if self.freeze_bn else None,
                      seed=self.seed, progress=progress, desc="I-BAU")
        check = check_collapse("IBAU", acc_before, net, split.holdout, self.max_acc_drop)
        ratios = step.indirect_ratio
        details = IBAUDetails(
            self.rounds, self.eps, len(split.train), [float(d.norm()) for d in step.deltas],
            check.samples, check.acc_before, check.acc_after, self.max_acc_drop, check.collapsed,
            max(step.neumann_growth, default=None), self.hypergrad, list(step.kkt_residuals), list(step.mus),
            max((s["iters"] for s in step.solver), default=None),
            max((s["residual"] for s in step.solver), default=None),
            sum(bool(s["negative_curvature"]) for s in step.solver),
            sum(ratios) / len(ratios) if ratios else None, max(ratios, default=None))
        return RepairResult(net, history, details, collapsed=check.collapsed)

    def __repr__(self) -> str:
        keys = ("rounds", "eps", "inner_steps", "hypergrad", "perturb_ratio", "freeze_bn", "lr", "clean_ratio")
        return f"{type(self).__name__}(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in keys) + ")"
