"""``wrap(model, *preprocessors)``: a defended classifier taking [0, 1] images."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from .errors import InputError
from .registry import PREPROCESSORS, Spec
from .validation import check_images


class Defended(nn.Module):
    """Preprocessors, then the model. Takes N x C x H x W images in [0, 1].

    ``randomized`` / ``differentiable`` summarize the preprocessors so evaluators can
    choose EOT or BPDA. ``check_input`` validates shape, dtype and range on every call
    (one min/max reduction; disable it for the last few percent of throughput).
    """

    def __init__(self, model: nn.Module, preprocessors: Iterable[nn.Module] = (), check_input: bool = True):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        pre = list(preprocessors)
        for i, p in enumerate(pre):
            if not isinstance(p, nn.Module):
                raise InputError(f"preprocessor {i} must be an nn.Module (or a registered name), got {type(p).__name__}")
        self.preprocess = nn.Sequential(*pre)
        self.model = model
        self.check_input = check_input
        # the wrapper takes the model's mode; its children keep their own (wrapping changes nothing)
        self.training = model.training

    @property
    def randomized(self) -> bool:
        return any(getattr(p, "randomized", False) for p in self.preprocess)

    @property
    def differentiable(self) -> bool:
        return all(getattr(p, "differentiable", True) for p in self.preprocess)

    @property
    def preprocessors(self) -> list[nn.Module]:
        return list(self.preprocess)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.check_input:
            check_images(x, "input")
        return self.model(self.preprocess(x))


def build_preprocessor(spec: Spec | nn.Module, path: str | None = None) -> nn.Module:
    """A module as is, or a registered preprocessor built from a name / mapping."""
    if isinstance(spec, nn.Module):
        return spec
    return PREPROCESSORS.build(spec, path)


def wrap(model: nn.Module, *preprocessors: Spec | nn.Module, check_input: bool = True, **kwargs: Any) -> Defended:
    """Put preprocessors in front of ``model``.

    Each preprocessor is an ``nn.Module`` or a registered name / ``{"name": ..., ...}``
    mapping, e.g. ``wrap(net, "noise_bilateral")`` or
    ``wrap(net, GaussianNoise(0.05), {"name": "bilateral", "kernel_size": 5})``.
    Wrapping a :class:`Defended` again keeps one flat wrapper with
    ``wrap(wrap(m, a), b)(x) == m(a(b(x)))``: the new preprocessors run first.
    """
    if kwargs:
        raise InputError(f"unknown keyword argument(s) to wrap: {', '.join(kwargs)}")
    built = [build_preprocessor(p, f"preprocessors[{i}]") for i, p in enumerate(preprocessors)]
    if isinstance(model, Defended):
        return Defended(model.model, [*built, *model.preprocess], check_input=check_input)
    return Defended(model, built, check_input=check_input)
