"""Models taking [0, 1] images with their normalization inside; importing registers them.

Registered names (:data:`robustkit.registry.MODELS`): ``small_cnn``, ``preact_resnet18``,
``resnet18_cifar``, ``small_vit``, ``torchvision``.
"""

from .checkpoints import load_checkpoint, load_weights, read_checkpoint, save_checkpoint, torchvision_model
from .normalization import Normalize
from .preact_resnet import PreActBlock, PreActResNet18
from .resnet_cifar import ResNetCIFAR, resnet18_cifar
from .small_cnn import SmallCNN
from .introspect import attention_layers, count_parameters, find_skip_connections, get_classifier, scale_skips
from .vit import Attention, SmallViT

__all__ = [
    "Normalize",
    "SmallCNN",
    "PreActResNet18",
    "PreActBlock",
    "ResNetCIFAR",
    "resnet18_cifar",
    "load_weights",
    "SmallViT",
    "Attention",
    "save_checkpoint",
    "load_checkpoint",
    "read_checkpoint",
    "torchvision_model",
    "get_classifier",
    "count_parameters",
    "attention_layers",
    "find_skip_connections",
    "scale_skips",
]
