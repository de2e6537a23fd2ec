"""Batch data augmentation on tensors: random crop of the zero-padded image, optional horizontal flip.

This is the training transform of the backdoor-defense literature's fine-tuning: BackdoorBench's
``get_transform(train=True)`` (which its FT-SAM, vanilla fine-tuning and NAD code use on the
defender's clean data) is ``RandomCrop(H, padding=4)`` on 32x32 images, plus
``RandomHorizontalFlip`` on CIFAR-10 only (not on MNIST or GTSRB, where a mirror image is another
symbol). Here it runs on a batch of tensors, on whatever device the batch is on, every sample with
its own offsets and flip.

- :func:`crop_flip`: the deterministic map, given per-sample offsets and flips.
- :class:`CropFlip`: draws the offsets / flips from a ``torch.Generator`` and applies them.
- :func:`make_augment`: ``"crop"`` / ``"crop_flip"`` / ``None`` from configs to a :class:`CropFlip`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..errors import InputError

AUGMENTS = ("crop", "crop_flip")
#: Added to a run's seed for the generator of its augmentation draws (kept apart from its shuffling stream).
AUGMENT_SEED_OFFSET = 7919


def default_padding(size: int) -> int:
    """``max(1, round(size / 8))``: BackdoorBench's 4 pixels at 32x32, scaled with the image (2 at 16x16)."""
    return max(1, int(round(size / 8)))


def _check_batch(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise InputError(f"expected a tensor batch, got {type(x).__name__}")
    if x.dim() != 4:
        raise InputError(f"expected a batch N x C x H x W, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise InputError(f"expected a floating-point batch, got {x.dtype}")


def crop_flip(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor, padding: int) -> torch.Tensor:
    """Sample ``i`` of the output is the H x W window at ``(dy[i], dx[i])`` of ``x[i]`` zero-padded by
    ``padding`` on every side, mirrored left-right where ``flip[i]``; offsets lie in ``[0, 2 padding]``
    (``dy = dx = padding`` and no flip is the identity)."""
    _check_batch(x)
    n, _, h, w = x.shape
    if not (dy.shape == dx.shape == flip.shape == (n,)):
        raise InputError(f"dy, dx and flip need one entry per sample ({n}), got {tuple(dy.shape)}, "
                         f"{tuple(dx.shape)}, {tuple(flip.shape)}")
    if padding < 0:
        raise InputError(f"padding must be >= 0, got {padding}")
    if n == 0:
        return x.clone()
    dy, dx, flip = dy.to(x.device, torch.long), dx.to(x.device, torch.long), flip.to(x.device, torch.bool)
    if int(dy.min()) < 0 or int(dx.min()) < 0 or int(dy.max()) > 2 * padding or int(dx.max()) > 2 * padding:
        raise InputError(f"offsets must lie in [0, {2 * padding}]")
    xp = F.pad(x, (padding, padding, padding, padding)) if padding else x
    rows = dy[:, None] + torch.arange(h, device=x.device)  # N x H
    cols = dx[:, None] + torch.arange(w, device=x.device)  # N x W
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    idx = torch.arange(n, device=x.device)[:, None, None, None]
    ch = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return xp[idx, ch, rows[:, None, :, None], cols[:, None, None, :]]


class CropFlip:
    """Random crop (zero padding ``padding``) and, with ``flip``, a horizontal flip with probability 1/2.

    ``aug(x, generator, start=0, total=None)``: the offsets and flips are drawn on the CPU from
    ``generator`` for ``total`` samples (default ``len(x)``) and samples ``start .. start + len(x)``
    of them are applied; :func:`robustkit.training.fit` passes the global batch under
    ``torch.distributed``, so every process consumes the same random stream and the run equals the
    single-process one.
    """

    def __init__(self, padding: int, flip: bool = True):
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise InputError(f"padding must be an integer >= 0, got {padding!r}")
        self.padding, self.flip = padding, bool(flip)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None, start: int = 0,
                 total: int | None = None) -> torch.Tensor:
        _check_batch(x)
        n = x.shape[0]
        total = n if total is None else int(total)
        if start < 0 or start + n > total:
            raise InputError(f"samples {start}..{start + n} are not inside a batch of {total}")
        offsets = torch.randint(0, 2 * self.padding + 1, (2, total), generator=generator)
        flips = (torch.rand(total, generator=generator) < 0.5) if self.flip else torch.zeros(total, dtype=torch.bool)
        sl = slice(start, start + n)
        return crop_flip(x, offsets[0, sl], offsets[1, sl], flips[sl], self.padding)

    def describe(self) -> str:
        return f"random crop (zero padding {self.padding})" + (" + horizontal flip" if self.flip else "")

    def __repr__(self) -> str:
        return f"CropFlip(padding={self.padding}, flip={self.flip})"


def check_augment(spec: str | None) -> str | None:
    """The augmentation's name, ``None`` for none (``None`` or ``"none"``); :class:`InputError` if unknown."""
    if spec is None or spec == "none":
        return None
    if spec not in AUGMENTS:
        raise InputError(f"augment must be one of {', '.join(AUGMENTS)} or None, got {spec!r}")
    return spec


def check_padding(padding: int | None) -> int | None:
    """``padding`` if it is ``None`` (:func:`default_padding`) or an integer >= 0; :class:`InputError` otherwise."""
    if padding is not None and (isinstance(padding, bool) or not isinstance(padding, int) or padding < 0):
        raise InputError(f"crop_padding must be an integer >= 0 or None, got {padding!r}")
    return padding


def make_augment(spec: str | None, image_size: int, padding: int | None = None) -> CropFlip | None:
    """``None`` / ``"none"``: no augmentation; ``"crop"``: :class:`CropFlip` without flip; ``"crop_flip"``: with it.
    ``padding=None`` takes :func:`default_padding` of ``image_size`` (the smaller side)."""
    spec = check_augment(spec)
    if spec is None:
        return None
    pad = default_padding(image_size) if padding is None else padding
    return CropFlip(pad, flip=spec == "crop_flip")


def augment_for(spec: str | None, data: Any, padding: int | None = None) -> CropFlip | None:
    """:func:`make_augment` sized for ``data``: the padding scales with the smaller spatial side of its
    first sample, which must be an image tensor C x H x W (:class:`InputError` otherwise)."""
    spec = check_augment(spec)
    if spec is None:
        return None
    x = data[0][0]
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise InputError(f"augment={spec!r} crops image samples C x H x W, got "
                         f"{getattr(x, 'shape', type(x).__name__)}; pass augment=None for other data")
    return make_augment(spec, int(min(x.shape[-2:])), padding)
