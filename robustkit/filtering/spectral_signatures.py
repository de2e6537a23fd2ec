"""Spectral signatures: Tran, Li, Madry, "Spectral Signatures in Backdoor Attacks", NeurIPS 2018."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import Dataset

from ..base import DataFilter, FilterResult
from ..errors import InputError
from ..registry import FILTERS
from .common import PerClassDetails, penultimate_features, per_class, positive_int


SCORES = ("squared", "signed")
#: A class "has a dominant direction" when its top singular share is this many times the median class's.
DOMINANCE = 1.5
#: Below this ``<mean, v> / std(<r_i - mean, v>)`` the signed score's orientation is a guess.
MIN_MARGIN = 0.5


def spectral_warnings(classes: dict[int, dict], score: str) -> list[str]:
    """Where spectral signatures' premise fails (see :class:`SpectralSignatures`)."""
    shares = {c: v["top_share"] for c, v in classes.items() if v.get("n", 0) >= 2}
    if len(shares) < 2:
        return []
    notes = []
    top = max(shares, key=shares.get)
    median = float(sorted(shares.values())[len(shares) // 2])
    if shares[top] < DOMINANCE * median:
        notes.append(f"no class has a dominant direction (largest top singular share {shares[top]:.2f}, class {top}, "
                     f"vs the median class's {median:.2f}; premise: poisoned samples shift one class along one "
                     "direction): the flagged samples are each class's extremes, not necessarily poisoned")
    if score == "signed" and classes[top].get("orientation_margin", 0.0) < MIN_MARGIN:
        notes.append(f"class {top}: the class mean projects weakly on the top direction (margin "
                     f"{classes[top].get('orientation_margin', 0.0):.2f} < {MIN_MARGIN}): the signed score's choice of "
                     "tail is uncertain")
    return notes


@dataclass
class SpectralSignaturesDetails(PerClassDetails):
    removed_share: float = 0.0
    scoring: str = "squared"
    warnings: list[str] = field(default_factory=list)

    @property
    def confident(self) -> bool:
        """True when no diagnostic fired."""
        return not self.warnings


@FILTERS.register("spectral_signatures")
class SpectralSignatures(DataFilter):
    """Spectral signatures (Tran, Li, Madry, NeurIPS 2018) on the penultimate features.

    For every class, as in the paper's Algorithm 1: center the class's representations
    (``r_i - mean``), take the top right singular vector ``v`` of the centred matrix and score
    each sample by its correlation with it; the ``removal_factor * expected_rate`` (1.5 x eps in
    the paper) highest-scoring share of *every* class is flagged. ``scores`` are divided by the
    class's mean absolute score so that they compare across classes (for AUROC).

    ``score`` chooses the correlation:

    - ``"squared"`` (default, the paper): ``<r_i - mean, v>^2``. Both tails score high, so the
      poisoned samples must be a minority of their class: the centred poisoned group then
      lies ``(1 - p) * d`` from the mean against ``p * d`` for the clean one (p = poisoned
      share, d = the gap); at p ~ 1/2 both halves lie equally far and the score cannot rank
      them (all-to-one poisoning at ~1/num_classes).
    - ``"signed"``: ``<r_i - mean, v>`` with ``v`` oriented so that ``<mean, v> >= 0``, i.e.
      the tail on the side where the class's *uncentred* features lie. This ranks by one
      tail only and works at any poisoned share when the trigger *adds* activation along
      ``v`` (ReLU features: poisoned samples have larger projections). IBM ART's
      ``SpectralSignatureDefense`` scores ``|<r_i, v>|`` with the uncentred ``r_i``
      (``v`` from the centred matrix); when all ``<r_i, v>`` share the sign of
      ``<mean, v>`` that is the same ranking as ``"signed"``, which states the orientation
      explicitly instead of relying on the offset.

    ``details['per_class']`` records, per class, the top singular value's share of the
    centred matrix's energy (``top_share``), ``mean_projection`` (``<mean, v>`` after
    orientation) and ``orientation_margin`` (``<mean, v>`` over the projections' standard
    deviation).

    Diagnostics (``details.warnings``, repeated as a ``RuntimeWarning``; ``details.confident``
    when there is none): the filter always removes ``removal_factor * expected_rate`` of every
    class, so it cannot say "nothing here". It warns when no class has a dominant direction
    (the largest ``top_share`` is less than :data:`DOMINANCE` x the median class's: the
    poisoned samples do not shift any class along one direction, the paper's premise) and, with
    ``score="signed"``, when the most dominant class's orientation is weak
    (``orientation_margin`` < :data:`MIN_MARGIN`: which tail is the poisoned one is a guess).
    """

    def __init__(self, expected_rate: float = 0.1, removal_factor: float = 1.5, batch_size: int = 256,
                 progress: bool = True, score: str = "squared"):
        if not 0 < expected_rate < 1:
            raise InputError(f"expected_rate must be in (0, 1), got {expected_rate!r}")
        if not removal_factor > 0:
            raise InputError(f"removal_factor must be > 0, got {removal_factor!r}")
        self.expected_rate, self.removal_factor = float(expected_rate), float(removal_factor)
        self.batch_size, self.progress = positive_int(batch_size, "batch_size"), bool(progress)
        if score not in SCORES:
            raise InputError(f"score must be one of {SCORES}, got {score!r}")
        self.score = score

    def fit(self, model: nn.Module, dataset: Dataset) -> FilterResult:
        feats, labels = penultimate_features(model, dataset, self.batch_size, self.progress)
        n = feats.shape[0]
        scores = torch.zeros(n, dtype=torch.float64)
        flagged = torch.zeros(n, dtype=torch.bool)
        share = min(1.0, self.removal_factor * self.expected_rate)
        classes = {}
        for c, idx in per_class(labels):
            s, info = class_scores(feats[idx].double(), self.score)
            scores[idx] = s / s.abs().mean().clamp_min(1e-12)
            k = int(math.floor(share * len(idx)))
            if k:
                top = torch.as_tensor(idx)[torch.topk(s, k).indices]
                flagged[top] = True
            classes[c] = {"n": len(idx), "flagged": k, **info}
        notes = spectral_warnings(classes, self.score)
        if notes:
            warnings.warn("spectral_signatures: " + "; ".join(notes), RuntimeWarning, stacklevel=2)
        what = ("squared projection" if self.score == "squared" else "signed projection (oriented to the class mean)")
        details = SpectralSignaturesDetails(
            per_class=classes, score=f"{what} on the class's top singular vector / class mean |score|",
            removed_share=share, scoring=self.score, warnings=notes)
        return FilterResult(scores.float(), flagged, details)


def class_scores(r: torch.Tensor, score: str = "squared") -> tuple[torch.Tensor, dict[str, float]]:
    """Spectral-signature scores of one class's representations ``r`` (n x d, float64).

    Centres ``r``, takes the top right singular vector ``v`` of the centred matrix and returns
    ``(<r_i - mean, v>^2 or the oriented <r_i - mean, v>, info)`` (see :class:`SpectralSignatures`).
    The sign of ``v`` from the SVD is arbitrary (it moves with the LAPACK build); ``"signed"``
    fixes it by ``<mean, v> >= 0``, and ``"squared"`` does not depend on it.
    """
    mean = r.mean(dim=0, keepdim=True)
    centred = r - mean
    if r.shape[0] < 2:
        return torch.zeros(r.shape[0], dtype=r.dtype), {"top_share": 0.0, "mean_projection": 0.0, "orientation_margin": 0.0}
    _, sv, vh = torch.linalg.svd(centred, full_matrices=False)
    v = vh[0]
    m = float(mean[0] @ v)
    if m < 0:
        v, m = -v, -m
    proj = centred @ v
    energy = float((sv**2).sum())
    spread = float(proj.std())
    info = {"top_share": float(sv[0] ** 2) / energy if energy > 0 else 0.0, "mean_projection": m,
            "orientation_margin": m / spread if spread > 0 else 0.0}
    return (proj**2 if score == "squared" else proj), info
