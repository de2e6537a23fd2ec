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

from dataclasses import dataclass
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


# --------------------------------------------------------------------------- filters
@dataclass
class AttentionEntropyDetails(ResultDetails):
    """Layers used (and whether that was the all-layer fallback), every layer's entropy mixture,
    the score mixture and the flagging threshold; ``entropy`` / ``layer_entropy`` are per sample."""

    layers: list[str]
    layer_indices: list[int]
    fallback: bool
    per_layer: list[dict[str, Any]]
    score_gmm: dict[str, Any]
    score_bimodal: bool
    separation: float
    threshold: float | None
    score: str
    entropy: torch.Tensor
    layer_entropy: torch.Tensor

    def tables(self) -> list[tuple[str, list[dict[str, Any]]]]:
        return [("Layers", [dict(r) for r in self.per_layer])]


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
        self.batch_size = positive_int(batch_size, "batch_size")
        self.seed, self.progress = check_seed(seed), bool(progress)

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
        details = AttentionEntropyDetails(
            layers=[names[j] for j in chosen], layer_indices=chosen, fallback=fallback, per_layer=per_layer,
            score_gmm={k: g[k] for k in ("means", "stds", "weights")}, score_bimodal=is_bimodal(g, self.separation),
            separation=self.separation, threshold=threshold,
            score="negative mean CLS-attention entropy over the chosen layers",
            entropy=torch.from_numpy(entropy), layer_entropy=ent)
        return FilterResult(scores.float(), torch.from_numpy(flagged), details)
