"""Spectral signatures: Tran, Li, Madry, "Spectral Signatures in Backdoor Attacks", NeurIPS 2018."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset

from ..base import DataFilter, FilterResult
from ..errors import InputError
from ..registry import FILTERS
from .common import PerClassDetails, penultimate_features, per_class, positive_int


@dataclass
class SpectralSignaturesDetails(PerClassDetails):
    removed_share: float = 0.0


@FILTERS.register("spectral_signatures")
class SpectralSignatures(DataFilter):
    """Spectral signatures (Tran, Li, Madry, NeurIPS 2018) on the penultimate features.

    For every class: center the features, take the top right singular vector ``v`` and score
    each sample by ``(<r_i, v>)^2``; the ``removal_factor * expected_rate`` (1.5 x eps in the
    paper) highest-scoring share of *every* class is flagged. ``scores`` are divided by the
    class's mean score so that they compare across classes (for AUROC).

    As in the paper's analysis, poisoned samples must be a minority of their class: when they
    are about half of it (all-to-one poisoning at ~1/num_classes rate), both halves lie equally
    far from the class mean and the squared projection cannot rank them (docs/filtering.md).
    """

    def __init__(self, expected_rate: float = 0.1, removal_factor: float = 1.5, batch_size: int = 256,
                 progress: bool = True):
        if not 0 < expected_rate < 1:
            raise InputError(f"expected_rate must be in (0, 1), got {expected_rate!r}")
        if not removal_factor > 0:
            raise InputError(f"removal_factor must be > 0, got {removal_factor!r}")
        self.expected_rate, self.removal_factor = float(expected_rate), float(removal_factor)
        self.batch_size, self.progress = positive_int(batch_size, "batch_size"), bool(progress)

    def fit(self, model: nn.Module, dataset: Dataset) -> FilterResult:
        feats, labels = penultimate_features(model, dataset, self.batch_size, self.progress)
        n = feats.shape[0]
        scores = torch.zeros(n, dtype=torch.float64)
        flagged = torch.zeros(n, dtype=torch.bool)
        share = min(1.0, self.removal_factor * self.expected_rate)
        classes = {}
        for c, idx in per_class(labels):
            r = feats[idx].double()
            r = r - r.mean(dim=0, keepdim=True)
            _, _, vh = torch.linalg.svd(r, full_matrices=False)
            s = (r @ vh[0]) ** 2
            scores[idx] = s / s.mean().clamp_min(1e-12)
            k = int(math.floor(share * len(idx)))
            if k:
                top = torch.as_tensor(idx)[torch.topk(s, k).indices]
                flagged[top] = True
            classes[c] = {"n": len(idx), "flagged": k}
        details = SpectralSignaturesDetails(
            per_class=classes, score="squared projection on the class's top singular vector / class mean",
            removed_share=share)
        return FilterResult(scores.float(), flagged, details)
