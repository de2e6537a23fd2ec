"""CIFAR-10 from a local folder in the genuine python format (``cifar-10-batches-py``).

Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", 2009. The reader does not
use torchvision's ``CIFAR10`` class, whose checksum test rejects anything but the original
archive; it parses the pickled batches directly and checks their shapes.
"""

from __future__ import annotations

import pickle
from pathlib import Path

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


def find_cifar10_folder(root: str | Path) -> Path:
    """``root`` itself if it holds the batches, else ``root/cifar-10-batches-py``."""
    root = Path(root).expanduser()
    for cand in (root, root / FOLDER):
        if (cand / TEST_FILES[0]).exists() or (cand / TRAIN_FILES[0]).exists():
            return cand
    return root / FOLDER


def _missing(folder: Path) -> list[str]:
    return [f for f in TRAIN_FILES + TEST_FILES + [META_FILE] if not (folder / f).is_file()]


def _read_batch(path: Path, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as fh:
            d = pickle.load(fh, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise InputError(f"{path} is not a CIFAR-10 python batch (unpickling failed: {exc})") from None
    if not isinstance(d, dict):
        raise InputError(f"{path} is not a CIFAR-10 python batch (holds {type(d).__name__}, expected a dict)")
    data = d.get(b"data", d.get("data"))
    labels = d.get(b"labels", d.get("labels"))
    if data is None or labels is None:
        raise InputError(f"{path} is not a CIFAR-10 python batch (no 'data'/'labels'; keys {sorted(map(str, d))})")
    data = np.asarray(data)
    labels = np.asarray(labels, dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(labels) != data.shape[0]:
        raise InputError(f"{path}: expected uint8 data of shape N x 3072 and N labels, got {data.dtype} {data.shape} and {len(labels)} labels")
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
    x = np.concatenate(xs).reshape(-1, 3, 32, 32)
    return torch.from_numpy(x).float().div_(255.0), torch.from_numpy(np.concatenate(ys))


@DATASETS.register("cifar10")
def cifar10(root: str, download: bool = False, train_limit: int | None = None, test_limit: int | None = None) -> DataBundle:
    """CIFAR-10 (50k train / 10k test, 3x32x32) from ``root`` or ``root/cifar-10-batches-py``.

    ``download=True`` lets torchvision fetch the archive when the machine is online;
    ``train_limit`` / ``test_limit`` load only the first n images of each split.
    """
    folder = find_cifar10_folder(root)
    missing = _missing(folder)
    if missing and download:
        try:
            import torchvision

            torchvision.datasets.CIFAR10(str(Path(root).expanduser()), train=True, download=True)
        except Exception as exc:  # URLError, socket errors, checksum failures
            raise DataNotFoundError(
                f"CIFAR-10 is not in {folder} and could not be downloaded ({type(exc).__name__}: {exc}). "
                f"On a machine without network, download {URL} elsewhere and extract it into {Path(root)}."
            ) from None
        folder = find_cifar10_folder(root)
        missing = _missing(folder)
    if missing:
        raise DataNotFoundError(
            f"CIFAR-10 not found: {folder} lacks {', '.join(missing)}. Expected the python version "
            f"of the data set: {FOLDER}/ with data_batch_1..5, test_batch and batches.meta. "
            f"Download {URL} and extract it into {Path(root)} (or pass download=True on a machine with network)."
        )
    with open(folder / META_FILE, "rb") as fh:
        try:
            meta = pickle.load(fh, encoding="bytes")
            classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta[b"label_names"]]
        except Exception as exc:
            raise InputError(f"{folder / META_FILE} is not a CIFAR-10 meta file: {exc}") from None
    x_tr, y_tr = _read_split(folder, TRAIN_FILES, train_limit)
    x_te, y_te = _read_split(folder, TEST_FILES, test_limit)
    return bundle_from_arrays("cifar10", x_tr, y_tr, x_te, y_te, classes)
