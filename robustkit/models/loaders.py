"""Checkpoints (atomic save, strict load) and torchvision architectures with normalization inside."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, DataNotFoundError, InputError
from ..io import atomic_torch_save
from ..registry import MODELS
from .normalization import Normalize

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _registry_name(model: nn.Module) -> str | None:
    return getattr(type(model), "registry_name", None)


def save_checkpoint(model: nn.Module, path: str | Path, name: str | None = None, kwargs: dict[str, Any] | None = None, **meta: Any) -> Path:
    """Write ``{name, kwargs, state_dict, meta}`` atomically so ``load_checkpoint`` can rebuild the model."""
    import robustkit

    name = name or _registry_name(model)
    if name is None or name not in MODELS:
        raise InputError(f"cannot tell which registered model this is ({type(model).__name__}); pass name=")
    kwargs = dict(kwargs if kwargs is not None else getattr(model, "config", {}) or {})
    blob = {
        "name": name,
        "kwargs": kwargs,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": meta,
        "robustkit_version": robustkit.__version__,
    }
    return atomic_torch_save(blob, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved by :func:`save_checkpoint` (strict state-dict load, eval mode)."""
    p = Path(path)
    if not p.is_file():
        raise DataNotFoundError(f"checkpoint not found: {p}")
    try:
        blob = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as exc:  # pickle errors, zip errors, truncated files
        raise InputError(f"{p} is not a readable torch checkpoint: {exc}") from None
    if not isinstance(blob, dict) or not {"name", "kwargs", "state_dict"} <= set(blob):
        keys = sorted(blob)[:10] if isinstance(blob, dict) else type(blob).__name__
        raise InputError(f"{p} is not a robustkit checkpoint (expected keys name, kwargs, state_dict; found {keys})")
    model = MODELS.build({"name": blob["name"], **blob["kwargs"]}, "checkpoint")
    result = model.load_state_dict(blob["state_dict"], strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise InputError(
            f"{p} does not match model {blob['name']!r}: missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    return model.to(map_location).eval()


@MODELS.register("torchvision")
def torchvision_model(name: str, num_classes: int | None = None, weights_path: str | None = None, in_channels: int = 3) -> nn.Module:
    """A torchvision architecture by name (e.g. ``resnet18``) behind ImageNet normalization.

    Weights are only read from ``weights_path`` (a state dict of the bare torchvision model);
    nothing is downloaded.
    """
    import torchvision

    if in_channels != 3:
        raise ConfigError(f"torchvision models take 3-channel images, got in_channels={in_channels}", "in_channels")
    try:
        builder = torchvision.models.get_model_builder(name)
    except ValueError:
        known = ", ".join(sorted(torchvision.models.list_models(module=torchvision.models))[:20])
        raise ConfigError(f"unknown torchvision model {name!r}; e.g. {known}, ...", "name") from None
    kwargs = {"weights": None}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    net = builder(**kwargs)
    if weights_path is not None:
        wp = Path(weights_path)
        if not wp.is_file():
            raise DataNotFoundError(f"weights file not found: {wp} (robustkit never downloads weights)")
        state = torch.load(wp, map_location="cpu", weights_only=True)
        net.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
    return nn.Sequential(Normalize(IMAGENET_MEAN, IMAGENET_STD), net)
