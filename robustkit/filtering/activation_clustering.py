"""Activation clustering: Chen et al., "Detecting Backdoor Attacks on Deep Neural Networks by
Activation Clustering", SafeAI @ AAAI 2019."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ..base import DataFilter, FilterResult
from ..errors import InputError
from ..registry import FILTERS
from ..validation import check_positive
from .common import PerClassDetails, check_seed, penultimate_features, per_class, positive_int

REDUCTIONS = ("pca", "ica")
CRITERIA = ("spread", "size")


@dataclass
class ActivationClusteringDetails(PerClassDetails):
    components: int = 10
    reduce: str = "pca"
    suspicious: str = "spread"
    warnings: list[str] = field(default_factory=list)
    size_threshold: float = 0.35
    silhouette_threshold: float = 0.10

    @property
    def confident(self) -> bool:
        """True when no diagnostic fired."""
        return not self.warnings


def reduce_features(f: np.ndarray, components: int, method: str, seed: int) -> np.ndarray:
    """``f`` (n x d, float64) projected to ``components`` dimensions.

    ``"pca"``: the centred features on their top principal directions, *not* whitened, so
    Euclidean distances (and 2-means) keep the feature space's geometry in that subspace.
    ``"ica"``: FastICA with unit-variance sources (the paper's reduction). For 2-means this is the
    same as PCA *whitening*: ICA sources are the whitened principal components times an
    orthogonal matrix, and 2-means is invariant to rotations, so the unmixing changes nothing
    and every one of the ``components`` directions gets unit variance - the backdoor's dominant
    direction counts no more than a noise direction.
    """
    k = max(1, min(components, f.shape[0] - 1, f.shape[1]))
    if method == "ica":
        from sklearn.decomposition import FastICA
        from sklearn.exceptions import ConvergenceWarning

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            return FastICA(n_components=k, random_state=seed, max_iter=1000, whiten="unit-variance").fit_transform(f)
    centred = f - f.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:k].T


@FILTERS.register("activation_clustering")
class ActivationClustering(DataFilter):
    """Activation clustering (Chen et al., 2019) on the penultimate features.

    For every class (by the data set's labels, which are the poisoned labels):

    1. **Reduce** the features to ``components`` (10) dimensions: ``reduce="pca"`` (default,
       the un-whitened principal subspace) or ``"ica"`` (the paper's FastICA). *Deviation*:
       with unit-variance ICA sources, 2-means sees PCA-whitened data (see
       :func:`reduce_features`), which weighs the poisoned samples' dominant direction like nine
       noise directions; on small victims the split then cut off only the most extreme part of
       the poisoned samples, and which part moved with the victim's last float bits (tests on
       another CPU failed). PCA keeps the geometry and splits the poisoned samples off whole.
    2. **Split** by 2-means (``n_init=10``, ``seed``); silhouette score of the split.
    3. **Pick the suspicious cluster** by ``suspicious``: ``"spread"`` (default) or ``"size"``
       (the paper's relative-size criterion: the smaller cluster). ``"spread"``: the cluster
       whose heterogeneity (mean distance to its centroid in the full feature space) is
       farthest, on a log scale, from a typical class's (the median over the *other* classes).
       The clean part of a poisoned class looks like any other class; the poisoned part of an
       all-to-one attack gathers images of many source classes plus a trigger, and its spread
       differs (measured on digits victims: about 2.2 x a typical class's, the clean part
       0.9 x). Unlike the smaller-cluster rule, it does not assume the poisoned samples are a
       minority of their class, so the scores point the right way when they are a majority.
    4. **Flag** the suspicious cluster when its share of the class is at most
       ``size_threshold`` (0.35, the paper's relative size) and the silhouette is at least
       ``silhouette_threshold`` (0.10); a class without a clear split keeps all its samples.
       A class whose suspicious cluster is well separated but is the *larger* one (poisoned
       majority) is not flagged; ``details.warnings`` says so (when that cluster's spread is
       more than 1.5 x or less than 1 / 1.5 x a typical class's), and also when the two clusters
       are of about equal size (the size criterion cannot decide).

    Diagnostics: ``details.warnings`` also says when no class splits at all (every silhouette
    below ``silhouette_threshold``: the premise fails on these features) or when classes split
    but none has a small suspicious cluster; a ``RuntimeWarning`` repeats every warning and
    ``details.confident`` is True when there is none.

    ``scores``: ``max(silhouette, 0) * (d_other - d_susp) / (d_other + d_susp)``, with the
    distances of a sample to the two centroids in the reduced space: positive means closer to
    the suspicious cluster, and the class's silhouette scales it, so a sample in a cleanly
    split class ranks above one in a class with no structure. Higher = more suspicious in
    every class, whichever cluster is larger. ``details['per_class']`` records each class's
    suspicious share, silhouette and the two clusters' spread deviations (suspicious first).
    """

    def __init__(self, components: int = 10, size_threshold: float = 0.35, silhouette_threshold: float = 0.10,
                 batch_size: int = 256, seed: int = 0, progress: bool = True, reduce: str = "pca",
                 suspicious: str = "spread"):
        if not 0 < check_positive(size_threshold, "size_threshold") <= 0.5:
            raise InputError(f"size_threshold must be in (0, 0.5], got {size_threshold!r}")
        if not -1.0 <= float(silhouette_threshold) <= 1.0:
            raise InputError(f"silhouette_threshold must be in [-1, 1], got {silhouette_threshold!r}")
        if reduce not in REDUCTIONS:
            raise InputError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
        if suspicious not in CRITERIA:
            raise InputError(f"suspicious must be one of {CRITERIA}, got {suspicious!r}")
        self.components, self.size_threshold = positive_int(components, "components"), float(size_threshold)
        self.silhouette_threshold = float(silhouette_threshold)
        self.batch_size = positive_int(batch_size, "batch_size")
        self.seed, self.progress = check_seed(seed), bool(progress)
        self.reduce, self.suspicious = reduce, suspicious

    def fit(self, model: nn.Module, dataset: Dataset) -> FilterResult:
        from sklearn.cluster import KMeans
        from sklearn.metrics import silhouette_score

        feats, labels = penultimate_features(model, dataset, self.batch_size, self.progress)
        f_all = feats.double().numpy()
        n = f_all.shape[0]
        scores = np.zeros(n)
        flagged = np.zeros(n, dtype=bool)
        spreads = {c: _spread(f_all[idx]) for c, idx in per_class(labels)}
        classes = {}
        notes: list[str] = []
        for c, idx in per_class(labels):
            if len(idx) < 4:
                classes[c] = {"n": len(idx), "flagged": 0, "reason": "too few samples"}
                continue
            f = f_all[idx]
            z = reduce_features(f, self.components, self.reduce, self.seed)
            km = KMeans(n_clusters=2, n_init=10, random_state=self.seed).fit(z)
            sizes = np.bincount(km.labels_, minlength=2)
            sil = float(silhouette_score(z, km.labels_)) if sizes.min() > 0 else 0.0
            others = [v for k, v in spreads.items() if k != c]
            reference = float(np.median(others)) if others else _spread(f)
            deviation = _spread_deviation(f, km.labels_, reference)
            if self.suspicious == "size" or sizes.min() == 0:
                susp = int(np.argmin(sizes))
            else:
                susp = int(np.argmax(deviation))
            share = float(sizes[susp] / len(idx))
            d = np.linalg.norm(z[:, None, :] - km.cluster_centers_[None], axis=2)
            closeness = (d[:, 1 - susp] - d[:, susp]) / (d[:, 1 - susp] + d[:, susp] + 1e-12)
            scores[idx] = max(sil, 0.0) * closeness
            poisoned = share <= self.size_threshold and sizes.min() > 0 and sil >= self.silhouette_threshold
            if poisoned:
                flagged[idx[km.labels_ == susp]] = True
            elif sil >= self.silhouette_threshold and share > 0.5 and deviation[susp] > np.log(1.5):
                notes.append(f"class {c}: the suspicious cluster is the larger one ({share:.0%} of the class, silhouette "
                             f"{sil:.2f}); the relative-size criterion does not flag it (poisoned majority?)")
            if sizes.min() > 0 and abs(share - 0.5) < 0.05 and sil >= self.silhouette_threshold:
                notes.append(f"class {c}: two clusters of about equal size ({share:.0%}); relative size cannot decide")
            classes[c] = {"n": len(idx), "suspicious_share": share, "silhouette": sil,
                          "spread_deviation": [round(float(deviation[susp]), 3), round(float(deviation[1 - susp]), 3)],
                          "flagged": int(poisoned) * int(sizes[susp])}
        split = [c for c, v in classes.items() if v.get("silhouette", 0.0) >= self.silhouette_threshold]
        if not split:
            notes.append(f"no class splits into two clusters (every silhouette < {self.silhouette_threshold:g}): "
                         "activation clustering's premise (the poisoned samples form their own cluster inside the "
                         "target class) does not hold on these features; nothing is flagged")
        elif not flagged.any():
            notes.append("some classes split into two clusters but none has a small suspicious cluster "
                         f"(share <= {self.size_threshold:g}): nothing is flagged")
        if notes:
            warnings.warn("activation_clustering: " + "; ".join(notes), RuntimeWarning, stacklevel=2)
        details = ActivationClusteringDetails(
            per_class=classes,
            score=f"silhouette x relative closeness to the suspicious ({self.suspicious}) 2-means cluster of the class",
            components=self.components, reduce=self.reduce, suspicious=self.suspicious,
            size_threshold=self.size_threshold, silhouette_threshold=self.silhouette_threshold, warnings=notes)
        return FilterResult(torch.from_numpy(scores).float(), torch.from_numpy(flagged), details)


def _spread(f: np.ndarray) -> float:
    """Mean Euclidean distance of the rows of ``f`` to their mean."""
    return float(np.linalg.norm(f - f.mean(axis=0, keepdims=True), axis=1).mean())


def _spread_deviation(f: np.ndarray, assign: np.ndarray, reference: float) -> np.ndarray:
    """Per cluster: ``|log(spread / reference)|``, how far its heterogeneity is from a typical class's."""
    out = np.zeros(2)
    for j in (0, 1):
        mine = assign == j
        if mine.sum() >= 2 and reference > 0:
            out[j] = abs(np.log(max(_spread(f[mine]), 1e-12) / reference))
    return out
