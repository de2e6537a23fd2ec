"""CIFAR-10 from a local folder in the genuine python format (``cifar-10-batches-py``).

Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", 2009. The reader does not
use torchvision's ``CIFAR10`` class, whose checksum test rejects anything but the original
archive; it parses the pickled batches directly and checks their shapes.

The batches are pickles; they are read with an unpickler that only rebuilds numpy arrays
(no other code can run), so a tampered file fails with an error instead of executing.
"""

from __future__ import annotations

import importlib
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataNotFoundError, InputError
from ..registry import DATASETS
from .arrays import DataBundle, bundle_from_arrays

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILES = ["test_batch"]
META_FILE = "batches.meta"
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
LAYOUT = f"{FOLDER}/{{data_batch_1..data_batch_5, test_batch, batches.meta}}"

# (module, name) pairs a numpy array pickle may reference (numpy 1.x and 2.x spellings)
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals needed to rebuild numpy arrays."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name} (only numpy arrays are allowed)")
        if module.startswith("numpy.core."):  # numpy 2 renamed numpy.core to numpy._core
            try:
                return getattr(importlib.import_module("numpy._core." + module.split(".", 2)[2]), name)
            except ImportError:
                pass
        elif module.startswith("numpy._core."):
            try:
                return getattr(importlib.import_module(module), name)
            except ImportError:
                module = "numpy.core." + module.split(".", 2)[2]
        return getattr(importlib.import_module(module), name)


def _load_pickle(path: Path, what: str) -> dict:
    """Unpickle ``path`` (bytes keys, like the original python 2 files) into a dict."""
    try:
        raw = path.read_bytes()
        obj = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except OSError as exc:
        raise DataNotFoundError(f"cannot read {path}: {exc}") from None
    except Exception as exc:  # UnpicklingError, EOFError, ValueError, ... on a damaged file
        raise InputError(f"{path} is not a CIFAR-10 python {what} (unpickling failed: {type(exc).__name__}: {exc}); "
                         f"re-extract {URL}") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path} is not a CIFAR-10 python {what} (holds {type(obj).__name__}, expected a dict)")
    return obj


def _get(d: dict, key: str) -> Any:
    return d.get(key.encode(), d.get(key))


def find_cifar10_folder(root: str | Path) -> Path:
    """``root`` itself if it holds the batches, else ``root/cifar-10-batches-py``."""
    root = Path(root).expanduser()
    for cand in (root, root / FOLDER):
        if any((cand / f).exists() for f in TRAIN_FILES + TEST_FILES + [META_FILE]):
            return cand
    return root if root.name == FOLDER else root / FOLDER


def _missing(folder: Path) -> list[str]:
    return [f for f in TRAIN_FILES + TEST_FILES + [META_FILE] if not (folder / f).is_file()]


def _read_batch(path: Path, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    d = _load_pickle(path, "batch")
    data, labels = _get(d, "data"), _get(d, "labels")
    if data is None or labels is None:
        keys = sorted(k.decode() if isinstance(k, bytes) else str(k) for k in d)
        raise InputError(f"{path} is not a CIFAR-10 python batch (no 'data'/'labels'; keys {keys})")
    data = np.asarray(data)
    try:
        labels = np.asarray(labels).astype(np.int64, casting="safe").reshape(-1)
    except (TypeError, ValueError):
        raise InputError(f"{path}: labels must be integers, got {np.asarray(labels).dtype}") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(labels) != data.shape[0]:
        raise InputError(f"{path}: expected uint8 data of shape N x 3072 and N labels, got {data.dtype} "
                         f"{data.shape} and {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise InputError(f"{path}: labels must be in 0..9, got {int(labels.min())}..{int(labels.max())}")
    if limit is not None:
        data, labels = data[:limit], labels[:limit]
    return data, labels


def _read_split(folder: Path, files: list[str], limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys, have = [], [], 0
    for f in files:
        if limit is not None and have >= limit:
            break
        x, y = _read_batch(folder / f, None if limit is None else limit - have)
        xs.append(x)
        ys.append(y)
        have += len(y)
    if have == 0:
        raise InputError(f"{folder}: {', '.join(files)} hold no images")
    x = np.concatenate(xs).reshape(-1, 3, 32, 32)  # rows are R(1024) G(1024) B(1024), row-major
    return torch.from_numpy(x).float().div_(255.0), torch.from_numpy(np.concatenate(ys))


def _read_classes(folder: Path) -> list[str]:
    meta = _load_pickle(folder / META_FILE, "meta file")
    names = _get(meta, "label_names")
    if names is None or len(names) != 10:
        raise InputError(f"{folder / META_FILE} is not a CIFAR-10 meta file (expected 10 'label_names')")
    return [c.decode() if isinstance(c, bytes) else str(c) for c in names]


def _check_limit(value: int | None, name: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise InputError(f"{name} must be an integer >= 1 or None, got {value!r}")


def _download(folder: Path) -> None:
    """Let torchvision fetch and extract the archive into ``folder``'s parent."""
    try:
        import torchvision

        torchvision.datasets.CIFAR10(str(folder.parent), train=True, download=True)
    except Exception as exc:  # URLError, socket errors, checksum failures, missing torchvision
        raise DataNotFoundError(
            f"CIFAR-10 is not in {folder} and could not be downloaded ({type(exc).__name__}: {exc}). "
            f"On a machine without network, download {URL} elsewhere and extract it into {folder.parent} "
            f"so that it holds {LAYOUT}."
        ) from None


@DATASETS.register("cifar10")
def cifar10(root: str, download: bool = False, train_limit: int | None = None, test_limit: int | None = None) -> DataBundle:
    """CIFAR-10 (50k train / 10k test, 3x32x32) from ``root`` or ``root/cifar-10-batches-py``.

    ``download=True`` lets torchvision fetch the archive when the machine is online;
    ``train_limit`` / ``test_limit`` load only the first n images of each split.
    """
    _check_limit(train_limit, "train_limit")
    _check_limit(test_limit, "test_limit")
    base = Path(root).expanduser()
    folder = find_cifar10_folder(base)
    missing = _missing(folder)
    if missing and download:
        _download(folder)
        folder = find_cifar10_folder(base)
        missing = _missing(folder)
    if missing:
        raise DataNotFoundError(
            f"CIFAR-10 not found: {folder} lacks {', '.join(missing)}. Expected the python version of the "
            f"data set: {LAYOUT}. Download {URL} and extract it into {folder.parent} "
            f"(tar xzf cifar-10-python.tar.gz -C {folder.parent}), or pass download=True on a machine with network."
        )
    classes = _read_classes(folder)
    x_tr, y_tr = _read_split(folder, TRAIN_FILES, train_limit)
    x_te, y_te = _read_split(folder, TEST_FILES, test_limit)
    return bundle_from_arrays("cifar10", x_tr, y_tr, x_te, y_te, classes)
