"""The built-in data set: scikit-learn's handwritten digits (offline, real scans).

1797 grayscale 8x8 images of the digits 0-9 (UCI ML hand-written digits, shipped inside
scikit-learn), scaled from 0..16 to [0, 1] and upsampled bilinearly to ``size`` x ``size``
so that CNNs and ViTs built for 32x32 inputs work unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import InputError
from ..registry import DATASETS
from .arrays import DataBundle, bundle_from_arrays, stratified_split

CLASSES = [str(i) for i in range(10)]


def load_digit_images(size: int = 32, channels: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as ``(x, y)``: x float32 N x channels x size x size in [0, 1], y int64."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise InputError(f"size must be an integer >= 8 (the originals are 8x8), got {size!r}")
    if isinstance(channels, bool) or channels not in (1, 3):
        raise InputError(f"channels must be 1 or 3, got {channels!r}")
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images).float().div_(16.0).unsqueeze(1)
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    x = x.clamp_(0.0, 1.0)
    if channels == 3:
        x = x.repeat(1, 3, 1, 1)
    return x.contiguous(), torch.from_numpy(d.target).long()


@DATASETS.register("digits")
def digits(size: int = 32, channels: int = 1, test_fraction: float = 0.25, seed: int = 0) -> DataBundle:
    """scikit-learn digits upsampled to ``size``, stratified train/test split (built in, offline)."""
    x, y = load_digit_images(size, channels)
    tr, te = stratified_split(y.numpy(), test_fraction, seed)
    tr_t, te_t = torch.from_numpy(tr), torch.from_numpy(te)
    return bundle_from_arrays("digits", x[tr_t], y[tr_t], x[te_t], y[te_t], CLASSES)
