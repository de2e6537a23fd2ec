"""Data for the backdoor benchmarks: built-in digits or the genuine CIFAR-10 subset, at 16x16 (CPU budget)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

CIFAR_NAME = "CIFAR-10 subset (5,085 train / 512 test)"


def shrink(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear, antialiased resize of N x C x H x W images in [0, 1]."""
    if x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp_(0, 1)


def load(name: str, path: str | None = None, size: int = 16):
    """``(bundle, description)`` for ``name`` in {"digits", "cifar"}; ``path`` is the CIFAR-10 subset .npz."""
    from robustkit.data import bundle_from_arrays, digits, load_npz, to_tensors

    if name == "digits":
        return digits(size=size, channels=3), f"digits {size}x{size} RGB (1,347 train / 450 test)"
    if not path:
        raise SystemExit("the CIFAR-10 subset needs --data PATH (e.g. ../shared/data/cifar10_subset.npz)")
    b = load_npz(path)
    (xtr, ytr), (xte, yte) = to_tensors(b.train), to_tensors(b.test)
    out = bundle_from_arrays("cifar10_subset", shrink(xtr, size), ytr, shrink(xte, size), yte, b.classes)
    return out, f"{CIFAR_NAME}, downscaled to {size}x{size}"


def colour_patch(size: int = 4, seed: int = 0, position: str = "top-left", target: int = 0):
    """The issue's out-of-test trigger: a random ``size`` x ``size`` colour patch (fixed by ``seed``) at a corner.

    A :class:`~robustkit.backdoor.BadNets` whose patch is uniform random colours instead of white.
    """
    from robustkit.backdoor import BadNets

    class ColourPatch(BadNets):
        def patch(self, channels, dtype=torch.float32, device=None):
            g = torch.Generator().manual_seed(seed)
            return torch.rand(channels, self.size, self.size, generator=g).to(dtype=dtype, device=device)

    return ColourPatch(target=target, size=size, position=position)
