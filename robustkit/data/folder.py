"""ImageFolder data (``root/<class>/<image>``), loaded lazily with torchvision.

Layouts, tried in this order:

1. ``test_root`` given: train on ``root/train`` if it exists (else ``root``), test on ``test_root``;
2. ``root/train`` and ``root/test`` (or ``root/val``): use them;
3. otherwise a stratified split of ``root`` (or of ``root/train`` when only that exists).

Hidden folders (``.ipynb_checkpoints``, ...) are not classes.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset, Subset

from ..errors import DataNotFoundError, InputError
from ..registry import DATASETS
from .arrays import DataBundle, stratified_split

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _pil_loader(path: str, mode: str) -> Any:
    """Open an image and convert it to ``mode`` ("RGB" or "L"); module level so it pickles."""
    from PIL import Image

    with Image.open(path) as im:
        return im.convert(mode)


def _class_dirs(root: Path) -> list[Path]:
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


@functools.lru_cache(maxsize=None)
def _visible_image_folder_class() -> type:
    """``torchvision.datasets.ImageFolder`` ignoring hidden folders (built on first use: lazy torchvision import)."""
    import torchvision

    class VisibleImageFolder(torchvision.datasets.ImageFolder):
        """ImageFolder whose classes are the non-hidden sub-folders of the root."""

        def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:  # type: ignore[override]
            classes = [d.name for d in _class_dirs(Path(directory))]
            if not classes:
                raise FileNotFoundError(f"no class folders in {directory}")
            return classes, {c: i for i, c in enumerate(classes)}

    VisibleImageFolder.__module__ = __name__
    VisibleImageFolder.__qualname__ = "VisibleImageFolder"
    return VisibleImageFolder


def __getattr__(name: str) -> Any:  # lets pickle (DataLoader workers) find the lazily built class
    if name == "VisibleImageFolder":
        return _visible_image_folder_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _folder_dataset(root: Path, size: int | None, channels: int) -> Dataset:
    """A lazily loaded ImageFolder over ``root`` yielding (float32 C x H x W in [0, 1], class index)."""
    from torchvision import transforms as T

    if not root.is_dir():
        raise DataNotFoundError(f"image folder not found: {root}")
    if not _class_dirs(root):
        raise DataNotFoundError(f"{root} has no class sub-folders; expected {root}/<class_name>/<image files>")
    # PIL image -> (resize) -> float32 tensor p / 255 (plain ToTensor: exact division, plain torch.Tensor)
    steps: list[Any] = [T.Resize((size, size), interpolation=T.InterpolationMode.BILINEAR)] if size is not None else []
    tf = T.Compose([*steps, T.ToTensor()])
    loader = functools.partial(_pil_loader, mode="L" if channels == 1 else "RGB")
    try:
        ds = _visible_image_folder_class()(str(root), transform=tf, loader=loader)
    except FileNotFoundError as exc:
        raise DataNotFoundError(f"no images in {root} (extensions {', '.join(IMG_EXTENSIONS)}): {exc}") from None
    if size is None:
        _check_same_size(ds)
    return ds


def _check_same_size(ds: Any) -> None:
    """Raise naming two files when the images of ``ds`` differ in size (reads headers only)."""
    from PIL import Image, UnidentifiedImageError

    first: tuple[tuple[int, int], str] | None = None
    for path, _ in ds.samples:
        try:
            with Image.open(path) as im:
                wh = im.size
        except (UnidentifiedImageError, OSError) as exc:
            raise InputError(f"cannot read image {path}: {exc}") from None
        if first is None:
            first = (wh, path)
        elif wh != first[0]:
            (a, pa) = first
            raise InputError(
                f"images differ in size ({pa}: {a[0]}x{a[1]}, {path}: {wh[0]}x{wh[1]}); pass size= to resize them"
            )


def _classes_of(ds: Dataset) -> list[str]:
    return list(ds.dataset.classes if isinstance(ds, Subset) else ds.classes)  # type: ignore[attr-defined]


def _shape_of(ds: Dataset) -> tuple[int, int, int]:
    x, _ = ds[0]
    return tuple(x.shape)  # type: ignore[return-value]


@DATASETS.register("image_folder")
def image_folder(
    root: str,
    size: int | None = None,
    test_root: str | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    channels: int = 3,
) -> DataBundle:
    """Class-per-folder images as a train/test :class:`DataBundle` (images loaded lazily).

    ``root/train`` + ``root/test`` (or ``val``) are used when present, ``test_root`` when
    given, else a stratified split of ``root`` with ``test_fraction`` and ``seed``.
    ``channels`` 3 converts to RGB, 1 to grayscale; ``size`` resizes to ``size`` x ``size``
    (without it all images must share one size).
    """
    if isinstance(channels, bool) or channels not in (1, 3):
        raise InputError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise InputError(f"size must be a positive integer or None, got {size!r}")
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DataNotFoundError(f"image folder not found: {base} (expected {base}/<class_name>/<image files>)")
    train_dir = base / "train" if (base / "train").is_dir() else base
    test_dir = next((base / n for n in ("test", "val") if (base / n).is_dir()), None)
    if test_root is not None:
        train_ds = _folder_dataset(train_dir, size, channels)
        test_ds = _folder_dataset(Path(test_root).expanduser(), size, channels)
    elif train_dir != base and test_dir is not None:
        train_ds, test_ds = _folder_dataset(train_dir, size, channels), _folder_dataset(test_dir, size, channels)
    else:
        full = _folder_dataset(train_dir, size, channels)
        tr, te = stratified_split(np.asarray(full.targets), test_fraction, seed)  # type: ignore[attr-defined]
        train_ds, test_ds = Subset(full, tr.tolist()), Subset(full, te.tolist())
    classes, test_classes = _classes_of(train_ds), _classes_of(test_ds)
    if classes != test_classes:
        raise InputError(f"train and test folders have different classes: {classes} vs {test_classes}")
    c, h, w = _shape_of(train_ds)
    test_shape = _shape_of(test_ds)
    if test_shape != (c, h, w):
        raise InputError(f"train images are {c}x{h}x{w} but test images are {'x'.join(map(str, test_shape))}; pass size=")
    return DataBundle(train_ds, test_ds, len(classes), c, (h, w), classes, base.resolve().name)
