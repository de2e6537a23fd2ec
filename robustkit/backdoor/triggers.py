"""Backdoor triggers (``BackdoorAttack`` plug-ins) and poisoned datasets with ground truth.

- BadNets: Gu, Dolan-Gavitt, Garg, "BadNets: Identifying Vulnerabilities in the Machine
  Learning Model Supply Chain", 2017 - a small patch stamped on the image.
- Blended: Chen, Liu, Li, Lu, Song, "Targeted Backdoor Attacks on Deep Learning Systems Using
  Data Poisoning", 2017 - ``(1 - alpha) x + alpha * pattern``.
- SIG: Barni, Kallas, Tondi, "A New Backdoor Attack in CNNs by Training Set Corruption Without
  Label Poisoning", ICIP 2019 - a horizontal sinusoid added to target-class images only
  (clean label).
- WaNet: Nguyen, Tran, "WaNet - Imperceptible Warping-based Backdoor Attack", ICLR 2021 - a
  smooth random warp; "noise mode" adds randomly perturbed warps with unchanged labels.

Defaults follow BackdoorBench (see ../shared/REFERENCES.md section 6).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import numpy as np

import torch
import torch.nn.functional as F

from ..base import BackdoorAttack
from ..errors import InputError
from ..registry import BACKDOORS
from ..validation import check_images

CORNERS = ("bottom-right", "bottom-left", "top-right", "top-left")


def _number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise InputError(f"{name} must be finite, got {value!r}")
    return v


def _check_unit(value: object, name: str, lo: float = 0.0, hi: float = 1.0) -> float:
    v = _number(value, name)
    if not lo <= v <= hi:
        raise InputError(f"{name} must be in [{lo}, {hi}], got {value!r}")
    return v


def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise InputError(f"{name} must be true or false, got {value!r}")
    return value


def _check_target(target: object, all_to_all: object) -> None:
    _check_int(target, "target", 0)
    _check_bool(all_to_all, "all_to_all")


@BACKDOORS.register("badnets")
class BadNets(BackdoorAttack):
    """A ``size`` x ``size`` patch (white, black or checkerboard) at a corner or a given (row, col).

    Args:
        target: attacker's label (all-to-one) - or ``all_to_all=True`` for y -> (y + 1) mod K.
        size: patch side in pixels (BackdoorBench: 3 on 32x32 CIFAR-10).
        position: a corner name or ``[row, col]`` of the patch's top-left pixel.
        pattern: ``"white"``, ``"black"`` or ``"checkerboard"``.
        margin: pixels between the patch and the image border when ``position`` is a corner.
    """

    def __init__(self, target: int = 0, size: int = 3, position: str | Sequence[int] = "bottom-right",
                 pattern: str = "white", margin: int = 0, all_to_all: bool = False):
        _check_target(target, all_to_all)
        super().__init__(int(target), all_to_all)
        size = _check_int(size, "size", 1)
        margin = _check_int(margin, "margin", 0)
        if pattern not in ("white", "black", "checkerboard"):
            raise InputError(f"pattern must be 'white', 'black' or 'checkerboard', got {pattern!r}")
        if isinstance(position, str):
            if position not in CORNERS:
                raise InputError(f"position must be one of {CORNERS} or [row, col], got {position!r}")
        else:
            if not isinstance(position, (list, tuple)) or len(position) != 2 or any(
                isinstance(p, bool) or not isinstance(p, numbers.Integral) or p < 0 for p in position
            ):
                raise InputError(f"position must be a corner name or [row, col] with integers >= 0, got {position!r}")
            position = [int(p) for p in position]
        self.size, self.position, self.pattern, self.margin = size, position, pattern, margin

    def _origin(self, h: int, w: int) -> tuple[int, int]:
        s, m = self.size, self.margin
        if isinstance(self.position, str):
            row = h - s - m if self.position.startswith("bottom") else m
            col = w - s - m if self.position.endswith("right") else m
        else:
            row, col = int(self.position[0]), int(self.position[1])
        if row < 0 or col < 0 or row + s > h or col + s > w:
            raise InputError(f"a {s}x{s} patch at ({row}, {col}) does not fit a {h}x{w} image")
        return row, col

    def patch(self, channels: int, dtype=torch.float32, device=None) -> torch.Tensor:
        s = self.size
        if self.pattern == "white":
            p = torch.ones(s, s)
        elif self.pattern == "black":
            p = torch.zeros(s, s)
        else:
            p = ((torch.arange(s)[:, None] + torch.arange(s)[None, :]) % 2 == 0).float()
        return p.to(dtype=dtype, device=device).expand(channels, s, s)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x, "x")
        out = x.clone()
        row, col = self._origin(x.shape[2], x.shape[3])
        out[:, :, row : row + self.size, col : col + self.size] = self.patch(x.shape[1], x.dtype, x.device)
        return out


@BACKDOORS.register("blended")
class Blended(BackdoorAttack):
    """Blend a fixed pattern into the image: ``(1 - alpha) x + alpha * pattern``.

    ``pattern="random"`` draws a uniform-noise image from ``seed`` at the image's size (the
    paper's random-pattern variant; BackdoorBench blends a fixed photo - pass it as a tensor
    C x H x W in [0, 1] or as a path to an image file).
    """

    def __init__(self, target: int = 0, alpha: float = 0.2, pattern: str | Sequence | torch.Tensor = "random", seed: int = 0,
                 all_to_all: bool = False):
        _check_target(target, all_to_all)
        super().__init__(int(target), all_to_all)
        self.alpha = _check_unit(alpha, "alpha")
        self.seed = _check_int(seed, "seed", 0)
        self._image: torch.Tensor | None = None
        if isinstance(pattern, str) and pattern == "random":
            return
        if isinstance(pattern, str):
            from PIL import Image

            try:
                with Image.open(pattern) as im:
                    arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
            except OSError as exc:
                raise InputError(f"cannot read blend pattern image {pattern!r}: {exc}") from None
            self._image = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
            return
        if not isinstance(pattern, torch.Tensor):  # a nested list / array (e.g. read back from a manifest)
            try:
                pattern = torch.from_numpy(np.asarray(pattern, dtype=np.float32))
            except (TypeError, ValueError):
                raise InputError("pattern must be 'random', an image path or a C x H x W array in [0, 1]") from None
        if pattern.dim() not in (3, 4) or (pattern.dim() == 4 and pattern.shape[0] != 1):
            raise InputError(f"pattern must be a C x H x W image in [0, 1], got shape {tuple(pattern.shape)}")
        check_images(pattern.reshape(1, *pattern.shape[-3:]), "pattern")
        self._image = pattern.detach().reshape(pattern.shape[-3:]).float().cpu().clone()

    def config(self) -> dict[str, Any]:
        """Constructor arguments that rebuild this exact trigger.

        A custom pattern (tensor, array or image file) is recorded as its pixel values (a nested
        C x H x W list of float32 values, which JSON round-trips exactly), so a manifest
        rebuilds the same trigger even if the image file changes or is gone.
        """
        pattern: Any = "random" if self._image is None else self._image.tolist()
        return {"target": self.target, "alpha": self.alpha, "pattern": pattern, "seed": self.seed,
                "all_to_all": self.all_to_all}

    def pattern_for(self, c: int, h: int, w: int, dtype=torch.float32, device=None) -> torch.Tensor:
        if self._image is None:
            g = torch.Generator().manual_seed(self.seed)
            return torch.rand(c, h, w, generator=g).to(dtype=dtype, device=device)
        img = self._image
        if img.shape[1:] != (h, w):
            img = F.interpolate(img[None], size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0].clamp(0, 1)
        if img.shape[0] != c:
            img = img.mean(0, keepdim=True).expand(c, h, w) if c == 1 else img[:1].expand(c, h, w)
        return img.to(dtype=dtype, device=device)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x, "x")
        p = self.pattern_for(x.shape[1], x.shape[2], x.shape[3], x.dtype, x.device)
        return ((1 - self.alpha) * x + self.alpha * p).clamp(0, 1)


@BACKDOORS.register("sig")
class SIG(BackdoorAttack):
    """Clean-label sinusoidal signal: ``x + delta * sin(2 pi j f / W)`` along columns j, clipped.

    Only target-class training images are poisoned and their labels stay correct
    (``clean_label = True``); at test time the signal is added to any image.
    """

    clean_label = True

    def __init__(self, target: int = 0, delta: float = 40 / 255, frequency: float = 6.0):
        _check_target(target, False)
        super().__init__(int(target), all_to_all=False)
        self.delta = _check_unit(delta, "delta")
        self.frequency = _number(frequency, "frequency")
        if not self.frequency > 0:
            raise InputError(f"frequency must be > 0, got {frequency!r}")

    def signal(self, w: int, dtype=torch.float32, device=None) -> torch.Tensor:
        j = torch.arange(w, dtype=torch.float64)
        return (self.delta * torch.sin(2 * math.pi * j * self.frequency / w)).to(dtype=dtype, device=device)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x, "x")
        return (x + self.signal(x.shape[3], x.dtype, x.device).view(1, 1, 1, -1)).clamp(0, 1)


@BACKDOORS.register("wanet")
class WaNet(BackdoorAttack):
    """Warping trigger: a random k x k flow field, upsampled, scaled by ``s`` and applied with grid_sample.

    Args:
        s: warp strength (BackdoorBench 0.5).
        k: control-grid size of the random field (4).
        cross_ratio: with ``noise_mode``, ``cross_ratio`` times as many extra training samples get a
            randomly perturbed warp and keep their label (2).
        noise_mode: add those "noise" samples so the model learns the exact warp only
            (:meth:`extra_samples` / :meth:`apply_extra`, used by ``PoisonedDataset``).
        grid_rescale: factor on the sampling grid, in (0, 2] (BackdoorBench 1; below 1 crops, above 1
            smears the border).
        seed: seed of the warp field.
    """

    def __init__(self, target: int = 0, s: float = 0.5, k: int = 4, cross_ratio: float = 2.0,
                 noise_mode: bool = True, grid_rescale: float = 1.0, seed: int = 0, all_to_all: bool = False):
        _check_target(target, all_to_all)
        super().__init__(int(target), all_to_all)
        self.k = _check_int(k, "k", 2)
        self.s = _number(s, "s")
        if not self.s > 0:
            raise InputError(f"s must be > 0, got {s!r}")
        self.cross_ratio = _number(cross_ratio, "cross_ratio")
        if self.cross_ratio < 0:
            raise InputError(f"cross_ratio must be >= 0, got {cross_ratio!r}")
        self.noise_mode = _check_bool(noise_mode, "noise_mode")
        self.grid_rescale = _number(grid_rescale, "grid_rescale")
        if not 0 < self.grid_rescale <= 2:
            raise InputError(f"grid_rescale must be in (0, 2], got {grid_rescale!r}")
        self.seed = _check_int(seed, "seed", 0)

    def _field(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed)
        field = torch.rand(1, 2, self.k, self.k, generator=g) * 2 - 1
        return field / field.abs().mean()

    def grid(self, h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
        """The sampling grid (1 x H x W x 2) of the trigger warp, in [-1, 1]."""
        flow = F.interpolate(self._field(), size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        identity = torch.stack([xs, ys], dim=-1)[None]
        g = identity + self.s * flow / max(h, w)
        return (g * self.grid_rescale).clamp(-1, 1).to(device=device, dtype=dtype)

    def _warp(self, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        if grid.shape[0] != x.shape[0]:
            grid = grid.expand(x.shape[0], -1, -1, -1)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True).clamp(0, 1)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x, "x")
        return self._warp(x, self.grid(x.shape[2], x.shape[3], x.device, x.dtype))

    def extra_samples(self, n_poisoned: int) -> int:
        """Noise mode: ``round(cross_ratio * n_poisoned)`` label-kept samples get a perturbed warp."""
        if not self.noise_mode or self.cross_ratio <= 0 or n_poisoned <= 0:
            return 0
        return int(round(self.cross_ratio * n_poisoned))

    def apply_extra(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The noise-mode warp of the extra samples (see :meth:`apply_noise`)."""
        return self.apply_noise(x, generator)

    def apply_noise(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The noise-mode warp: the trigger grid plus a random per-sample perturbation (label kept)."""
        check_images(x, "x")
        n, _, h, w = x.shape
        base = self.grid(h, w, x.device, x.dtype).expand(n, -1, -1, -1)
        noise = (torch.rand(n, h, w, 2, generator=generator) * 2 - 1).to(x.device, x.dtype) / max(h, w)
        return self._warp(x, (base + noise).clamp(-1, 1))
