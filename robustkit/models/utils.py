"""Small helpers shared by defenses that need to look inside a classifier."""

from __future__ import annotations

from torch import nn


def get_classifier(model: nn.Module) -> nn.Module:
    """The last (classification) layer of ``model``.

    Uses the model's ``get_classifier()`` (robustkit and timm models), else an attribute
    named ``classifier``, ``linear``, ``head`` or ``fc``, else the last ``nn.Linear`` found
    (e.g. inside the ``nn.Sequential(Normalize, net)`` that :func:`torchvision_model` returns).
    """
    getter = getattr(model, "get_classifier", None)
    if callable(getter):
        layer = getter()
        if isinstance(layer, nn.Module):
            return layer
    for attr in ("classifier", "linear", "head", "fc"):
        layer = getattr(model, attr, None)
        if isinstance(layer, nn.Linear):
            return layer
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise TypeError(f"{type(model).__name__} has no nn.Linear classification layer")
    return linears[-1]


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
