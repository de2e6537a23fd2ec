"""Data sets: built-in digits, CIFAR-10 from disk, ImageFolder and .npz arrays.

Every factory returns a :class:`DataBundle` whose images are float32 C x H x W in [0, 1];
importing this package registers ``digits``, ``cifar10``, ``image_folder`` and ``npz``
in :data:`robustkit.registry.DATASETS`.
"""

from .arrays import ArrayDataset, DataBundle, bundle_from_arrays, stratified_split, to_tensors
from .cifar10 import cifar10
from .digits import digits, load_digit_images
from .folder import image_folder
from .npz import images_to_tensor, load_npz, npz, save_npz
from .poisoned import LoadedPoisonedDataset, PoisonedDataset, load_poisoned

__all__ = [
    "ArrayDataset",
    "DataBundle",
    "bundle_from_arrays",
    "stratified_split",
    "to_tensors",
    "digits",
    "cifar10",
    "image_folder",
    "npz",
    "load_npz",
    "save_npz",
    "images_to_tensor",
    "PoisonedDataset",
    "LoadedPoisonedDataset",
    "load_poisoned",
    "load_digit_images",
]
