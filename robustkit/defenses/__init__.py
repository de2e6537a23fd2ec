"""Defenses: input preprocessors, model repair and data filtering."""

from .finetune import FTSAM, AdaptiveSAM, FineTune, class_balanced_subset
from .skip import SkipSuppression, find_skip_connections, scale_skips
from .filtering import ActivationClustering, AttentionEntropyFilter, SpectralSignatures, cls_attention_entropy
from .preprocess import BilateralFilter, GaussianNoise, NoiseBilateral, Quantize, gaussian_noise

__all__ = [
    "GaussianNoise",
    "BilateralFilter",
    "NoiseBilateral",
    "Quantize",
    "gaussian_noise",
    "FTSAM",
    "FineTune",
    "AdaptiveSAM",
    "class_balanced_subset",
    "SkipSuppression",
    "find_skip_connections",
    "scale_skips",
    "AttentionEntropyFilter",
    "ActivationClustering",
    "SpectralSignatures",
    "cls_attention_entropy",
]
