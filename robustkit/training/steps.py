"""Per-batch training steps for :func:`robustkit.training.fit`.

A step computes the loss of one batch and leaves the gradients in ``.grad``; the loop then
applies the optimizer and the schedule. ``fit`` is the same for every kind of training; the
step is what differs:

- :class:`PlainStep`: cross-entropy (optionally on preprocessed inputs, e.g. noise + bilateral).
- :class:`SAMStep`: (adaptive) sharpness-aware minimization, the update FT-SAM uses.
- :class:`~robustkit.training.adversarial.PGDATStep`, :class:`~robustkit.training.adversarial.TRADESStep`:
  adversarial training with the preprocessor in the loop (:mod:`robustkit.training.adversarial`).

The model a step receives may be wrapped in ``DistributedDataParallel`` (multi-process
training); a step that runs extra forward passes without a backward (an attack) should run
them on :func:`~robustkit.training.adversarial.unwrap` ``(model)``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from .sam import AdaptiveSAM, frozen_bn_stats


class TrainStep:
    """Base of per-batch steps: ``step(model, x, y) -> (loss, logits)`` with gradients accumulated.

    ``setup(model, params)`` is called once by :func:`fit` with the named trainable parameters.
    """

    def __init__(self, label_smoothing: float = 0.0):
        if not 0 <= label_smoothing < 1:
            raise InputError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        self.label_smoothing = float(label_smoothing)

    #: ``(start, stop, total)``: this process's slice of the global batch, set by :func:`fit` before
    #: each batch under ``torch.distributed`` (``None``: the whole batch is in this process).
    shard: tuple[int, int, int] | None = None

    def set_seed(self, seed: int) -> None:
        """Called by :func:`fit` with its ``seed`` before :meth:`setup` (steps with their own randomness use it)."""

    def setup(self, model: nn.Module, params: list[tuple[str, nn.Parameter]]) -> None:
        """Called once before the first batch (default: nothing)."""

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """The step's settings, for histories and reports."""
        return {"step": type(self).__name__, "label_smoothing": self.label_smoothing}


def _check_finite(loss: torch.Tensor) -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss is {float(loss)}")


class PlainStep(TrainStep):
    """Cross-entropy on ``model(preprocess(x))``; ``preprocess`` runs without gradient (a train-time defense)."""

    def __init__(self, label_smoothing: float = 0.0, preprocess: nn.Module | None = None):
        super().__init__(label_smoothing)
        self.preprocess = preprocess

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.preprocess is not None:
            self.preprocess.train(model.training)
            with torch.no_grad():
                x = self.preprocess(x)
        logits = model(x)
        loss = self.loss(logits, y)
        _check_finite(loss)
        loss.backward()
        return loss.detach(), logits.detach()


class SAMStep(TrainStep):
    """Two passes: gradient at ``w``, move to ``w + eps`` (ASAM when ``adaptive``), gradient there, move back.

    BatchNorm running statistics are not updated on the perturbed pass (momentum 0), as in FT-SAM.
    """

    def __init__(self, rho: float = 2.0, eta: float = 0.01, adaptive: bool = True, label_smoothing: float = 0.0):
        super().__init__(label_smoothing)
        AdaptiveSAM([], rho, eta, adaptive)  # validates rho / eta
        self.rho, self.eta, self.adaptive = float(rho), float(eta), bool(adaptive)
        self.sam: AdaptiveSAM | None = None

    def setup(self, model: nn.Module, params: list[tuple[str, nn.Parameter]]) -> None:
        self.sam = AdaptiveSAM(params, self.rho, self.eta, self.adaptive)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.sam is None:
            raise RuntimeError("SAMStep.setup() was not called (use it through robustkit.training.fit)")
        logits = model(x)
        loss = self.loss(logits, y)
        _check_finite(loss)
        loss.backward()
        self.sam.perturb()
        for _, p in self.sam.params:
            p.grad = None
        with frozen_bn_stats(model):
            self.loss(model(x), y).backward()
        self.sam.restore()
        return loss.detach(), logits.detach()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "rho": self.rho, "eta": self.eta, "adaptive": self.adaptive}
