"""STRIP: Gao, Xu, Wang, Chen, Ranasinghe, Nepal, "STRIP: A Defence Against Trojan Attacks on Deep
Neural Networks", ACSAC 2019 - an *inference-time* detector of triggered inputs.

An input is superimposed with ``n_overlay`` (100) clean images drawn at random from the
defender's clean data; the model's predictions on these blends are scored by their Shannon
entropy ``H = -sum_k p_k log2 p_k``, averaged over the ``n_overlay`` blends (the paper's
normalized entropy ``H_sum / N``). A trojaned input keeps predicting the target whatever it is
blended with (low entropy); a clean input's blends scatter over classes (high entropy).

:meth:`STRIP.fit` sets the decision threshold from clean inputs at a chosen false-rejection rate
(``frr``, 1%): the ``frr``-quantile of their entropies (the paper fits a normal distribution and
takes its percentile; the empirical quantile makes no such assumption). :meth:`STRIP.detect`
flags inputs whose entropy is below the threshold. :meth:`STRIP.evaluate` gives the true- and
false-positive rates on triggered and clean test inputs. :meth:`STRIP.wrap` returns an
``nn.Module`` (:class:`STRIPGuard`) that flags (``mode="flag"``: logits unchanged, flags in
``last_flags``) or rejects (``mode="reject"``: an extra "rejected" class ``K`` wins for flagged
inputs) suspicious inputs in front of the model.

Superimposition: ``blend="add"`` (default) is the paper's ``cv2.addWeighted(x, 1, overlay, 1, 0)``
on [0, 1] images: the sum, saturated at 1. ``blend="average"`` uses ``(x + overlay) / 2``.
The sum detected better on seven of eight measured victims; on images that saturate when summed
(bright digits on black) it can wash a blended trigger out (TPR 0% vs 61.8% with the mean on one
digits victim; docs/baselines.md, STRIP's section).
Overlays for the threshold's clean inputs are drawn from the other clean images (never the
image itself).

:class:`~robustkit.filtering.detectors.InputDetector` is the small interface (``fit`` / ``detect`` /
``wrap``) STRIP implements; STRIP is registered as the detector ``strip`` (the ``detect`` pipeline
step, ``configs/detect_strip.yaml``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ..data.arrays import to_tensors
from ..errors import InputError
from ..inference import eval_mode
from ..utils import model_device, progress_bar
from ..validation import check_images
from .detectors import DETECTORS, DetectorGuard, InputDetector

BLENDS = ("add", "average")


def superimpose(x: torch.Tensor, overlay: torch.Tensor, blend: str = "add") -> torch.Tensor:
    """The paper's superimposition: ``min(x + overlay, 1)`` (``"add"``) or ``(x + overlay) / 2`` (``"average"``)."""
    if blend == "add":
        return (x + overlay).clamp(0.0, 1.0)
    if blend == "average":
        return (x + overlay) / 2
    raise InputError(f"blend must be one of {BLENDS}, got {blend!r}")


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in bits of the softmax of each row: ``-sum_k p_k log2 p_k``."""
    logp = torch.log_softmax(logits.double(), dim=1)
    return -(logp.exp() * logp).sum(1) / math.log(2)


@dataclass
class STRIPFit:
    """What :meth:`STRIP.fit` measured: the clean entropies, the threshold, the FRR asked for and reached."""

    threshold: float
    frr: float
    frr_on_fit: float
    clean_entropy_mean: float
    clean_entropy_std: float
    n_clean: int
    n_pool: int


@DETECTORS.register("strip")
class STRIP(InputDetector):
    """STRIP (Gao et al., ACSAC 2019): flag inputs whose blends with clean images keep a low prediction entropy.

    Args:
        n_overlay: clean images each input is blended with (the paper's N = 100).
        frr: false-rejection rate on clean inputs that sets the threshold (1%).
        blend: ``"add"`` (the paper's saturated sum) or ``"average"``.
        n_fit: how many clean inputs calibrate the threshold (``None``: all of ``clean_data``).
        batch_size: blended images per forward pass.
        seed: seed of the overlay draws (each :meth:`detect` call restarts from it, so a given batch
            always gets the same overlays).
    """

    def __init__(self, n_overlay: int = 100, frr: float = 0.01, blend: str = "add", n_fit: int | None = None,
                 batch_size: int = 1024, seed: int = 0):
        if isinstance(n_overlay, bool) or not isinstance(n_overlay, int) or n_overlay < 1:
            raise InputError(f"n_overlay must be an integer >= 1, got {n_overlay!r}")
        if isinstance(frr, bool) or not isinstance(frr, (int, float)) or not 0 <= frr < 1:
            raise InputError(f"frr must be a fraction in [0, 1), got {frr!r}")
        if blend not in BLENDS:
            raise InputError(f"blend must be one of {BLENDS}, got {blend!r}")
        if n_fit is not None and (isinstance(n_fit, bool) or not isinstance(n_fit, int) or n_fit < 1):
            raise InputError(f"n_fit must be an integer >= 1 or None, got {n_fit!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.n_overlay, self.frr, self.blend, self.n_fit = n_overlay, float(frr), blend, n_fit
        self.batch_size, self.seed = batch_size, int(seed)
        self.model: nn.Module | None = None
        self.pool: torch.Tensor | None = None
        self.threshold: float | None = None
        self.fitted: STRIPFit | None = None

    # ------------------------------------------------------------------ core
    def entropy(self, x: torch.Tensor, exclude: torch.Tensor | None = None, progress: bool = False) -> torch.Tensor:
        """Mean blended-prediction entropy of every image of ``x`` (N), ``n_overlay`` draws each.

        ``exclude[i]``: an index of the pool image ``i`` must not be blended with (itself), or -1.
        """
        if self.model is None or self.pool is None:
            raise InputError("STRIP is not fitted: call fit(model, clean_data) first")
        check_images(x, "x")
        if x.shape[1:] != self.pool.shape[1:]:
            raise InputError(f"images of shape {tuple(x.shape[1:])} do not match the clean data's {tuple(self.pool.shape[1:])}")
        g = torch.Generator().manual_seed(self.seed)
        n, k, m = x.shape[0], self.n_overlay, self.pool.shape[0]
        if m < 2:
            raise InputError("STRIP needs at least 2 clean images to blend with")
        idx = torch.randint(m, (n, k), generator=g)
        if exclude is not None:  # redraw self-overlays: shift by a random non-zero offset
            same = idx == exclude.view(-1, 1)
            idx = torch.where(same, (idx + torch.randint(1, m, (n, k), generator=g)) % m, idx)
        dev = model_device(self.model)
        out = torch.empty(n, dtype=torch.float64)
        per = max(1, self.batch_size // k)
        bar = progress_bar(n, "STRIP", progress, unit="input")
        with torch.no_grad(), eval_mode(self.model):
            for s in range(0, n, per):
                xb = x[s:s + per]
                blends = superimpose(xb.unsqueeze(1), self.pool[idx[s:s + per]], self.blend).flatten(0, 1)
                h = prediction_entropy(self.model(blends.to(dev)).cpu()).view(xb.shape[0], k)
                out[s:s + per] = h.mean(1)
                bar.update(xb.shape[0])
        bar.close()
        return out

    def fit(self, model: nn.Module, clean_data: Dataset | tuple[torch.Tensor, Any], progress: bool = False) -> STRIP:
        """Keep ``clean_data``'s images as the overlay pool; set the threshold at ``frr`` on their entropies."""
        if not isinstance(model, nn.Module):
            raise InputError(f"model must be an nn.Module, got {type(model).__name__}")
        x = clean_data[0] if isinstance(clean_data, (tuple, list)) else to_tensors(clean_data)[0]
        check_images(x, "clean images")
        self.model, self.pool = model, x.detach().cpu()
        n = x.shape[0] if self.n_fit is None else min(self.n_fit, x.shape[0])
        pick = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(self.seed + 1))[:n]
        h = self.entropy(self.pool[pick], exclude=pick, progress=progress)
        # the frr-quantile: flag below it; "lower" interpolation keeps the rejected share <= frr
        thr = float(torch.quantile(h, self.frr, interpolation="lower")) if self.frr > 0 else float(h.min())
        self.threshold = thr
        self.fitted = STRIPFit(thr, self.frr, float((h < thr).double().mean()), float(h.mean()), float(h.std()), n,
                               x.shape[0])
        return self

    def detect(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(flags, entropies)``: flags are entropies strictly below the fitted threshold."""
        h = self.entropy(x)
        assert self.threshold is not None
        return h < self.threshold, h

    def wrap(self, model: nn.Module | None = None, mode: str = "flag") -> DetectorGuard:
        if model is None and self.model is None:
            raise InputError("STRIP is not fitted: call fit(model, clean_data) first or pass the model")
        return DetectorGuard(model if model is not None else self.model, self, mode)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"STRIP(n_overlay={self.n_overlay}, frr={self.frr}, blend={self.blend!r}, threshold={self.threshold})"


STRIPGuard = DetectorGuard


def entropy_histogram(clean: torch.Tensor, triggered: torch.Tensor | None, threshold: float, path: Any,
                      title: str = "STRIP: entropy of the superimposed inputs") -> Any:
    """Histogram of the STRIP entropies of clean (and triggered) inputs with the threshold; returns the PNG path."""
    from pathlib import Path

    from ..eval.plots import plt, save_figure

    fig, ax = plt.subplots(figsize=(6, 3.4))
    vals = [clean.double()] + ([triggered.double()] if triggered is not None else [])
    hi = max(float(v.max()) for v in vals if v.numel())
    bins = torch.linspace(0.0, max(hi, float(threshold)) * 1.05 + 1e-9, 41).tolist()
    ax.hist(clean.double().numpy(), bins=bins, alpha=0.6, label=f"clean ({clean.numel()})", density=True)
    if triggered is not None:
        ax.hist(triggered.double().numpy(), bins=bins, alpha=0.6, label=f"triggered ({triggered.numel()})", density=True)
    ax.axvline(threshold, color="k", ls="--", lw=0.8, label=f"threshold {threshold:.3f}")
    ax.set_xlabel("mean entropy of the blends (bits)")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return save_figure(fig, Path(path))
