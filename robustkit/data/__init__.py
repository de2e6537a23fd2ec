"""Data sets: built-in digits, CIFAR-10 from disk, ImageFolder and .npz arrays.

Every factory returns a :class:`DataBundle` whose images are float32 C x H x W in [0, 1];
importing this package registers ``digits``, ``cifar10``, ``image_folder`` and ``npz``
in :data:`robustkit.registry.DATASETS`. Poisoned datasets live in :mod:`robustkit.backdoor`.
"""

from .arrays import ArrayDataset, DataBundle, bundle_from_arrays, declared_num_classes, stratified_split, to_tensors
from .cifar10 import cifar10
from .digits import digits, load_digit_images
from .folder import image_folder
from .npz import images_to_tensor, load_npz, npz, save_npz
from .sampling import class_balanced_subset

__all__ = [
    "ArrayDataset",
    "DataBundle",
    "bundle_from_arrays",
    "declared_num_classes",
    "stratified_split",
    "to_tensors",
    "digits",
    "cifar10",
    "image_folder",
    "npz",
    "load_npz",
    "save_npz",
    "images_to_tensor",
    "load_digit_images",
    "class_balanced_subset",
]


def __getattr__(name: str):  # compatibility: poisoned datasets moved to robustkit.backdoor
    if name in ("PoisonedDataset", "LoadedPoisonedDataset", "load_poisoned"):
        from .. import backdoor

        return getattr(backdoor, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
