"""Compatibility front: every defense under one import.

The code lives by job: :mod:`robustkit.preprocessing` (test-time preprocessors),
:mod:`robustkit.repair` (model repair) and :mod:`robustkit.filtering` (poisoned-data filters).
"""

from ..data.sampling import class_balanced_subset
from ..filtering import ActivationClustering, AttentionEntropyFilter, SpectralSignatures, cls_attention_entropy
from ..models.introspect import find_skip_connections, scale_skips
from ..preprocessing import BilateralFilter, Compose, GaussianNoise, NoiseBilateral, Quantize, gaussian_noise
from ..repair import FTSAM, FineTune, SkipSuppression
from ..training import AdaptiveSAM

__all__ = [
    "GaussianNoise",
    "BilateralFilter",
    "NoiseBilateral",
    "Quantize",
    "Compose",
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
