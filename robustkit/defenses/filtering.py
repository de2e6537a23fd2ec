"""Poisoned-sample filters (``DataFilter`` plug-ins) for a model trained on the suspect data.

- :class:`AttentionEntropyFilter` - after BYE ("Backdoor Cleaning without External Guidance in
  MLLM Fine-tuning", NeurIPS 2025), in its ViT-classifier form: a trigger makes the CLS token's
  attention over the patches collapse onto the trigger (low entropy). Per sample and layer the
  CLS-to-patch attention is averaged over heads, renormalized and its entropy
  ``H = -sum p log(p + 1e-8)`` taken; layers whose entropies are bimodal (2-component GMM with
  ``|mu1 - mu2| > 2 (sigma1 + sigma2)``) are "sensitive"; a sample's entropy score is the mean
  over sensitive layers; a 2-component GMM on those scores flags the low-entropy cluster (as a
  lower tail, see :func:`low_cluster`).
- :class:`ActivationClustering` - Chen et al., "Detecting Backdoor Attacks on Deep Neural
  Networks by Activation Clustering", SafeAI @ AAAI 2019.
- :class:`SpectralSignatures` - Tran, Li, Madry, "Spectral Signatures in Backdoor Attacks",
  NeurIPS 2018.

Every filter returns a :class:`~robustkit.base.FilterResult` whose ``scores`` are oriented the
same way - **higher is more suspicious** - so AUROCs compare; ``details`` holds what was chosen
(layers, thresholds, per-class decisions).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..base import DataFilter, FilterResult
from ..errors import InputError
from ..registry import FILTERS
from ..utils import model_device
from ..validation import check_positive

ENTROPY_EPS = 1e-8


# --------------------------------------------------------------------------- entropy
def cls_attention_entropy(attn: torch.Tensor, prefix_tokens: int = 1, eps: float = ENTROPY_EPS) -> torch.Tensor:
    """Entropy of the CLS token's attention over the patch tokens, per sample (N).

    ``attn`` is ``N x heads x T x T`` (post-softmax, rows sum to 1) with the CLS token at 0 and
    ``prefix_tokens`` non-patch tokens (CLS, registers...) before the patches. The CLS row is
    restricted to the patches, averaged over heads and renormalized to sum 1;
    ``H = -sum p log(p + eps)``. A uniform map over P patches gives ``log P``; a one-hot map 0.
    """
    if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
        raise InputError(f"attention must be N x heads x T x T, got {tuple(attn.shape)}")
    if not 1 <= prefix_tokens < attn.shape[-1]:
        raise InputError(f"prefix_tokens must be in [1, {attn.shape[-1] - 1}], got {prefix_tokens}")
    p = attn[:, :, 0, prefix_tokens:].float().mean(dim=1)
    p = p / p.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    return -(p * torch.log(p + eps)).sum(dim=-1)


def fit_gmm2(values: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """A 2-component 1-D Gaussian mixture: means, standard deviations, weights (sorted by mean) and the model."""
    from sklearn.mixture import GaussianMixture

    v = np.asarray(values, dtype=np.float64).reshape(-1, 1)
    if v.shape[0] < 2:
        raise InputError("a 2-component mixture needs at least 2 samples")
    gmm = GaussianMixture(n_components=2, random_state=seed, n_init=3, reg_covar=1e-9).fit(v)
    mu = gmm.means_.ravel()
    sd = np.sqrt(gmm.covariances_.reshape(-1))
    order = np.argsort(mu)
    return {"means": mu[order].tolist(), "stds": sd[order].tolist(), "weights": gmm.weights_[order].tolist(),
            "order": order, "model": gmm}


def is_bimodal(gmm: dict[str, Any], separation: float = 2.0) -> bool:
    """BYE's test: ``|mu1 - mu2| > separation * (sigma1 + sigma2)`` (separation 2 in the paper)."""
    (m1, m2), (s1, s2) = gmm["means"], gmm["stds"]
    return abs(m2 - m1) > separation * (s1 + s2)


# --------------------------------------------------------------------------- reading attention
class _EntropyHook:
    """Collects per-batch CLS entropies of one layer from a forward hook."""

    def __init__(self, prefix_tokens: int, timm_attn: nn.Module | None = None):
        self.prefix, self.timm_attn = prefix_tokens, timm_attn
        self.values: list[torch.Tensor] = []

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.timm_attn is None:  # robustkit Attention returns (out, attention map)
            attn = output[1]
        else:  # timm: recompute softmax(q k^T * scale) from the qkv projection's output
            a = self.timm_attn
            n, t, _ = output.shape
            qkv = output.reshape(n, t, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
            q, k = a.q_norm(qkv[0]), a.k_norm(qkv[1])
            attn = ((q * a.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        self.values.append(cls_attention_entropy(attn.detach(), self.prefix).cpu())


def attention_layers(model: nn.Module) -> list[tuple[str, nn.Module, nn.Module | None]]:
    """``(name, module to hook, timm attention or None)`` for every attention layer, in forward order.

    Supports robustkit's ``SmallViT`` (hooks on ``blocks[i].attn``, whose output holds the map)
    and timm Vision Transformers (hooks on ``blocks[i].attn.qkv``; the map is recomputed from
    q and k, so fused attention needs no change). Raises :class:`InputError` otherwise.
    """
    from ..models.vit import Attention as RkAttention

    layers: list[tuple[str, nn.Module, nn.Module | None]] = []
    for name, m in model.named_modules():
        if isinstance(m, RkAttention):
            layers.append((name, m, None))
        elif (type(m).__name__ == "Attention" and type(m).__module__.startswith("timm.")
              and isinstance(getattr(m, "qkv", None), nn.Linear) and hasattr(m, "num_heads")):
            layers.append((name, m.qkv, m))
    if not layers:
        raise InputError(
            f"{type(model).__name__} has no attention layers: the attention-entropy filter needs a Vision "
            "Transformer (robustkit small_vit or a timm VisionTransformer); use activation_clustering or "
            "spectral_signatures for other classifiers"
        )
    return layers


def _prefix_tokens(model: nn.Module) -> int:
    """Tokens before the patches (CLS first, then e.g. timm's register / distillation tokens)."""
    n = getattr(model, "num_prefix_tokens", None)
    if getattr(model, "cls_token", True) is None or n == 0:
        raise InputError(
            f"{type(model).__name__} has no CLS token (class_token=False / global pooling): the attention-entropy "
            "filter reads the CLS token's attention; use activation_clustering or spectral_signatures"
        )
    return 1 if n is None else int(n)


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _seed(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise InputError(f"seed must be an integer >= 0, got {value!r}")
    return int(value)


@contextlib.contextmanager
def _hooks(pairs: list[tuple[nn.Module, Any]]) -> Iterator[None]:
    handles = [m.register_forward_hook(h) for m, h in pairs]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _loader(dataset: Dataset, batch_size: int) -> DataLoader:
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise InputError("the data set to filter is empty")
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


@torch.no_grad()
def attention_entropies(model: nn.Module, dataset: Dataset, batch_size: int = 256,
                        progress: bool = True) -> tuple[torch.Tensor, list[str]]:
    """``(N x L entropies, layer names)``: CLS-to-patch attention entropy of every sample at every layer."""
    layers = attention_layers(model)
    prefix = _prefix_tokens(model)
    hooks = [_EntropyHook(prefix, timm_attn) for _, _, timm_attn in layers]
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        with _hooks([(m, h) for (_, m, _), h in zip(layers, hooks)]):
            for x, _ in tqdm(_loader(dataset, batch_size), desc="attention entropy", disable=None if progress else True,
                             leave=False):
                model(x.to(device))
    finally:
        model.train(was_training)
    return torch.stack([torch.cat(h.values) for h in hooks], dim=1), [n for n, _, _ in layers]


@torch.no_grad()
def penultimate_features(model: nn.Module, dataset: Dataset, batch_size: int = 256,
                         progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N x D features, N labels)``: the input of the model's classification layer, and the data's labels."""
    from ..models.utils import get_classifier

    try:
        head = get_classifier(model)
    except TypeError as exc:
        raise InputError(f"cannot find the classification layer of {type(model).__name__}: {exc}") from None
    feats: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []

    def grab(module: nn.Module, args: tuple) -> None:
        feats.append(args[0].detach().flatten(1).float().cpu())

    device = model_device(model)
    was_training = model.training
    model.eval()
    handle = head.register_forward_pre_hook(grab)
    try:
        for x, y in tqdm(_loader(dataset, batch_size), desc="features", disable=None if progress else True, leave=False):
            model(x.to(device))
            labels.append(torch.as_tensor(y).cpu())
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(feats), torch.cat(labels).long()


# --------------------------------------------------------------------------- filters
@FILTERS.register("attention_entropy")
class AttentionEntropyFilter(DataFilter):
    """BYE-style attention-entropy filtering for ViT classifiers (see the module docstring).

    Args:
        separation: the bimodality factor (2 in the paper).
        layers: indices of the layers to use instead of the bimodality selection.
        batch_size, progress: batching and progress bar of the forward passes.
        seed: random state of the mixtures (results are deterministic for a seed).

    ``scores`` are the negative mean entropy (higher = more suspicious). When no layer is
    bimodal, all layers are used and ``details['fallback']`` says so. ``details`` also holds
    every layer's entropy mixture, the chosen layers and ``threshold``: a sample is flagged
    iff its score is at least that (None when nothing is flagged).
    """

    def __init__(self, separation: float = 2.0, layers: list[int] | None = None, batch_size: int = 256,
                 seed: int = 0, progress: bool = True):
        self.separation = check_positive(separation, "separation")
        if layers is not None and (isinstance(layers, (str, bytes)) or not layers
                                   or not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in layers)):
            raise InputError(f"layers must be a non-empty list of layer indices, got {layers!r}")
        self.layers = None if layers is None else [int(i) for i in layers]
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.seed, self.progress = _seed(seed), bool(progress)

    def fit(self, model: nn.Module, dataset: Dataset) -> FilterResult:
        if self.layers is not None:  # check the indices before the forward passes
            depth = len(attention_layers(model))
            if any(not 0 <= i < depth for i in self.layers):
                raise InputError(f"layers must be indices in [0, {depth - 1}] ({depth} attention layers), got {self.layers}")
        ent, names = attention_entropies(model, dataset, self.batch_size, self.progress)
        e = ent.double().numpy()
        per_layer = []
        for j, name in enumerate(names):
            g = fit_gmm2(e[:, j], self.seed)
            per_layer.append({"layer": name, "means": g["means"], "stds": g["stds"], "weights": g["weights"],
                              "bimodal": is_bimodal(g, self.separation)})
        if self.layers is not None:
            chosen, fallback = list(self.layers), False
        else:
            chosen = [j for j, r in enumerate(per_layer) if r["bimodal"]]
            fallback = not chosen
            if fallback:
                chosen = list(range(len(names)))
        entropy = e[:, chosen].mean(axis=1)
        g = fit_gmm2(entropy, self.seed)
        flagged, cut = low_cluster(entropy, g)
        scores = torch.from_numpy(-entropy)
        threshold = None if cut is None else -cut
        details = {
            "layers": [names[j] for j in chosen], "layer_indices": chosen, "fallback": fallback,
            "per_layer": per_layer, "score_gmm": {k: g[k] for k in ("means", "stds", "weights")},
            "score_bimodal": is_bimodal(g, self.separation), "separation": self.separation, "threshold": threshold,
            "score": "negative mean CLS-attention entropy over the chosen layers",
            "entropy": torch.from_numpy(entropy), "layer_entropy": ent,
        }
        return FilterResult(scores.float(), torch.from_numpy(flagged), details)


def low_cluster(values: np.ndarray, gmm: dict[str, Any]) -> tuple[np.ndarray, float | None]:
    """``(mask, cut)``: the samples of the lower-mean mixture component, as a lower tail ``values <= cut``.

    The mixture's own assignment is not monotone when the components' widths differ: the wider
    one also wins the far tail on the *other* side, so a narrow poisoned cluster would leave the
    most extreme (lowest-entropy) samples unflagged, or a narrow clean cluster would hand its
    far upper tail to the flagged side. ``cut`` is the largest value assigned to the low
    component that lies below the high component's mean; everything at or below it is
    flagged (``cut`` is None and nothing is flagged when no such value exists).
    """
    v = np.asarray(values, dtype=np.float64)
    low = int(gmm["order"][0])  # index of the lower-mean component in the fitted model
    assigned = gmm["model"].predict(v.reshape(-1, 1)) == low
    below = assigned & (v < gmm["means"][1])
    if not below.any():
        return np.zeros(v.shape, dtype=bool), None
    cut = float(v[below].max())
    return v <= cut, cut


def _per_class(labels: torch.Tensor) -> Iterator[tuple[int, np.ndarray]]:
    y = labels.numpy()
    for c in np.unique(y):
        yield int(c), np.flatnonzero(y == c)


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
        self.components, self.size_threshold = _positive_int(components, "components"), float(size_threshold)
        self.silhouette_threshold = float(silhouette_threshold)
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.seed, self.progress = _seed(seed), bool(progress)

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
        for c, idx in _per_class(labels):
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
        details = {"per_class": classes, "components": self.components, "size_threshold": self.size_threshold,
                   "silhouette_threshold": self.silhouette_threshold,
                   "score": "relative closeness to the smaller 2-means cluster of the sample's class"}
        return FilterResult(torch.from_numpy(scores).float(), torch.from_numpy(flagged), details)


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
        self.batch_size, self.progress = _positive_int(batch_size, "batch_size"), bool(progress)

    def fit(self, model: nn.Module, dataset: Dataset) -> FilterResult:
        feats, labels = penultimate_features(model, dataset, self.batch_size, self.progress)
        n = feats.shape[0]
        scores = torch.zeros(n, dtype=torch.float64)
        flagged = torch.zeros(n, dtype=torch.bool)
        share = min(1.0, self.removal_factor * self.expected_rate)
        classes = {}
        for c, idx in _per_class(labels):
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
        details = {"per_class": classes, "removed_share": share,
                   "score": "squared projection on the class's top singular vector / class mean"}
        return FilterResult(scores.float(), flagged, details)
