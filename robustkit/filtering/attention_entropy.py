"""Attention-entropy filtering of poisoned samples for ViT classifiers.

:class:`AttentionEntropyFilter` - after BYE ("Backdoor Cleaning without External Guidance in
  MLLM Fine-tuning", NeurIPS 2025), in its ViT-classifier form: a trigger makes the CLS token's
  attention over the patches collapse onto the trigger (low entropy). Per sample and layer the
  CLS-to-patch attention is averaged over heads, renormalized and its entropy
  ``H = -sum p log(p + 1e-8)`` taken; layers whose entropies are bimodal (2-component GMM with
  ``|mu1 - mu2| > 2 (sigma1 + sigma2)``) are "sensitive"; a sample's entropy score is the mean
  over sensitive layers; a 2-component GMM on those scores flags the low-entropy cluster (as a
  lower tail, see :func:`low_cluster`).

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
def attention_entropies(model: nn.Module, dataset: Dataset, batch_size: int = 256,
                        progress: bool = True) -> tuple[torch.Tensor, list[str]]:
    """``(N x L entropies, layer names)``: CLS-to-patch attention entropy of every sample at every layer."""
    layers = attention_layers(model)
    prefix = _prefix_tokens(model)
    hooks = [_EntropyHook(prefix, timm_attn) for _, _, timm_attn in layers]
    device = model_device(model)
    loader = ordered_loader(dataset, batch_size)
    with eval_mode(model), hooked([(m, h) for (_, m, _), h in zip(layers, hooks)]):
        bar = progress_bar(len(loader), "attention entropy", progress, unit="batch")
        for x, _ in loader:
            model(x.to(device))
            bar.update(1)
        bar.close()
    return torch.stack([torch.cat(h.values) for h in hooks], dim=1), [n for n, _, _ in layers]


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


# --------------------------------------------------------------------------- filters
@dataclass
class AttentionEntropyDetails(ResultDetails):
    """Layers used (and whether that was the all-layer fallback), every layer's entropy mixture,
    clean mode and direction, the score mixture, the flagging threshold and the diagnostics;
    ``entropy`` (mean entropy over the layers used) and ``layer_entropy`` are per sample."""

    layers: list[str]
    layer_indices: list[int]
    fallback: bool
    per_layer: list[dict[str, Any]]
    score_gmm: dict[str, Any]
    score_bimodal: bool
    separation: float
    threshold: float | None
    score: str
    direction: str
    entropy: torch.Tensor
    layer_entropy: torch.Tensor
    warnings: list[str] = field(default_factory=list)

    @property
    def confident(self) -> bool:
        """True when no diagnostic fired (a sensitive layer, bimodal scores, a minority flagged)."""
        return not self.warnings

    def tables(self) -> list[tuple[str, list[dict[str, Any]]]]:
        return [("Layers", [dict(r) for r in self.per_layer])]


@FILTERS.register("attention_entropy")
class AttentionEntropyFilter(DataFilter):
    """Attention-entropy filtering for ViT classifiers, after BYE (see the module docstring), two-sided.

    Args:
        separation: the bimodality factor (2 in the paper).
        direction: ``"low"`` (default, BYE's rule: low entropy is suspicious); ``"both"``: each
            sensitive layer is read toward the side where its minority mixture component lies,
            so triggers that collapse attention (patches) and triggers that spread it
            (full-image blends) are both found when a layer is bimodal; ``"high"``: the
            opposite of BYE. See :func:`entropy_scores`. ``"both"`` is not the default: without a
            bimodal layer its two-sided fallback flagged 36% of the clean samples of the
            patch victim in ``tests/test_filtering.py`` (BYE's rule: far fewer); see
            docs/filtering.md for the measurements.
        layers: indices of the layers to use instead of the bimodality selection.
        batch_size, progress: batching and progress bar of the forward passes.
        seed: random state of the mixtures (results are deterministic for a seed).

    ``scores``: the mean signed deviation from the clean mode in units of its width (higher =
    more suspicious; for ``"low"`` a monotone per-layer rescaling of BYE's negative mean entropy).
    When no layer is bimodal all layers are used, ``details['fallback']`` says so and ``"both"``
    scores the two-sided deviation ``mean |z|``. ``details.warnings`` lists
    every failed premise (no bimodal layer, scores not bimodal, the flagged cluster a majority or
    half of the data, layers deviating in opposite directions) and a ``RuntimeWarning`` repeats
    them; ``details.confident`` is True when there are none. ``threshold``: a sample is flagged
    iff its score is at least that (None when nothing is flagged).
    """

    def __init__(self, separation: float = 2.0, layers: list[int] | None = None, batch_size: int = 256,
                 seed: int = 0, progress: bool = True, direction: str = "low"):
        self.separation = check_positive(separation, "separation")
        if layers is not None and (isinstance(layers, (str, bytes)) or not layers
                                   or not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in layers)):
            raise InputError(f"layers must be a non-empty list of layer indices, got {layers!r}")
        if direction not in DIRECTIONS:
            raise InputError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        self.layers = None if layers is None else [int(i) for i in layers]
        self.batch_size = positive_int(batch_size, "batch_size")
        self.seed, self.progress, self.direction = check_seed(seed), bool(progress), direction

    def fit(self, model: nn.Module, dataset: Dataset) -> FilterResult:
        if self.layers is not None:  # check the indices before the forward passes
            depth = len(attention_layers(model))
            if any(not 0 <= i < depth for i in self.layers):
                raise InputError(f"layers must be indices in [0, {depth - 1}] ({depth} attention layers), got {self.layers}")
        ent, names = attention_entropies(model, dataset, self.batch_size, self.progress)
        e = ent.double().numpy()
        info = entropy_scores(e, self.direction, self.separation, self.layers, self.seed)
        per_layer = [{"layer": name, **r} for name, r in zip(names, info["per_layer"])]
        notes = entropy_warnings(info, self.separation, names)
        if notes:
            warnings.warn("attention_entropy: " + "; ".join(notes), RuntimeWarning, stacklevel=2)
        chosen = info["layers"]
        what = {"both": "signed deviation from the clean mode toward each layer's minority side",
                "low": "deviation below the clean mode (BYE: low entropy)",
                "high": "deviation above the clean mode (high entropy)"}[self.direction]
        if info["fallback"] and self.direction == "both":
            what = "two-sided deviation |z| from the clean mode (no bimodal layer)"
        details = AttentionEntropyDetails(
            layers=[names[j] for j in chosen], layer_indices=chosen, fallback=info["fallback"], per_layer=per_layer,
            score_gmm=info["score_gmm"], score_bimodal=info["score_bimodal"], separation=self.separation,
            threshold=info["threshold"], score=f"{what}, mean over the chosen layers (clean-mode widths)",
            direction=self.direction, entropy=torch.from_numpy(e[:, chosen].mean(axis=1)), layer_entropy=ent,
            warnings=notes)
        return FilterResult(torch.from_numpy(info["scores"]).float(), torch.from_numpy(info["flagged"]), details)
