"""Look inside a classifier by block type: its classification head, its attention layers and its
residual (skip) connections, with hooks that scale skip connections.

Skip connections (used by skip-connection suppression, Yang et al. ICASSP 2023): a residual block
computes ``out = F(x) + shortcut(x)``; :func:`scale_skips` makes it ``F(x) + gamma * shortcut(x)``
with forward hooks - the model's code and weights are untouched:

- robustkit ``PreActBlock`` (PreActResNet18): the output of ``block.shortcut`` is scaled.
- torchvision ``BasicBlock`` / ``Bottleneck``: ``block.downsample``'s output is scaled when it
  exists; otherwise the identity is captured at the block input and ``(1 - gamma) x`` is
  subtracted from the residual branch's last BatchNorm output (so the sum is ``F(x) + gamma x``
  before the final ReLU).
- ViT blocks (robustkit ``SmallViT`` and timm ``VisionTransformer``): each block has two
  residual branches, ``x + attn(norm1(x))`` and ``x + mlp(norm2(x))``; the branch output gets
  ``(1 - gamma) x`` subtracted, with ``x`` captured at ``norm1`` / ``norm2``'s input. They are
  named ``blocks.i.attn`` and ``blocks.i.mlp``.

:func:`scale_skips` returns a handle whose ``remove()`` takes every hook away again; the
scales are recorded in ``model.skip_scaling`` so that a saved checkpoint re-applies them.
This module never imports the defenses that use it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import InputError


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


def attention_layers(model: nn.Module) -> list[tuple[str, nn.Module, nn.Module | None]]:
    """``(name, module to hook, timm attention or None)`` for every attention layer, in forward order.

    Supports robustkit's ``SmallViT`` (hooks on ``blocks[i].attn``, whose output holds the map)
    and timm Vision Transformers (hooks on ``blocks[i].attn.qkv``; the map is recomputed from
    q and k, so fused attention needs no change). Raises :class:`InputError` otherwise.
    """
    from .vit import Attention as RkAttention

    layers: list[tuple[str, nn.Module, nn.Module | None]] = []
    for name, m in model.named_modules():
        if isinstance(m, RkAttention):
            layers.append((name, m, None))
        elif (type(m).__name__ == "Attention" and type(m).__module__.startswith("timm.")
              and isinstance(getattr(m, "qkv", None), nn.Linear) and hasattr(m, "num_heads")):
            layers.append((name, m.qkv, m))
    if not layers:
        raise InputError(
            f"{type(model).__name__} has no attention layers: the attention-entropy filter needs a Vision "
            "Transformer (robustkit small_vit or a timm VisionTransformer); use activation_clustering or "
            "spectral_signatures for other classifiers"
        )
    return layers


@dataclass
class SkipConnection:
    """One skip connection: where its hooks go and which stage encloses it."""

    name: str            # e.g. "layer3.1" or "blocks.2.attn"
    stage: str           # module name fine-tuned after suppression, e.g. "layer3" or "blocks.2"
    kind: str            # "scale" (shortcut module output * gamma) or "subtract" (branch - (1-gamma) x)
    target: nn.Module    # module whose output is changed
    source: nn.Module | None = None  # module whose *input* is the skip tensor x ("subtract" only)


def _parent(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def find_skip_connections(model: nn.Module) -> list[SkipConnection]:
    """Every skip connection robustkit can scale in ``model``, in forward order.

    Raises :class:`InputError` when there is none (e.g. a plain CNN without residual blocks).
    """
    from .preact_resnet import PreActBlock
    from .vit import Block as SmallViTBlock

    tv_blocks: tuple[type, ...] = ()
    try:
        from torchvision.models.resnet import BasicBlock, Bottleneck

        tv_blocks = (BasicBlock, Bottleneck)
    except ImportError:  # pragma: no cover - torchvision is a dependency
        pass
    timm_block: tuple[type, ...] = ()
    try:
        import warnings

        with warnings.catch_warnings():  # timm's import trips torch's torch.jit.interface deprecation
            warnings.simplefilter("ignore", FutureWarning)
            from timm.models.vision_transformer import Block as TimmBlock

        timm_block = (TimmBlock,)
    except ImportError:  # pragma: no cover - timm is optional
        pass

    found: list[SkipConnection] = []
    for name, m in model.named_modules():
        if isinstance(m, PreActBlock):
            found.append(SkipConnection(name, _parent(name), "scale", m.shortcut))
        elif tv_blocks and isinstance(m, tv_blocks):
            if m.downsample is not None:
                found.append(SkipConnection(name, _parent(name), "scale", m.downsample))
            else:
                last_bn = m.bn3 if hasattr(m, "bn3") else m.bn2
                found.append(SkipConnection(name, _parent(name), "subtract", last_bn, m))
        elif isinstance(m, SmallViTBlock):
            found.append(SkipConnection(f"{name}.attn", name, "subtract", m.attn, m.norm1))
            found.append(SkipConnection(f"{name}.mlp", name, "subtract", m.mlp, m.norm2))
        elif timm_block and isinstance(m, timm_block):
            found.append(SkipConnection(f"{name}.attn", name, "subtract", m.ls1, m.norm1))
            found.append(SkipConnection(f"{name}.mlp", name, "subtract", m.ls2, m.norm2))
    if not found:
        raise InputError(
            f"{type(model).__name__} has no residual blocks to suppress: skip-connection suppression needs "
            "PreActResNet blocks, torchvision ResNet blocks (BasicBlock / Bottleneck) or ViT blocks "
            "(robustkit small_vit, timm VisionTransformer)"
        )
    return found


class _ScaleOutput:
    """Forward hook: ``output * gamma``."""

    def __init__(self, gamma: float):
        self.gamma = gamma

    def __call__(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        return output * self.gamma


class _CaptureInput:
    """Forward pre-hook: remember the module's first input (the skip tensor)."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple) -> None:
        self.value = args[0]


class _SubtractSkip:
    """Forward hook on a residual branch: ``branch - (1 - gamma) * x`` with ``x`` from a capture."""

    def __init__(self, gamma: float, capture: _CaptureInput):
        self.gamma, self.capture = gamma, capture

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        x = self.capture.value
        if x is None:
            raise RuntimeError("skip-connection hook fired before its input was captured")
        self.capture.value = None
        if isinstance(output, tuple):  # robustkit attention returns (out, attention map)
            return (output[0] - (1.0 - self.gamma) * x, *output[1:])
        return output - (1.0 - self.gamma) * x


class SkipScaling:
    """Handle of the hooks placed by :func:`scale_skips`; ``remove()`` restores the model."""

    def __init__(self, model: nn.Module, gammas: dict[str, float], handles: list):
        self.model, self.gammas, self._handles = model, dict(gammas), handles

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        current = dict(getattr(self.model, "skip_scaling", {}) or {})
        for k in self.gammas:
            current.pop(k, None)
        if current:
            self.model.skip_scaling = current  # type: ignore[assignment]
        elif "skip_scaling" in self.model.__dict__:
            del self.model.skip_scaling

    def __enter__(self) -> "SkipScaling":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def scale_skips(model: nn.Module, gammas: dict[str, float]) -> SkipScaling:
    """Scale the named skip connections (``{name: gamma}``) of ``model`` with forward hooks.

    Names are those of :func:`find_skip_connections` (``model.skip_scaling`` records them).
    Use the returned handle's ``remove()`` (or ``with scale_skips(...):``) to undo.
    """
    skips = {s.name: s for s in find_skip_connections(model)}
    already = set(getattr(model, "skip_scaling", {}) or {})
    handles = []
    for name, gamma in gammas.items():
        if name not in skips:
            raise InputError(f"no skip connection named {name!r}; known: {', '.join(skips)}")
        if name in already:
            raise InputError(f"skip connection {name!r} is already scaled; remove the first scaling before adding another")
        g = float(gamma)
        if not (0.0 <= g <= 1.0) or math.isnan(g):
            raise InputError(f"gamma for {name!r} must be in [0, 1], got {gamma!r}")
        s = skips[name]
        if s.kind == "scale":
            handles.append(s.target.register_forward_hook(_ScaleOutput(g)))
        else:
            cap = _CaptureInput()
            handles.append(s.source.register_forward_pre_hook(cap))  # type: ignore[union-attr]
            handles.append(s.target.register_forward_hook(_SubtractSkip(g, cap)))
    model.skip_scaling = {**(getattr(model, "skip_scaling", {}) or {}), **{k: float(v) for k, v in gammas.items()}}  # type: ignore[assignment]
    return SkipScaling(model, gammas, handles)
