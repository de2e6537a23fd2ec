"""Image arrays in ``.npz`` files (read, and atomic write).

Keys: ``x_train, y_train, x_test, y_test``, or ``x, y``, plus an optional ``classes`` array of
names. A file with ``x, y`` only is used as given: its images, all of them and in file order,
are both the train and the test split (``bundle.train is bundle.test``, see
:attr:`~robustkit.data.DataBundle.test_is_train`), unless ``test_fraction`` asks for a
stratified split. Images may be uint8 (0..255) or float ([0, 1]),
channels-first (N x C x H x W), channels-last (N x H x W x C) or grayscale N x H x W.
"""

from __future__ import annotations

import dataclasses
import zipfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import ConfigError, DataNotFoundError, InputError
from ..io import atomic_path
from ..registry import DATASETS
from ..validation import RANGE_TOLERANCE, check_images, check_labels
from .arrays import DataBundle, bundle_from_arrays, stratified_split

SPLIT_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _channel_axis(shape: tuple[int, ...], name: str) -> int:
    """1 for N x C x H x W, 3 for N x H x W x C (C is 1 or 3, else 4 for RGBA)."""
    first, last = shape[1], shape[3]
    if first in (1, 3):
        return 1  # also the ambiguous N x 3 x H x 3: the toolkit's own layout wins
    if last in (1, 3):
        return 3
    if first == 4:
        return 1
    if last == 4:
        return 3
    raise InputError(
        f"cannot tell which axis of {name} (shape {shape}) holds the channels; expected N x C x H x W or "
        "N x H x W x C with C = 1 (grayscale), 3 (RGB) or 4 (RGBA)"
    )


def images_to_tensor(arr: np.ndarray, name: str = "x") -> torch.Tensor:
    """uint8 (0..255) or float ([0, 1]) images, N x H x W x C, N x C x H x W or N x H x W -> float32 NCHW."""
    arr = np.asarray(arr)
    if arr.ndim == 3:
        arr = arr[:, None]
    if arr.ndim != 4:
        raise InputError(f"{name} must have 3 or 4 dimensions (N x H x W, N x C x H x W or N x H x W x C), got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise InputError(f"{name} holds no images (shape {arr.shape})")
    if _channel_axis(arr.shape, name) == 3:
        arr = arr.transpose(0, 3, 1, 2)
    if arr.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(arr)).float().div_(255.0)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise InputError(f"{name} contains NaN or infinite values")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
            raise InputError(
                f"float images in {name} must be in [0, 1], got min {lo:.4g} max {hi:.4g} "
                "(store 0..255 data as uint8; images are never normalized outside the model)"
            )
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).clamp_(0.0, 1.0)
    hint = " (if the values are 0..255, convert with x.astype(np.uint8))" if np.issubdtype(arr.dtype, np.integer) else ""
    raise InputError(f"{name} must be uint8 (0..255) or float ([0, 1]), got dtype {arr.dtype}{hint}")


def _labels_to_tensor(y: np.ndarray, n: int, name: str, where: str) -> torch.Tensor:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        hint = " (one-hot labels? store y.argmax(1))" if y.ndim == 2 else ""
        raise InputError(f"{where}: {name} must be 1-D class indices, got shape {y.shape}{hint}")
    integral = np.issubdtype(y.dtype, np.integer) or (
        np.issubdtype(y.dtype, np.floating) and bool(np.all(np.isfinite(y))) and bool(np.all(np.mod(y, 1) == 0))
    )
    if y.dtype == bool or not integral:
        raise InputError(f"{where}: {name} must hold integer class indices, got dtype {y.dtype}")
    if y.shape[0] != n:
        raise InputError(f"{where}: {n} images but {y.shape[0]} labels in {name}")
    yt = torch.from_numpy(y.astype(np.int64))
    check_labels(yt, n, name)
    return yt


def _classes(arr: np.ndarray, where: str) -> list[str]:
    arr = np.asarray(arr)
    if arr.ndim != 1:
        raise InputError(f"{where}: 'classes' must be a 1-D array of names, got shape {arr.shape}")
    return [c.decode() if isinstance(c, bytes) else str(c) for c in arr.tolist()]


def _resolve(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if not p.is_file() and p.suffix != ".npz" and p.with_name(p.name + ".npz").is_file():
        return p.with_name(p.name + ".npz")  # np.savez's naming: "data" was written as "data.npz"
    return p


def load_npz(path: str | Path, test_fraction: float | None = None, seed: int = 0) -> DataBundle:
    """Read ``x_train, y_train, x_test, y_test`` (or ``x, y``) and optional ``classes``.

    A file with ``x, y`` only is evaluated as given: with ``test_fraction=None`` (the
    default) train and test are the same dataset, every image in file order (so an evaluation
    with ``n_samples`` takes the file's first n images). Training on such a bundle has no
    held-out data (:attr:`DataBundle.test_is_train` is True). ``test_fraction`` in (0, 1)
    splits it instead: per class, stratified, drawn with ``seed``, each split in a shuffled
    order (:func:`~robustkit.data.stratified_split`). A file that already holds train and
    test splits refuses ``test_fraction`` (:class:`ConfigError`) rather than ignore it.
    """
    p = _resolve(path)
    if test_fraction is not None and (
        isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1
    ):
        raise ConfigError(f"test_fraction must be None (use the file as given) or a number in (0, 1), got {test_fraction!r}",
                          "test_fraction")
    if not p.is_file():
        raise DataNotFoundError(f"npz file not found: {p}")
    errors = (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError)
    with open(p, "rb") as fh:
        magic = fh.read(6)
    if not zipfile.is_zipfile(p) and magic != b"\x93NUMPY":
        raise InputError(f"{p} is not a readable .npz file: not an .npz archive (a zip of .npy arrays) - the file "
                         "is corrupt, truncated or of another format; save arrays with numpy.savez or "
                         "robustkit.data.save_npz")
    try:
        f = np.load(p, allow_pickle=False)
    except errors as exc:
        raise InputError(f"{p} is not a readable .npz file ({type(exc).__name__}: {exc})") from None
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise InputError(f"{p} holds a single .npy array, not an .npz archive of named arrays (x, y, ...)")
    try:
        with f:
            arrays = {k: f[k] for k in f.files}
    except errors as exc:
        raise InputError(f"{p} is not a readable .npz file ({type(exc).__name__}: {exc})") from None
    where = str(p)
    classes = _classes(arrays["classes"], where) if "classes" in arrays else None
    keys = set(arrays)
    if set(SPLIT_KEYS) <= keys:
        parts = [("x_train", "y_train"), ("x_test", "y_test")]
    elif {"x", "y"} <= keys:
        parts = [("x", "y")]
    else:
        have = [k for k in SPLIT_KEYS if k in keys]
        detail = f" (has {', '.join(have)} but lacks {', '.join(k for k in SPLIT_KEYS if k not in keys)})" if have else ""
        raise InputError(f"{p} must hold arrays x_train, y_train, x_test, y_test or x, y{detail}; found keys {sorted(arrays)}")
    tensors = []
    for xk, yk in parts:
        xt = images_to_tensor(arrays[xk], f"{where}: {xk}")
        tensors.append((xt, _labels_to_tensor(arrays[yk], xt.shape[0], yk, where)))
    if len(tensors) == 1:
        x, y = tensors[0]
        if test_fraction is None:  # the file as given: one dataset serves as train and test
            bundle = bundle_from_arrays(p.stem, x, y, x, y, classes)
            return dataclasses.replace(bundle, train=bundle.test)
        tr, te = stratified_split(y.numpy(), test_fraction, seed)
        tr_t, te_t = torch.from_numpy(tr), torch.from_numpy(te)
        return bundle_from_arrays(p.stem, x[tr_t], y[tr_t], x[te_t], y[te_t], classes)
    if test_fraction is not None:
        raise ConfigError(f"{p} already holds train and test splits (x_train, x_test); drop test_fraction", "test_fraction")
    (x_tr, y_tr), (x_te, y_te) = tensors
    return bundle_from_arrays(p.stem, x_tr, y_tr, x_te, y_te, classes)


@DATASETS.register("npz")
def npz(path: str, test_fraction: float | None = None, seed: int = 0) -> DataBundle:
    """Images from an .npz file (keys x_train/y_train/x_test/y_test, or x/y used as given unless test_fraction splits it)."""
    return load_npz(path, test_fraction, seed)


def save_npz(path: str | Path, x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray,
             classes: Sequence[str] | None = None, **extra: Any) -> Path:
    """Write images ``x`` and labels ``y`` (keys ``x``, ``y``, ``classes``, plus ``extra`` arrays) atomically.

    ``x`` is a float N x C x H x W tensor in [0, 1] (or a numpy array in any layout
    :func:`load_npz` reads); it is stored channels-first, as uint8 when every value is a
    multiple of 1/255 (lossless) and as float32 otherwise. Like ``np.savez``, ``.npz`` is
    appended to a name without it; the path written is returned.
    """
    if isinstance(x, torch.Tensor):
        xt = check_images(x.detach().cpu(), "x").float()
    else:
        xt = images_to_tensor(np.asarray(x), "x")
    yt = y.detach().cpu() if isinstance(y, torch.Tensor) else torch.from_numpy(np.asarray(y))
    yt = check_labels(yt, xt.shape[0], "y", convert=True)
    payload: dict[str, Any] = {}
    for k, v in extra.items():
        arr = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
        if arr.dtype == object:
            raise InputError(f"extra array {k!r} has dtype object, which load_npz cannot read (allow_pickle=False)")
        payload[k] = arr
    xa = xt.numpy()
    q = np.round(xa * 255.0)
    xa = q.astype(np.uint8) if np.allclose(q / 255.0, xa, atol=1e-6, rtol=0) else np.clip(xa, 0.0, 1.0).astype(np.float32)
    payload.update(x=xa, y=yt.numpy().astype(np.int64))
    if classes is not None:
        names = [str(c) for c in classes]
        if yt.numel() and int(yt.max()) >= len(names):
            raise InputError(f"labels go up to {int(yt.max())} but only {len(names)} class names were given")
        payload["classes"] = np.asarray(names, dtype=str)
    target = Path(path).expanduser()
    if target.suffix != ".npz":
        target = target.with_name(target.name + ".npz")
    with atomic_path(target, suffix=".npz") as tmp:
        with open(tmp, "wb") as fh:  # a file object: np.savez would append .npz to the temporary name
            np.savez_compressed(fh, **payload)
    return target
