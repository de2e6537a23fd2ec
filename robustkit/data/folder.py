"""ImageFolder data (``root/<class>/<image>``), loaded lazily with torchvision."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from ..errors import DataNotFoundError, InputError
from ..registry import DATASETS
from .arrays import DataBundle, stratified_split

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _folder_dataset(root: Path, size: int | None, channels: int) -> Dataset:
    import torchvision
    from torchvision.transforms import v2

    if not root.is_dir():
        raise DataNotFoundError(f"image folder not found: {root}")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir())
    if not class_dirs:
        raise DataNotFoundError(f"{root} has no class sub-folders; expected {root}/<class_name>/<image files>")
    if channels not in (1, 3):
        raise InputError(f"channels must be 1 or 3, got {channels}")
    steps = [v2.Grayscale(1)] if channels == 1 else []
    if size is not None:
        steps.append(v2.Resize((size, size), antialias=True))
    tf = v2.Compose([v2.ToImage(), *steps, v2.ToDtype(torch.float32, scale=True)])
    mode = "L" if channels == 1 else "RGB"

    def loader(path: str):
        from PIL import Image

        with Image.open(path) as im:
            return im.convert(mode)

    try:
        ds = torchvision.datasets.ImageFolder(str(root), transform=tf, loader=loader)
    except FileNotFoundError as exc:
        raise DataNotFoundError(f"no images in {root} (extensions {', '.join(IMG_EXTENSIONS)}): {exc}") from None
    if size is None:
        from PIL import Image

        shapes: dict[tuple[int, int], str] = {}
        for path, _ in ds.samples:
            with Image.open(path) as im:
                shapes.setdefault(im.size, path)
            if len(shapes) > 1:
                (a, pa), (b, pb) = list(shapes.items())[:2]
                raise InputError(f"images differ in size ({pa}: {a[0]}x{a[1]}, {pb}: {b[0]}x{b[1]}); pass size= to resize")
    return ds


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
    """Class-per-folder images. ``root/train`` + ``root/test`` (or ``val``) are used when present,
    else ``test_root``, else a stratified split of ``root`` with ``test_fraction``.
    """
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DataNotFoundError(f"image folder not found: {base}")
    test_dir = next((base / n for n in ("test", "val") if (base / n).is_dir()), None)
    if (base / "train").is_dir() and test_dir is not None:
        train_ds, test_ds = _folder_dataset(base / "train", size, channels), _folder_dataset(test_dir, size, channels)
    elif test_root is not None:
        train_ds, test_ds = _folder_dataset(base, size, channels), _folder_dataset(Path(test_root).expanduser(), size, channels)
    else:
        full = _folder_dataset(base, size, channels)
        tr, te = stratified_split(np.asarray(full.targets), test_fraction, seed)  # type: ignore[attr-defined]
        train_ds, test_ds = Subset(full, tr.tolist()), Subset(full, te.tolist())
        train_ds.classes = test_ds.classes = full.classes  # type: ignore[attr-defined]
    classes = list(getattr(train_ds, "classes", None) or train_ds.dataset.classes)  # type: ignore[attr-defined]
    test_classes = list(getattr(test_ds, "classes", None) or test_ds.dataset.classes)  # type: ignore[attr-defined]
    if classes != test_classes:
        raise InputError(f"train and test folders have different classes: {classes} vs {test_classes}")
    c, h, w = _shape_of(train_ds)
    if _shape_of(test_ds) != (c, h, w):
        raise InputError(f"train images are {c}x{h}x{w} but test images are {'x'.join(map(str, _shape_of(test_ds)))}; pass size=")
    return DataBundle(train_ds, test_ds, len(classes), c, (h, w), classes, base.name)
