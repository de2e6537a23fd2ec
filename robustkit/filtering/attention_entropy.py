"""Attention-entropy filtering of poisoned samples for ViT classifiers.

:class:`AttentionEntropyFilter` - after BYE ("Backdoor Cleaning without External Guidance in
  MLLM Fine-tuning", NeurIPS 2025), in its ViT-classifier form: a trigger makes the CLS token's
  attention over the patches collapse onto the trigger (low entropy). Per sample, layer and
  head the CLS-to-patch attention is renormalized and its entropy ``H = -sum p log(p + 1e-8)``
  taken (BYE averages the heads' maps first: :func:`cls_attention_entropy`).

  - ``method="split"`` (default, :func:`split_scores`): per labelled class, 2-means on the
    per-head entropy profiles; the cluster with the most compressed (pinned) head is
    suspicious; the class that stands out (by its size under all-to-one poisoning, or by its
    split) is flagged. Two-sided, per head, per class: our departure from the paper, for the
    reasons measured in docs/filtering.md.
  - ``method="bye"`` (:func:`entropy_scores`): the paper's rule - layers whose head-averaged
    entropies are bimodal (2-component GMM with ``|mu1 - mu2| > 2 (sigma1 + sigma2)``) are
    "sensitive"; a sample's score is the mean over sensitive layers; a 2-component GMM on those
    scores flags the low-entropy cluster (as a lower tail, see :func:`low_cluster`).

Every filter (here, :mod:`.activation_clustering`, :mod:`.spectral_signatures`) returns a
:class:`~robustkit.base.FilterResult` whose ``scores`` are oriented the same way - **higher is more suspicious** - so AUROCs compare; ``details`` holds what was chosen
(layers, thresholds, per-class decisions).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ..base import DataFilter, FilterResult, ResultDetails
from ..errors import InputError
from ..inference import eval_mode
from ..models.introspect import attention_layers
from ..registry import FILTERS
from ..utils import model_device, progress_bar
from ..validation import check_positive
from .common import check_seed, fit_gmm2, hooked, is_bimodal, low_cluster, ordered_loader, positive_int

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


def cls_head_entropies(attn: torch.Tensor, prefix_tokens: int = 1, eps: float = ENTROPY_EPS) -> torch.Tensor:
    """Per head (N x heads): the entropy of each head's CLS-to-patch attention, renormalized over the patches.

    Same conventions as :func:`cls_attention_entropy`, without the average over heads (which it
    takes *before* the entropy, so it is not the mean of these values).
    """
    if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
        raise InputError(f"attention must be N x heads x T x T, got {tuple(attn.shape)}")
    if not 1 <= prefix_tokens < attn.shape[-1]:
        raise InputError(f"prefix_tokens must be in [1, {attn.shape[-1] - 1}], got {prefix_tokens}")
    p = attn[:, :, 0, prefix_tokens:].float()
    p = p / p.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    return -(p * torch.log(p + eps)).sum(dim=-1)


# --------------------------------------------------------------------------- reading attention
class _EntropyHook:
    """Collects per-batch CLS entropies of one layer from a forward hook."""

    def __init__(self, prefix_tokens: int, timm_attn: nn.Module | None = None):
        self.prefix, self.timm_attn = prefix_tokens, timm_attn
        self.values: list[torch.Tensor] = []
        self.heads: list[torch.Tensor] = []

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.timm_attn is None:  # robustkit Attention returns (out, attention map)
            attn = output[1]
        else:  # timm: recompute softmax(q k^T * scale) from the qkv projection's output
            a = self.timm_attn
            n, t, _ = output.shape
            qkv = output.reshape(n, t, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
            q, k = a.q_norm(qkv[0]), a.k_norm(qkv[1])
            attn = ((q * a.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        attn = attn.detach()
        self.values.append(cls_attention_entropy(attn, self.prefix).cpu())
        self.heads.append(cls_head_entropies(attn, self.prefix).cpu())


def _prefix_tokens(model: nn.Module) -> int:
    """Tokens before the patches (CLS first, then e.g. timm's register / distillation tokens)."""
    n = getattr(model, "num_prefix_tokens", None)
    if getattr(model, "cls_token", True) is None or n == 0:
        raise InputError(
            f"{type(model).__name__} has no CLS token (class_token=False / global pooling): the attention-entropy "
            "filter reads the CLS token's attention; use activation_clustering or spectral_signatures"
        )
    return 1 if n is None else int(n)


@torch.no_grad()
def read_attention_entropies(model: nn.Module, dataset: Dataset, batch_size: int = 256,
                             progress: bool = True) -> dict[str, Any]:
    """One pass over ``dataset``: ``layer`` (N x L head-averaged entropies, as BYE), ``head``
    (N x L x heads per-head entropies), ``labels`` (N, the data set's labels) and ``names``."""
    layers = attention_layers(model)
    prefix = _prefix_tokens(model)
    hooks = [_EntropyHook(prefix, timm_attn) for _, _, timm_attn in layers]
    device = model_device(model)
    loader = ordered_loader(dataset, batch_size)
    labels = []
    with eval_mode(model), hooked([(m, h) for (_, m, _), h in zip(layers, hooks)]):
        bar = progress_bar(len(loader), "attention entropy", progress, unit="batch")
        for x, y in loader:
            model(x.to(device))
            labels.append(torch.as_tensor(y).reshape(-1).cpu())
            bar.update(1)
        bar.close()
    return {"layer": torch.stack([torch.cat(h.values) for h in hooks], dim=1),
            "head": torch.stack([torch.cat(h.heads) for h in hooks], dim=1),
            "labels": torch.cat(labels).long(), "names": [n for n, _, _ in layers]}


def attention_entropies(model: nn.Module, dataset: Dataset, batch_size: int = 256,
                        progress: bool = True) -> tuple[torch.Tensor, list[str]]:
    """``(N x L entropies, layer names)``: CLS-to-patch attention entropy of every sample at every layer."""
    r = read_attention_entropies(model, dataset, batch_size, progress)
    return r["layer"], r["names"]


# --------------------------------------------------------------------------- scoring
DIRECTIONS = ("both", "low", "high")
MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution times this is its standard deviation


def _mode_and_scale(v: np.ndarray, gmm: dict[str, Any]) -> tuple[float, float]:
    """The clean mode of one layer's entropies and its spread.

    The clean samples are the majority, so the heavier mixture component is the clean mode:
    its mean and standard deviation. When that component is degenerate (a near-zero width) the
    median and the scaled median absolute deviation of all samples are used instead.
    """
    major = int(np.argmax(gmm["weights"]))
    mode, scale = float(gmm["means"][major]), float(gmm["stds"][major])
    floor = 1e-6 * max(1.0, abs(mode))
    if not scale > floor:
        mode = float(np.median(v))
        scale = max(MAD_TO_SIGMA * float(np.median(np.abs(v - mode))), floor)
    return mode, scale


def _minority_side(gmm: dict[str, Any]) -> int:
    """+1 when the lighter mixture component lies above the heavier one (entropy raised), -1 when below."""
    major = int(np.argmax(gmm["weights"]))
    return 1 if gmm["means"][1 - major] > gmm["means"][major] else -1


def high_cluster(values: np.ndarray, gmm: dict[str, Any]) -> tuple[np.ndarray, float | None]:
    """The upper-tail mirror of :func:`~robustkit.filtering.common.low_cluster`: the samples of the
    higher-mean component as an upper tail ``values >= cut``."""
    mirrored = {**gmm, "means": [-gmm["means"][1], -gmm["means"][0]], "order": gmm["order"][::-1],
                "model": _Negated(gmm["model"])}
    mask, cut = low_cluster(-np.asarray(values, dtype=np.float64), mirrored)
    return mask, (None if cut is None else -cut)


class _Negated:
    """A fitted mixture read on negated values (``predict(-x)`` of the original)."""

    def __init__(self, model: Any):
        self.model = model

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.model.predict(-x)


def entropy_scores(entropy: np.ndarray, direction: str = "both", separation: float = 2.0,
                   layers: list[int] | None = None, seed: int = 0) -> dict[str, Any]:
    """Suspicion scores from an ``N x L`` matrix of per-layer CLS-attention entropies.

    Per layer ``j`` a 2-component mixture is fitted; BYE's test ``|mu1 - mu2| > separation
    (sigma1 + sigma2)`` marks it sensitive. The heavier component is the *clean mode*
    (``m_j``, ``s_j``: the clean samples are the majority). Every sample's deviation from it is
    ``z_ij = (H_ij - m_j) / s_j``.

    - ``direction="low"`` (BYE): a trigger collapses attention, ``d_j = -1`` on every layer.
    - ``"high"``: a trigger spreads attention (e.g. a full-image blend), ``d_j = +1``.
    - ``"both"`` (this function's default; the filter's is ``"low"``): ``d_j`` is the side of layer ``j``'s lighter (minority) component,
      ``-1`` below the clean mode and ``+1`` above; each layer is read in the direction in which
      *its* deviating minority lies.

    ``"both"``: the score of a sample is ``mean_j d_j z_ij`` over the sensitive layers
    (``layers`` when given); without a sensitive layer all layers are used with the two-sided
    deviation ``|z_ij|`` and ``fallback`` is True; a 2-component mixture on the scores flags the
    upper cluster as an upper tail (:func:`high_cluster`). ``"low"`` is BYE exactly: the score
    is the negative mean raw entropy over the sensitive layers (all layers as the fallback) and
    the low-entropy cluster of a 2-component mixture on the mean entropy is flagged as a lower
    tail (:func:`~robustkit.filtering.common.low_cluster`); ``"high"`` mirrors it.
    """
    if direction not in DIRECTIONS:
        raise InputError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    e = np.asarray(entropy, dtype=np.float64)
    if e.ndim != 2 or e.shape[0] < 2:
        raise InputError(f"entropy must be an N x L matrix with N >= 2, got shape {e.shape}")
    per_layer, z = [], np.empty_like(e)
    for j in range(e.shape[1]):
        g = fit_gmm2(e[:, j], seed)
        mode, scale = _mode_and_scale(e[:, j], g)
        z[:, j] = (e[:, j] - mode) / scale
        side = {"low": -1, "high": 1}.get(direction, _minority_side(g))
        per_layer.append({"means": g["means"], "stds": g["stds"], "weights": g["weights"],
                          "bimodal": is_bimodal(g, separation),
                          "gap": abs(g["means"][1] - g["means"][0]) / max(g["stds"][0] + g["stds"][1], 1e-12),
                          "clean_mode": mode, "clean_scale": scale, "direction": "high" if side > 0 else "low"})
    if layers is not None:
        chosen, fallback = list(layers), False
    else:
        chosen = [j for j, r in enumerate(per_layer) if r["bimodal"]]
        fallback = not chosen
        if fallback:
            chosen = list(range(e.shape[1]))
    if direction == "both":
        signs = np.array([1.0 if per_layer[j]["direction"] == "high" else -1.0 for j in chosen])
        score = np.abs(z[:, chosen]).mean(axis=1) if fallback else (z[:, chosen] * signs).mean(axis=1)
        g = fit_gmm2(score, seed)
        flagged, cut = high_cluster(score, g)
    else:  # BYE exactly: the mean raw entropy over the chosen layers, its low (or high) cluster as a tail
        mean_entropy = e[:, chosen].mean(axis=1)
        g = fit_gmm2(mean_entropy, seed)
        if direction == "low":
            score = -mean_entropy
            flagged, low_cut = low_cluster(mean_entropy, g)
            cut = None if low_cut is None else -low_cut
        else:
            score = mean_entropy
            flagged, cut = high_cluster(mean_entropy, g)
    return {"scores": score, "flagged": flagged, "threshold": cut, "layers": chosen, "fallback": fallback,
            "per_layer": per_layer, "score_gmm": {k: g[k] for k in ("means", "stds", "weights")},
            "score_bimodal": is_bimodal(g, separation)}


def entropy_warnings(info: dict[str, Any], separation: float, names: list[str] | None = None) -> list[str]:
    """Where the filter's premise (a minority whose attention entropy departs from a clean mode) fails."""
    notes = []
    n = len(info["scores"])
    if info["fallback"]:
        notes.append(f"no layer's entropies are bimodal (BYE's test with separation {separation:g}; largest gap "
                     f"{max(r['gap'] for r in info['per_layer']):.2f}): no trigger visibly changes attention entropy "
                     "here, the scores are deviations over all layers and the flagged set is unreliable")
    if not info["score_bimodal"]:
        (m1, m2), (s1, s2) = info["score_gmm"]["means"], info["score_gmm"]["stds"]
        notes.append(f"the scores are not bimodal (gap {abs(m2 - m1) / max(s1 + s2, 1e-12):.2f} < {separation:g} "
                     "component widths): the flagged cluster is not clearly separated from the rest")
    share = float(np.mean(info["flagged"])) if n else 0.0
    if share > 0.5:
        notes.append(f"{share:.0%} of the samples are flagged: the deviating cluster is the majority, the clean-mode "
                     "assumption (clean samples are most of the data) fails")
    elif 0.4 <= share <= 0.5:
        notes.append(f"{share:.0%} of the samples are flagged: two clusters of about equal size, which of them is "
                     "clean cannot be told from attention entropy")
    sides = {info["per_layer"][j]["direction"] for j in info["layers"]}
    if not info["fallback"] and len(sides) > 1:
        label = [names[j] if names else str(j) for j in info["layers"]]
        notes.append("the sensitive layers deviate in opposite directions (" + ", ".join(
            f"{l}: {info['per_layer'][j]['direction']}" for l, j in zip(label, info["layers"])) + ")")
    return notes


# --------------------------------------------------------------------------- per-class split (default)
METHODS = ("split", "bye")
OUTLIER_Z = 3.5  # modified z-score above which a class's split stands out (Iglewicz & Hoaglin's cut)
UNSURE_GAP = float(np.log(2.0))  # orientation margin (nats of variance ratio) below which the side is a guess


def _robust_standardize(x: np.ndarray) -> np.ndarray:
    """Columns to (x - median) / (1.4826 MAD); a column with zero MAD uses its standard deviation (or 1)."""
    med = np.median(x, axis=0)
    scale = MAD_TO_SIGMA * np.median(np.abs(x - med), axis=0)
    sd = x.std(axis=0)
    scale = np.where(scale > 1e-12, scale, np.where(sd > 1e-12, sd, 1.0))
    return (x - med) / scale


def _robust_z(values: np.ndarray) -> np.ndarray:
    """Modified z-scores ``(v - median) / (1.4826 MAD)`` of a small vector (0 where the MAD is 0 and v is the median)."""
    med = float(np.median(values))
    mad = MAD_TO_SIGMA * float(np.median(np.abs(values - med)))
    if mad <= 1e-12:
        return np.where(values > med, np.inf, 0.0)
    return (values - med) / mad


CLASS_EVIDENCE = ("size", "attention")
IMBALANCED_CV = 0.25  # robust spread / median of the other classes' sizes above which "size" evidence is unreliable


def split_scores(head_entropy: np.ndarray, labels: np.ndarray, seed: int = 0, outlier: float = OUTLIER_Z,
                 classes: str = "size") -> dict[str, Any]:
    """Per-class split of the per-head attention-entropy profiles (the default rule of the filter).

    ``head_entropy`` is ``N x K`` (the CLS-attention entropy of every head of every layer),
    ``labels`` the data set's (poisoned) labels. The premise, BYE's attention collapse read per
    head and in either direction: a trigger the model relies on fixes the attention of the heads
    that read it, whatever the image, so the poisoned samples' entropies in those heads are
    nearly constant (a collapsed map for a patch, a near-uniform one for a full-image blend) and,
    all-to-one, they all sit in the target class.

    1. Every head's entropies are standardized over all samples (median, 1.4826 MAD).
    2. Per class (at least 4 samples): 2-means (``n_init=10``, ``seed``) on the profiles; the
       silhouette of the split (on at most 2,000 samples of the class).
    3. **Which cluster is suspicious**, without ground truth: the one with the most *compressed*
       head. Per cluster and head, ``log(var_cluster / var_typical)`` with ``var_typical`` the
       median over the *other* classes of their variance of that head; the cluster's compression
       is the largest ``-log`` ratio over heads. ``gap`` is the suspicious cluster's compression
       minus the other cluster's (nats; the margin of the orientation).
    4. **Which class is poisoned** (``classes``): ``"size"`` (default): all-to-one poisoning
       adds the poisoned samples to the target class, so its evidence is its excess over the
       median class size, ``max(n_c / median - 1, 0)``; this assumes the clean classes are about
       balanced (a warning says when the other classes are not). ``"attention"``: the evidence is
       the split itself, ``max(silhouette, 0) * max(gap, 0)``, with no assumption on class sizes.
    5. A sample's score is its class's evidence times its relative distance
       ``d_other / (d_other + d_susp)`` (in [0, 1], above 1/2 on the suspicious side), so every
       sample of a class with evidence ranks by its closeness to the suspicious cluster and a
       class without evidence scores 0 (higher = more suspicious).
    6. A class is *poisoned* when its evidence is an outlier among the classes (modified z-score
       ``(e - median) / (1.4826 MAD) > outlier``, 3.5; for ``"size"`` of the class sizes
       themselves, with the spread floored at 5% of the median size); its suspicious cluster is
       flagged.
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    if classes not in CLASS_EVIDENCE:
        raise InputError(f"classes must be one of {CLASS_EVIDENCE}, got {classes!r}")
    h = np.asarray(head_entropy, dtype=np.float64)
    y = np.asarray(labels).reshape(-1)
    if h.ndim != 2 or h.shape[0] < 2 or h.shape[0] != y.shape[0]:
        raise InputError(f"head_entropy must be N x K with N >= 2 and N labels, got {h.shape} and {y.shape}")
    z = _robust_standardize(h)
    labels_present = [int(c) for c in np.unique(y)]
    idx = {c: np.flatnonzero(y == c) for c in labels_present}
    var = {c: z[i].var(axis=0) for c, i in idx.items()}
    median_size = float(np.median([len(i) for i in idx.values()]))
    closeness = np.zeros(len(y))
    per_class: dict[int, dict[str, Any]] = {}
    parts: dict[int, np.ndarray] = {}
    for c in labels_present:
        i = idx[c]
        size_excess = round(max(len(i) / median_size - 1.0, 0.0), 4)
        others = [var[k] for k in labels_present if k != c and len(idx[k]) >= 2]
        if len(i) < 4 or not others:
            per_class[c] = {"n": len(i), "size_excess": size_excess, "split_weight": 0.0,
                            "reason": "too few samples" if len(i) < 4 else "no other class"}
            continue
        km = KMeans(n_clusters=2, n_init=10, random_state=seed).fit(z[i])
        a = km.labels_
        sizes = np.bincount(a, minlength=2)
        if sizes.min() < 2:
            per_class[c] = {"n": len(i), "size_excess": size_excess, "split_weight": 0.0,
                            "reason": "no split (a cluster of fewer than 2 samples)"}
            continue
        sil = float(silhouette_score(z[i], a, sample_size=min(len(i), 2000), random_state=seed))
        typical = np.maximum(np.median(others, axis=0), 1e-12)
        compression = [float(np.max(-np.log(np.maximum(z[i][a == j].var(axis=0), 1e-12) / typical))) for j in (0, 1)]
        susp = int(np.argmax(compression))
        gap = compression[susp] - compression[1 - susp]
        d = np.linalg.norm(z[i][:, None, :] - km.cluster_centers_[None], axis=2)
        closeness[i] = d[:, 1 - susp] / (d[:, 1 - susp] + d[:, susp] + 1e-12)
        parts[c] = i[a == susp]
        per_class[c] = {"n": len(i), "size_excess": size_excess, "silhouette": round(sil, 4),
                        "suspicious_share": round(float(sizes[susp] / len(i)), 4), "compression": round(compression[susp], 4),
                        "gap": round(gap, 4), "split_weight": round(max(sil, 0.0) * max(gap, 0.0), 4)}
    key = "size_excess" if classes == "size" else "split_weight"
    evidence = np.array([per_class[c][key] for c in labels_present])
    if len(labels_present) < 3:
        zw = np.zeros(len(labels_present))
    elif classes == "size":  # on the raw sizes, with a floor of 5% of the median size on their spread
        n = np.array([len(idx[c]) for c in labels_present], dtype=np.float64)
        zw = (n - median_size) / max(MAD_TO_SIGMA * float(np.median(np.abs(n - median_size))), 0.05 * median_size)
    else:
        zw = _robust_z(evidence)
    scores = np.zeros(len(y))
    flagged = np.zeros(len(y), dtype=bool)
    poisoned = []
    for c, e, zc in zip(labels_present, evidence, zw):
        per_class[c]["evidence_z"] = round(float(zc), 3) if np.isfinite(zc) else float("inf")
        scores[idx[c]] = e * closeness[idx[c]]
        hit = c in parts and e > 0 and zc > outlier
        per_class[c]["flagged"] = int(len(parts[c])) if hit else 0
        if hit:
            flagged[parts[c]] = True
            poisoned.append(c)
    sizes_all = np.array([len(idx[c]) for c in labels_present], dtype=np.float64)
    rest = sizes_all[~np.isin(labels_present, poisoned)] if poisoned else sizes_all
    imbalance = float(MAD_TO_SIGMA * np.median(np.abs(rest - np.median(rest))) / max(np.median(rest), 1.0))
    return {"scores": scores, "flagged": flagged, "per_class": per_class, "poisoned_classes": poisoned,
            "outlier": float(outlier), "n_classes": len(labels_present), "classes": classes, "imbalance": imbalance}


def split_warnings(info: dict[str, Any]) -> list[str]:
    """Where the per-class split's premise (one class splits off a cluster with pinned attention) fails."""
    notes = []
    pc = info["per_class"]
    if info["n_classes"] < 3:
        notes.append(f"{info['n_classes']} class(es): a poisoned class is recognised by comparison with the others "
                     "(at least 3 needed); nothing is flagged")
        return notes
    if info["classes"] == "size" and info["imbalance"] > IMBALANCED_CV:
        notes.append(f"the classes are imbalanced (robust spread of the sizes {info['imbalance']:.0%} of their median): "
                     "the size evidence (all-to-one poisoning enlarges the target class) is unreliable; "
                     "use classes='attention'")
    if not info["poisoned_classes"]:
        key = "size_excess" if info["classes"] == "size" else "split_weight"
        best = max(pc, key=lambda c: pc[c][key])
        what = ("is over-represented (an all-to-one target)" if info["classes"] == "size"
                else "holds a cluster whose attention is pinned as a trigger pins it")
        notes.append(f"no class stands out (largest modified z-score {pc[best]['evidence_z']:.2f}, class {best}, "
                     f"needs > {info['outlier']:g}): no class {what}; nothing is flagged")
    for c in info["poisoned_classes"]:
        if pc[c].get("silhouette", 0.0) < 0.1:
            notes.append(f"class {c}: its samples do not split into two clusters (silhouette {pc[c].get('silhouette', 0.0):.2f}"
                         " < 0.10): the flagged half is arbitrary")
    for c in info["poisoned_classes"]:
        if pc[c]["gap"] < UNSURE_GAP:
            notes.append(f"class {c}: which of its two clusters is poisoned is uncertain (the suspicious cluster's most "
                         f"compressed head is only {pc[c]['gap']:.2f} nats ahead of the other's, < log 2)")
        if pc[c]["suspicious_share"] > 0.65:
            notes.append(f"class {c}: the flagged cluster is {pc[c]['suspicious_share']:.0%} of the class "
                         "(a poisoned majority of the class, or clean samples in the cluster)")
    if len(info["poisoned_classes"]) > 1:
        notes.append(f"{len(info['poisoned_classes'])} classes stand out ({info['poisoned_classes']}): expected one "
                     "for an all-to-one backdoor")
    return notes


# --------------------------------------------------------------------------- filters
@dataclass
class AttentionEntropyDetails(ResultDetails):
    """What the filter decided. ``method``: ``"split"`` or ``"bye"``. For ``"bye"``: the layers used
    (and whether that was the all-layer fallback), every layer's entropy mixture, clean mode and
    direction, the score mixture and the flagging threshold. For ``"split"``: ``per_class`` (each
    class's size excess, silhouette, suspicious share, compression, orientation gap, split
    weight, the modified z-score of its evidence and how many samples were flagged),
    ``classes`` (the class evidence used) and ``poisoned_classes``; the per-layer mixtures
    are still reported (BYE's bimodality test, for reference). Per sample: ``entropy`` (mean
    entropy over the layers used), ``layer_entropy`` (N x L) and ``head_entropy`` (N x L x heads)."""

    layers: list[str]
    layer_indices: list[int]
    fallback: bool
    per_layer: list[dict[str, Any]]
    score_gmm: dict[str, Any]
    score_bimodal: bool
    separation: float
    threshold: float | None
    score: str
    direction: str | None
    entropy: torch.Tensor
    layer_entropy: torch.Tensor
    method: str = "split"
    head_entropy: torch.Tensor | None = None
    per_class: dict[int, dict[str, Any]] = field(default_factory=dict)
    classes: str | None = None
    poisoned_classes: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def confident(self) -> bool:
        """True when no diagnostic fired (see :func:`entropy_warnings` / :func:`split_warnings`)."""
        return not self.warnings

    def tables(self) -> list[tuple[str, list[dict[str, Any]]]]:
        out = [("Layers", [dict(r) for r in self.per_layer])]
        if self.per_class:
            out.insert(0, ("Classes", [{"class": c, **v} for c, v in self.per_class.items()]))
        return out


@FILTERS.register("attention_entropy")
class AttentionEntropyFilter(DataFilter):
    """Attention-entropy filtering for ViT classifiers, after BYE (NeurIPS 2025; see the module docstring).

    Two rules (``method``):

    - ``"split"`` (default; :func:`split_scores`): per class, 2-means on the per-head
      CLS-attention entropies; the cluster with the most compressed head (relative to the other
      classes) is suspicious. The poisoned class is the one that stands out among the classes:
      by its size (``classes="size"``, default: all-to-one poisoning enlarges the target class;
      assumes roughly balanced clean classes) or by how clearly it splits
      (``classes="attention"``). It reads BYE's premise (a trigger pins the attention) per head
      and in either direction and does not assume the sign; it uses the data set's labels, not
      the ground truth.
    - ``"bye"``: BYE's rule as the paper states it, per layer on head-averaged entropies: a
      layer is sensitive if its 2-component GMM is bimodal, the score is the mean entropy over
      the sensitive layers, the low-entropy cluster of a GMM on it is flagged
      (``direction="low"``). ``direction="high"`` / ``"both"`` are this repository's variants
      (see :func:`entropy_scores`).

    **Where we differ from the paper.** BYE scores MLLM fine-tuning data by the entropy of the
    answer token's attention over image tokens, averaged over heads, and flags the *low*
    cluster. On the small CPU ViTs we measured (docs/filtering.md) no layer passed its
    bimodality test and the head average hid the signal: the trigger collapses the attention
    of single heads (per-head AUROC up to 1.0) while the deeper layers' head average *rises*
    toward uniform, for patches as for blends. ``"split"`` therefore (a) keeps the heads apart,
    (b) is two-sided (a pinned entropy, low or high), (c) works inside each labelled class,
    because all-to-one poisoning puts every poisoned sample in the target class, where it is
    about half the class at 10% poisoning, and (d) replaces the GMM tail by a 2-means split
    oriented by compression. It assumes all-to-one poisoning (one target class) and at least
    3 classes.

    Args:
        method: ``"split"`` or ``"bye"``; ``None`` (default) means ``"split"``, or ``"bye"``
            when ``direction`` is given (so callers of the earlier one-rule filter get what they got).
        direction: for ``"bye"``: ``"low"`` (BYE, the default of that method), ``"both"`` or
            ``"high"``; ``InputError`` with ``method="split"``.
        separation: the bimodality factor (2 in the paper), for ``"bye"`` and the per-layer report.
        classes: for ``"split"``: the evidence that picks the poisoned class, ``"size"`` or
            ``"attention"`` (see :func:`split_scores`).
        outlier: for ``"split"``: the modified z-score a class's evidence must exceed (3.5).
        layers: indices of the layers to use (``"bye"``: instead of the bimodality selection;
            ``"split"``: whose heads enter the profile).
        batch_size, progress: batching and progress bar of the forward passes.
        seed: random state of the mixtures and of 2-means (results are deterministic for a seed).

    ``details.warnings`` lists every failed premise and a ``RuntimeWarning`` repeats them;
    ``details.confident`` is True when there are none. ``"bye"``: no bimodal layer, scores not
    bimodal, the flagged cluster a majority or half of the data, layers deviating in opposite
    directions. ``"split"``: no class stands out (nothing flagged), imbalanced classes (with
    ``classes="size"``), a flagged class that does not split (silhouette < 0.1), its orientation
    margin below log 2, the flagged cluster over 65% of its class, several classes flagged,
    fewer than 3 classes. ``threshold``: ``"bye"``: flagged iff ``score >= threshold``;
    ``"split"``: None (flags are per class).
    """

    def __init__(self, separation: float = 2.0, layers: list[int] | None = None, batch_size: int = 256,
                 seed: int = 0, progress: bool = True, direction: str | None = None, method: str | None = None,
                 outlier: float = OUTLIER_Z, classes: str = "size"):
        self.separation = check_positive(separation, "separation")
        self.outlier = check_positive(outlier, "outlier")
        if classes not in CLASS_EVIDENCE:
            raise InputError(f"classes must be one of {CLASS_EVIDENCE}, got {classes!r}")
        self.classes = classes
        if layers is not None and (isinstance(layers, (str, bytes)) or not layers
                                   or not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in layers)):
            raise InputError(f"layers must be a non-empty list of layer indices, got {layers!r}")
        if direction is not None and direction not in DIRECTIONS:
            raise InputError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        if method is None:
            method = "split" if direction is None else "bye"
        if method not in METHODS:
            raise InputError(f"method must be one of {METHODS}, got {method!r}")
        if method == "split" and direction is not None:
            raise InputError("direction applies to method='bye' (BYE's mean-entropy rule); method='split' is two-sided")
        self.layers = None if layers is None else [int(i) for i in layers]
        self.batch_size = positive_int(batch_size, "batch_size")
        self.seed, self.progress, self.method = check_seed(seed), bool(progress), method
        self.direction = (direction or "low") if method == "bye" else None

    def fit(self, model: nn.Module, dataset: Dataset) -> FilterResult:
        if self.layers is not None:  # check the indices before the forward passes
            depth = len(attention_layers(model))
            if any(not 0 <= i < depth for i in self.layers):
                raise InputError(f"layers must be indices in [0, {depth - 1}] ({depth} attention layers), got {self.layers}")
        read = read_attention_entropies(model, dataset, self.batch_size, self.progress)
        ent, names, heads = read["layer"], read["names"], read["head"]
        e = ent.double().numpy()
        info = entropy_scores(e, self.direction or "low", self.separation, self.layers, self.seed)
        per_layer = [{"layer": name, **r} for name, r in zip(names, info["per_layer"])]
        chosen = info["layers"]
        common = dict(per_layer=per_layer, score_gmm=info["score_gmm"], score_bimodal=info["score_bimodal"],
                      separation=self.separation, direction=self.direction, layer_entropy=ent, head_entropy=heads,
                      method=self.method)
        if self.method == "split":
            use = list(range(e.shape[1])) if self.layers is None else self.layers
            split = split_scores(heads[:, use].reshape(len(heads), -1).double().numpy(), read["labels"].numpy(),
                                 self.seed, self.outlier, self.classes)
            notes = split_warnings(split)
            if notes:
                warnings.warn("attention_entropy: " + "; ".join(notes), RuntimeWarning, stacklevel=2)
            details = AttentionEntropyDetails(
                layers=[names[j] for j in use], layer_indices=use, fallback=False, threshold=None,
                score=f"class evidence ({self.classes}) x relative closeness to the class's cluster with the most "
                      "compressed head (per-head entropy)", classes=self.classes,
                entropy=torch.from_numpy(e[:, use].mean(axis=1)), per_class=split["per_class"],
                poisoned_classes=split["poisoned_classes"], warnings=notes, **common)
            return FilterResult(torch.from_numpy(split["scores"]).float(), torch.from_numpy(split["flagged"]), details)
        notes = entropy_warnings(info, self.separation, names)
        if notes:
            warnings.warn("attention_entropy: " + "; ".join(notes), RuntimeWarning, stacklevel=2)
        what = {"both": "signed deviation from the clean mode toward each layer's minority side",
                "low": "deviation below the clean mode (BYE: low entropy)",
                "high": "deviation above the clean mode (high entropy)"}[self.direction]
        if info["fallback"] and self.direction == "both":
            what = "two-sided deviation |z| from the clean mode (no bimodal layer)"
        details = AttentionEntropyDetails(
            layers=[names[j] for j in chosen], layer_indices=chosen, fallback=info["fallback"],
            threshold=info["threshold"], score=f"{what}, mean over the chosen layers (clean-mode widths)",
            entropy=torch.from_numpy(e[:, chosen].mean(axis=1)), warnings=notes, **common)
        return FilterResult(torch.from_numpy(info["scores"]).float(), torch.from_numpy(info["flagged"]), details)
