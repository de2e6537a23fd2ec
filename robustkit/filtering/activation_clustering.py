"""Activation clustering: Chen et al., "Detecting Backdoor Attacks on Deep Neural Networks by
Activation Clustering", SafeAI @ AAAI 2019."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ..base import DataFilter, FilterResult
from ..errors import InputError
from ..registry import FILTERS
from ..validation import check_positive
from .common import PerClassDetails, check_seed, penultimate_features, per_class, positive_int


@dataclass
class ActivationClusteringDetails(PerClassDetails):
    components: int = 10
    size_threshold: float = 0.35
    silhouette_threshold: float = 0.15


@FILTERS.register("activation_clustering")
class ActivationClustering(DataFilter):
    """Activation clustering (Chen et al., 2019) on the penultimate features.

    For every class (by the data set's labels, which are the poisoned labels): the features are
    reduced to ``components`` dimensions with FastICA (10 in the paper; PCA whitening is applied
    first by FastICA), split by 2-means, and the *smaller* cluster is flagged when its share of
    the class is at most ``size_threshold`` (0.35) and the silhouette score of the split is at
    least ``silhouette_threshold`` - the paper's "relative size" and "silhouette" criteria
    combined; a class without a clear split keeps all its samples.

    ``scores``: ``(d_big - d_small) / (d_big + d_small)`` in the reduced space (distances to the
    two centroids), in [-1, 1], where ``small`` is the smaller cluster - positive means closer
    to the minority cluster.
    """

    def __init__(self, components: int = 10, size_threshold: float = 0.35, silhouette_threshold: float = 0.10,
                 batch_size: int = 256, seed: int = 0, progress: bool = True):
        if not 0 < check_positive(size_threshold, "size_threshold") <= 0.5:
            raise InputError(f"size_threshold must be in (0, 0.5], got {size_threshold!r}")
        if not -1.0 <= float(silhouette_threshold) <= 1.0:
            raise InputError(f"silhouette_threshold must be in [-1, 1], got {silhouette_threshold!r}")
        self.components, self.size_threshold = positive_int(components, "components"), float(size_threshold)
        self.silhouette_threshold = float(silhouette_threshold)
        self.batch_size = positive_int(batch_size, "batch_size")
        self.seed, self.progress = check_seed(seed), bool(progress)

    def fit(self, model: nn.Module, dataset: Dataset) -> FilterResult:
        import warnings

        from sklearn.cluster import KMeans
        from sklearn.decomposition import FastICA
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.metrics import silhouette_score

        feats, labels = penultimate_features(model, dataset, self.batch_size, self.progress)
        n = feats.shape[0]
        scores = np.zeros(n)
        flagged = np.zeros(n, dtype=bool)
        classes = {}
        for c, idx in per_class(labels):
            if len(idx) < 4:
                classes[c] = {"n": len(idx), "flagged": 0, "reason": "too few samples"}
                continue
            f = feats[idx].double().numpy()
            k = max(1, min(self.components, len(idx) - 1, f.shape[1]))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                z = FastICA(n_components=k, random_state=self.seed, max_iter=1000, whiten="unit-variance").fit_transform(f)
            km = KMeans(n_clusters=2, n_init=10, random_state=self.seed).fit(z)
            sizes = np.bincount(km.labels_, minlength=2)
            small = int(np.argmin(sizes))
            d = np.linalg.norm(z[:, None, :] - km.cluster_centers_[None], axis=2)
            scores[idx] = (d[:, 1 - small] - d[:, small]) / (d[:, 1 - small] + d[:, small] + 1e-12)
            share = float(sizes[small] / len(idx))
            sil = float(silhouette_score(z, km.labels_)) if sizes.min() > 0 else 0.0
            poisoned = share <= self.size_threshold and sil >= self.silhouette_threshold
            if poisoned:
                flagged[idx[km.labels_ == small]] = True
            classes[c] = {"n": len(idx), "small_share": share, "silhouette": sil, "flagged": int(poisoned) * int(sizes[small])}
        details = ActivationClusteringDetails(
            per_class=classes, score="relative closeness to the smaller 2-means cluster of the sample's class",
            components=self.components, size_threshold=self.size_threshold,
            silhouette_threshold=self.silhouette_threshold)
        return FilterResult(torch.from_numpy(scores).float(), torch.from_numpy(flagged), details)
