"""Image arrays in ``.npz`` files (read and atomic write)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import DataNotFoundError, InputError
from ..io import atomic_path
from ..registry import DATASETS
from .arrays import DataBundle, bundle_from_arrays, stratified_split


def images_to_tensor(arr: np.ndarray, name: str = "x") -> torch.Tensor:
    """uint8 (0..255) or float ([0, 1]) images, N x H x W x C or N x C x H x W or N x H x W -> float NCHW."""
    arr = np.asarray(arr)
    if arr.ndim == 3:
        arr = arr[:, None]
    if arr.ndim != 4:
        raise InputError(f"{name} must have 3 or 4 dimensions (N x H x W [x C]), got shape {arr.shape}")
    if arr.shape[-1] in (1, 3, 4) and arr.shape[1] not in (1, 3, 4):
        arr = arr.transpose(0, 3, 1, 2)
    if arr.dtype == np.uint8:
        x = torch.from_numpy(np.ascontiguousarray(arr)).float().div_(255.0)
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise InputError(f"{name} contains NaN or infinite values")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0 or hi > 1:
            raise InputError(f"float images in {name} must be in [0, 1], got min {lo:.4g} max {hi:.4g} (store 0..255 data as uint8)")
        x = torch.from_numpy(np.ascontiguousarray(arr)).float()
    else:
        raise InputError(f"{name} must be uint8 (0..255) or float ([0, 1]), got dtype {arr.dtype}")
    return x


def load_npz(path: str | Path, test_fraction: float = 0.2, seed: int = 0) -> DataBundle:
    """Read ``x_train, y_train, x_test, y_test`` (or ``x, y`` split stratified) and optional ``classes``."""
    p = Path(path)
    if not p.is_file():
        raise DataNotFoundError(f"npz file not found: {p}")
    try:
        with np.load(p, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (ValueError, OSError) as exc:
        raise InputError(f"{p} is not a readable .npz file: {exc}") from None
    classes = [str(c) for c in arrays["classes"]] if "classes" in arrays else None
    if {"x_train", "y_train", "x_test", "y_test"} <= set(arrays):
        parts = [(arrays["x_train"], arrays["y_train"], "train"), (arrays["x_test"], arrays["y_test"], "test")]
    elif {"x", "y"} <= set(arrays):
        parts = [(arrays["x"], arrays["y"], "")]
    else:
        raise InputError(f"{p} must hold x_train, y_train, x_test, y_test or x, y; found keys {sorted(arrays)}")
    tensors = []
    for x, y, tag in parts:
        xt = images_to_tensor(x, f"x_{tag}" if tag else "x")
        yt = torch.from_numpy(np.asarray(y)).long()
        if yt.dim() != 1 or yt.shape[0] != xt.shape[0]:
            raise InputError(f"{p}: {xt.shape[0]} images but labels of shape {tuple(yt.shape)}")
        tensors.append((xt, yt))
    if len(tensors) == 1:
        x, y = tensors[0]
        tr, te = stratified_split(y.numpy(), test_fraction, seed)
        tr_t, te_t = torch.from_numpy(tr), torch.from_numpy(te)
        return bundle_from_arrays(p.stem, x[tr_t], y[tr_t], x[te_t], y[te_t], classes)
    (x_tr, y_tr), (x_te, y_te) = tensors
    return bundle_from_arrays(p.stem, x_tr, y_tr, x_te, y_te, classes)


@DATASETS.register("npz")
def npz(path: str, test_fraction: float = 0.2, seed: int = 0) -> DataBundle:
    """Images from an .npz file (keys x_train/y_train/x_test/y_test, or x/y plus a stratified split)."""
    return load_npz(path, test_fraction, seed)


def save_npz(path: str | Path, x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray,
             classes: Sequence[str] | None = None, **extra: Any) -> Path:
    """Write images (stored as uint8 when they are multiples of 1/255, else float32) atomically."""
    xa = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    ya = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    if np.issubdtype(xa.dtype, np.floating):
        q = np.round(xa * 255.0)
        if np.allclose(q / 255.0, xa, atol=1e-6, rtol=0):
            xa = q.astype(np.uint8)
        else:
            xa = xa.astype(np.float32)
    payload: dict[str, Any] = {"x": xa, "y": ya.astype(np.int64), **extra}
    if classes is not None:
        payload["classes"] = np.asarray(list(classes))
    target = Path(path)
    with atomic_path(target, suffix=".npz") as tmp:
        with open(tmp, "wb") as fh:  # a file object: np.savez would append .npz to a name
            np.savez_compressed(fh, **payload)
    return target
