"""Backdoor *detectors*: the ``InputDetector`` interface (inference-time detection of triggered
inputs, e.g. STRIP), the ``ModelScanner`` interface (is this model backdoored, and towards which
label, e.g. Neural Cleanse's detection), the ``DetectorGuard`` that puts an input detector in front
of a model, and the ``DETECTORS`` registry that the ``detect`` pipeline step and ``robustkit list
detectors`` read (declared in :mod:`robustkit.registry` with the other registries and
re-exported here).
"""

from __future__ import annotations

import abc
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ..base import ResultDetails
from ..errors import InputError
from ..registry import DETECTORS


class InputDetector(abc.ABC):
    """An inference-time detector of backdoor-triggered inputs.

    ``fit(model, clean_data)`` calibrates it (returns ``self``); ``detect(x)`` returns
    ``(flags, scores)`` (a bool mask and per-input scores); ``wrap(model)`` puts it in front of the model.
    """

    model: nn.Module | None = None

    @abc.abstractmethod
    def fit(self, model: nn.Module, clean_data: Dataset) -> InputDetector:
        """Calibrate on the defender's clean data."""

    @abc.abstractmethod
    def detect(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(flags, scores)`` for a batch of images (flags True = suspected triggered)."""

    def wrap(self, model: nn.Module | None = None, mode: str = "flag") -> DetectorGuard:
        """An ``nn.Module`` flagging or rejecting suspicious inputs in front of ``model`` (default: the fitted one)."""
        if model is None and self.model is None:
            raise InputError(f"{type(self).__name__} is not fitted: call fit(model, clean_data) first or pass the model")
        return DetectorGuard(model if model is not None else self.model, self, mode)  # type: ignore[arg-type]

    def evaluate(self, clean: torch.Tensor, triggered: torch.Tensor) -> dict[str, float]:
        """``{tpr, fpr}``: the flagged fractions of ``triggered`` and of ``clean`` inputs."""
        f_clean, _ = self.detect(clean)
        f_trig, _ = self.detect(triggered)
        return {"tpr": float(f_trig.float().mean()), "fpr": float(f_clean.float().mean()),
                "n_clean": int(f_clean.numel()), "n_triggered": int(f_trig.numel())}


class ModelScanner(abc.ABC):
    """A detector that scans a *model* (not inputs): ``scan(model, clean_data)`` -> typed details
    with at least ``target`` (the detected target label, or ``None`` when the model looks clean)
    and ``flagged`` (every suspicious label)."""

    @abc.abstractmethod
    def scan(self, model: nn.Module, clean_data: Dataset, num_classes: int | None = None,
             progress: bool = True) -> ResultDetails:
        """Scan ``model`` with the defender's clean data; the model is not changed."""


class DetectorGuard(nn.Module):
    """``model`` behind an :class:`InputDetector`.

    ``mode="flag"``: returns the model's logits; ``last_flags`` holds the detector's flags for the
    last batch. ``mode="reject"``: returns N x (K + 1) logits whose extra last column ("rejected")
    is the largest for flagged inputs and the smallest for the others, so ``argmax`` gives ``K``
    exactly for the rejected ones and the model's prediction otherwise.
    """

    def __init__(self, model: nn.Module, detector: InputDetector, mode: str = "flag"):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise InputError(f"model must be an nn.Module, got {type(model).__name__}")
        if mode not in ("flag", "reject"):
            raise InputError(f"mode must be 'flag' or 'reject', got {mode!r}")
        self.model, self.detector, self.mode = model, detector, mode
        self.last_flags: torch.Tensor | None = None
        self.training = model.training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flags, _ = self.detector.detect(x)
        self.last_flags = flags
        logits = self.model(x)
        if self.mode == "flag":
            return logits
        f = flags.to(logits.device)
        extra = torch.where(f, logits.max(1).values + 1.0, logits.min(1).values - 1.0)
        return torch.cat([logits, extra.unsqueeze(1)], 1)


def detection_rates(flags_clean: torch.Tensor, flags_triggered: torch.Tensor) -> dict[str, Any]:
    """TPR (flagged share of triggered inputs) and FPR (flagged share of clean inputs)."""
    if flags_clean.numel() == 0 or flags_triggered.numel() == 0:
        raise InputError("detection rates need at least one clean and one triggered input")
    return {"tpr": float(flags_triggered.float().mean()), "fpr": float(flags_clean.float().mean()),
            "n_clean": int(flags_clean.numel()), "n_triggered": int(flags_triggered.numel())}
