"""Models taking [0, 1] images with normalization inside; registered by name."""

from .loaders import load_checkpoint, save_checkpoint, torchvision_model
from .normalization import Normalize
from .preact_resnet import PreActBlock, PreActResNet18
from .small_cnn import SmallCNN
from .vit import Attention, SmallViT

__all__ = [
    "Normalize",
    "SmallCNN",
    "PreActResNet18",
    "PreActBlock",
    "SmallViT",
    "Attention",
    "save_checkpoint",
    "load_checkpoint",
    "torchvision_model",
]
