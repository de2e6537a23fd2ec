"""Compatibility alias: checkpoints live in :mod:`robustkit.models.checkpoints`."""

from .checkpoints import load_checkpoint, read_checkpoint, save_checkpoint, torchvision_model

__all__ = ["save_checkpoint", "load_checkpoint", "read_checkpoint", "torchvision_model"]
