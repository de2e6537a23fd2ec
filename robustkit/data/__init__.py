"""Data sets: built-in digits, CIFAR-10 from disk, ImageFolder and .npz arrays."""

from .arrays import ArrayDataset, DataBundle, bundle_from_arrays, stratified_split, to_tensors
from .digits import digits, load_digit_images

__all__ = [
    "ArrayDataset",
    "DataBundle",
    "bundle_from_arrays",
    "stratified_split",
    "to_tensors",
    "digits",
    "load_digit_images",
]
