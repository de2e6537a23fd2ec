"""Randomized-smoothing certificates (Cohen, Rosenfeld and Kolter, ICML 2019) for noise defenses.

A :class:`~robustkit.wrap.Defended` whose first preprocessor is Gaussian noise ``N(0, sigma^2 I)``
is, read as a majority vote over its noise, the *smoothed classifier*

    g(x) = argmax_c P(f(x + delta) = c),   delta ~ N(0, sigma^2 I),

whose *base classifier* ``f`` is everything after the noise: the clip to [0, 1] that
:class:`~robustkit.preprocessing.GaussianNoise` applies, any deterministic preprocessor after it
(the bilateral filter of ``noise_bilateral``) and the model. Cohen et al. prove that if
``P(f(x + delta) = c_A) >= p_A > 1/2`` then ``g`` predicts ``c_A`` on the whole L2 ball of radius
``sigma * Phi^-1(p_A)`` around ``x``, whatever ``f`` is. :func:`certify` runs their CERTIFY
(``n0`` selection draws pick ``c_A``; ``n`` further draws give a one-sided Clopper-Pearson lower
bound ``p_A`` at level ``1 - alpha``; abstain if ``p_A <= 1/2``) and :func:`predict_smoothed`
their PREDICT (a two-sided binomial test between the two top counts; abstain if its p-value
exceeds ``alpha``).

Clipping. GaussianNoise computes ``clip(x + delta, 0, 1)``. The guarantee is about noise *added*
to ``x``; the clip is a deterministic function applied afterwards, so it is part of ``f`` and the
certificate holds unchanged (as it does for the bilateral filter after it). What the guarantee
does not cover is a deterministic transform *before* the noise (its output, not ``x``, would be
what the radius is about), nor a second random part after the noise (then ``f`` is not a
function); both are refused with an :class:`~robustkit.errors.InputError`.

The certificate is for ``g``, the majority vote, not for a single noisy forward pass of the
defended model: a radius ``r`` means no perturbation of L2 norm below ``r`` changes ``g``'s
prediction, with probability at least ``1 - alpha`` over the sampling (per image).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from ..inference import eval_mode
from ..preprocessing.compose import Compose
from ..preprocessing.noise import GaussianNoise
from ..utils import model_device, progress_bar
from ..validation import check_images, check_labels
from ..wrap import Defended

ABSTAIN = -1


# ----------------------------------------------------------------------------- statistics
def clopper_pearson_lower(k: int, n: int, alpha: float) -> float:
    """One-sided ``1 - alpha`` Clopper-Pearson lower confidence bound on a binomial proportion.

    The ``p`` with ``P(Bin(n, p) >= k) = alpha``, i.e. the ``alpha`` quantile of
    ``Beta(k, n - k + 1)``; 0 when ``k == 0``. (Cohen et al.'s ``proportion_confint(k, n,
    alpha=2 * alpha, method="beta")[0]``.) For ``k == n`` it is ``alpha ** (1 / n)``.
    """
    _check_alpha(alpha)
    if not (isinstance(n, (int, np.integer)) and n >= 1 and 0 <= k <= n):
        raise InputError(f"need integers 0 <= k <= n, n >= 1; got k={k!r}, n={n!r}")
    if k == 0:
        return 0.0
    from scipy.stats import beta

    return float(beta.ppf(alpha, k, n - k + 1))


def certified_radius(p_lower: float, sigma: float) -> float:
    """``sigma * Phi^-1(p_lower)`` for ``p_lower > 1/2``, else 0 (the classifier abstains)."""
    if p_lower <= 0.5:
        return 0.0
    from scipy.stats import norm

    return float(sigma * norm.ppf(p_lower))


def binomial_p_value(n_a: int, n_b: int) -> float:
    """Two-sided binomial test of ``n_a`` successes in ``n_a + n_b`` trials against p = 1/2."""
    if n_a + n_b == 0:
        return 1.0
    from scipy.stats import binomtest

    return float(binomtest(int(n_a), int(n_a + n_b), 0.5).pvalue)


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (0.0 < float(alpha) < 1.0):
        raise InputError(f"alpha must be a number in (0, 1), got {alpha!r}")
    return float(alpha)


def _check_count(v: Any, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise InputError(f"{name} must be an integer >= 1, got {v!r}")
    return int(v)


# ----------------------------------------------------------------------------- the smoothed model
def _flatten(mods: Iterable[nn.Module]) -> list[nn.Module]:
    out: list[nn.Module] = []
    for m in mods:
        if isinstance(m, (Compose, nn.Sequential)):
            out.extend(_flatten(m))
        else:
            out.append(m)
    return out


def _name(m: nn.Module) -> str:
    return type(m).__name__


def split_smoothing(preprocessors: Sequence[nn.Module]) -> tuple[GaussianNoise, list[nn.Module]]:
    """``(noise, rest)``: the leading Gaussian noise and the deterministic parts after it.

    ``InputError`` unless the first preprocessor (after flattening :class:`Compose` /
    ``noise_bilateral``) is a :class:`GaussianNoise` with ``sigma > 0`` and no later part is
    randomized.
    """
    parts = _flatten(preprocessors)
    chain = " -> ".join(_name(p) for p in parts) or "no preprocessors"
    hint = ("certify needs a defense whose first preprocessor is Gaussian noise (gaussian_noise, or "
            "noise_bilateral / a compose starting with it), followed only by deterministic parts")
    if not any(isinstance(p, GaussianNoise) for p in parts):
        raise InputError(f"{hint}; this defense has no Gaussian noise ({chain})")
    first = parts[0]
    if not isinstance(first, GaussianNoise):
        if getattr(first, "randomized", False):
            raise InputError(f"{hint}; its first randomized part is {_name(first)}, not Gaussian noise ({chain})")
        raise InputError(f"{hint}; {_name(first)} runs before the noise, so a certificate would be about its "
                         f"output, not the input ({chain})")
    for p in parts[1:]:
        if getattr(p, "randomized", False):
            raise InputError(f"{hint}; {_name(p)} after the noise is randomized too, so the base classifier is "
                             f"not a function of the noisy image ({chain})")
    if first.sigma <= 0:
        raise InputError(f"the Gaussian noise has sigma = {first.sigma}: no smoothing, nothing to certify")
    return first, list(parts[1:])


@dataclass
class SmoothedClassifier:
    """``g(x) = argmax_c P(f(x + N(0, sigma^2 I)) = c)`` with ``f = model(rest(clip(.)))``."""

    base: nn.Module  # rest of the preprocessing, then the model (deterministic)
    sigma: float
    clip: bool = True
    description: str = ""

    @classmethod
    def from_defended(cls, defended: nn.Module, sigma: float | None = None) -> SmoothedClassifier:
        """From a :class:`Defended` starting with Gaussian noise, or from a plain model and ``sigma``
        (Gaussian smoothing of the model, noise clipped to [0, 1] as GaussianNoise does)."""
        if isinstance(defended, SmoothedClassifier):
            return defended
        if not isinstance(defended, nn.Module):
            raise InputError(f"expected a Defended model or an nn.Module, got {type(defended).__name__}")
        if isinstance(defended, Defended):
            if sigma is not None:
                raise InputError("sigma is taken from the defense's Gaussian noise; do not pass sigma= with a Defended")
            noise, rest = split_smoothing(list(defended.preprocess))
            desc = " -> ".join(["GaussianNoise"] + [_name(p) for p in rest] + ["model"])
            return cls(nn.Sequential(*rest, defended.model), noise.sigma, noise.clip, desc)
        if sigma is None:
            raise InputError("certify needs a Defended whose first preprocessor is Gaussian noise, or a plain "
                             "model with sigma= (Gaussian smoothing of the model)")
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not (math.isfinite(sigma) and sigma > 0):
            raise InputError(f"sigma must be a finite number > 0, got {sigma!r}")
        return cls(defended, float(sigma), True, "GaussianNoise -> model")

    def counts(self, x: torch.Tensor, num: int, batch_size: int, generator: torch.Generator,
               num_classes: int | None = None) -> torch.Tensor:
        """Class counts of ``f`` over ``num`` noisy copies of one image ``x`` (C x H x W)."""
        out: torch.Tensor | None = None
        done = 0
        with torch.no_grad():
            while done < num:
                b = min(batch_size, num - done)
                batch = x.unsqueeze(0).expand(b, *x.shape)
                noise = torch.randn(batch.shape, generator=generator, device=x.device, dtype=x.dtype)
                z = batch + self.sigma * noise
                if self.clip:
                    z = z.clamp(0.0, 1.0)
                logits = self.base(z)
                if logits.dim() != 2:
                    raise InputError(f"the model must return N x num_classes logits, got shape {tuple(logits.shape)}")
                k = num_classes or logits.shape[1]
                c = torch.bincount(logits.argmax(1).cpu(), minlength=k)
                out = c if out is None else out + c
                done += b
        assert out is not None
        return out


# ----------------------------------------------------------------------------- results
@dataclass
class CertifyResult:
    """Per-image outcome of CERTIFY. ``predictions`` is ``-1`` where it abstained (radius 0)."""

    labels: torch.Tensor
    predictions: torch.Tensor
    radii: torch.Tensor
    p_lower: torch.Tensor
    counts: torch.Tensor  # draws (out of n) that gave the selected class
    sigma: float
    n0: int
    n: int
    alpha: float
    seed: int | None
    seconds: float = 0.0
    base: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def abstained(self) -> torch.Tensor:
        return self.predictions == ABSTAIN

    @property
    def correct(self) -> torch.Tensor:
        """Certified and right (abstentions count as wrong)."""
        return (self.predictions == self.labels) & ~self.abstained

    @property
    def abstention_rate(self) -> float:
        return float(self.abstained.float().mean()) if len(self.labels) else float("nan")

    def certified_accuracy(self, radii: float | Sequence[float]) -> Any:
        """Fraction of images predicted correctly with a certified radius >= r (a float per r).

        At r = 0 this is the accuracy of CERTIFY's non-abstaining predictions.
        """
        single = isinstance(radii, (int, float))
        rs = [float(radii)] if single else [float(r) for r in radii]
        ok = self.correct
        acc = [float((ok & (self.radii >= r)).float().mean()) if len(ok) else float("nan") for r in rs]
        return acc[0] if single else acc

    def table(self, radii: Sequence[float]) -> list[dict[str, Any]]:
        return [{"radius": float(r), "certified_accuracy": a} for r, a in zip(radii, self.certified_accuracy(radii))]

    def summary(self) -> dict[str, Any]:
        ok = self.correct
        return {"images": len(self.labels), "sigma": self.sigma, "n0": self.n0, "n": self.n, "alpha": self.alpha,
                "abstention_rate": self.abstention_rate, "certified_clean_accuracy": self.certified_accuracy(0.0),
                "median_radius_correct": float(self.radii[ok].median()) if ok.any() else 0.0,
                "seconds": self.seconds}


@dataclass
class SmoothedPrediction:
    """Per-image outcome of PREDICT (``-1``: abstained) and the binomial test's p-values."""

    labels: torch.Tensor
    predictions: torch.Tensor
    p_values: torch.Tensor
    n: int
    alpha: float
    seconds: float = 0.0

    @property
    def accuracy(self) -> float:
        return float((self.predictions == self.labels).float().mean()) if len(self.labels) else float("nan")

    @property
    def abstention_rate(self) -> float:
        return float((self.predictions == ABSTAIN).float().mean()) if len(self.labels) else float("nan")


# ----------------------------------------------------------------------------- CERTIFY / PREDICT
def _prepare(defended: nn.Module, x: Any, y: Any, sigma: float | None, batch_size: int, seed: int | None):
    smooth = SmoothedClassifier.from_defended(defended, sigma)
    x = check_images(x, "x")
    y = check_labels(y, x.shape[0], "y")
    _check_count(batch_size, "batch_size")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
        raise InputError(f"seed must be an integer or None, got {seed!r}")
    device = model_device(smooth.base)
    return smooth, x.to(device), y.cpu(), device


def _generator(device: torch.device, seed: int | None, i: int) -> torch.Generator:
    """Image ``i`` draws from its own stream ``seed + i``: its result does not depend on the others."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed) + i)
    return g


def certify(
    defended: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    n0: int = 100,
    n: int = 10_000,
    alpha: float = 0.001,
    batch_size: int = 1000,
    sigma: float | None = None,
    seed: int | None = 0,
    progress: bool = True,
    desc: str = "certify",
) -> CertifyResult:
    """Cohen et al.'s CERTIFY for every image of ``x`` (N x C x H x W in [0, 1]) against labels ``y``.

    ``defended``: a :class:`~robustkit.wrap.Defended` whose first preprocessor is Gaussian noise
    (``gaussian_noise``, ``noise_bilateral`` or a ``compose`` starting with it) followed only by
    deterministic parts: sigma is the noise's; or a plain model with ``sigma=`` (Gaussian
    smoothing of the model). Per image: ``n0`` draws select the top class ``c_A``, ``n`` fresh draws
    count it, ``p_A`` is the one-sided Clopper-Pearson lower bound at level ``1 - alpha``; the image
    is certified with L2 radius ``sigma * Phi^-1(p_A)`` if ``p_A > 1/2``, else CERTIFY abstains.

    Noise is drawn by this function (``N(0, sigma^2)``, added to ``x``, clipped to [0, 1] when the
    GaussianNoise clips - the clip is deterministic post-processing, part of the base classifier,
    so the guarantee holds), then the rest of the pipeline runs in eval mode. ``batch_size`` noisy
    copies go through one forward. Image ``i`` uses a generator seeded ``seed + i`` (``None``:
    nondeterministic), so a seed fixes the result. The defense's own generator and torch's global
    RNG are not touched.
    """
    smooth, x, y, device = _prepare(defended, x, y, sigma, batch_size, seed)
    n0, n = _check_count(n0, "n0"), _check_count(n, "n")
    alpha = _check_alpha(alpha)
    N = x.shape[0]
    preds = torch.full((N,), ABSTAIN, dtype=torch.long)
    radii = torch.zeros(N, dtype=torch.float64)
    p_low = torch.zeros(N, dtype=torch.float64)
    counts = torch.zeros(N, dtype=torch.long)
    t0 = time.perf_counter()
    bar = progress_bar(N * (n0 + n), desc, progress, unit="draw")
    try:
        with eval_mode(smooth.base):
            for i in range(N):
                gen = _generator(device, seed, i)
                c0 = smooth.counts(x[i], n0, batch_size, gen)
                c_a = int(c0.argmax())
                bar.update(n0)
                c = smooth.counts(x[i], n, batch_size, gen, num_classes=c0.shape[0])
                bar.update(n)
                k = int(c[c_a])
                pl = clopper_pearson_lower(k, n, alpha)
                counts[i], p_low[i] = k, pl
                if pl > 0.5:
                    preds[i] = c_a
                    radii[i] = certified_radius(pl, smooth.sigma)
    finally:
        bar.close()
    return CertifyResult(y, preds, radii, p_low, counts, smooth.sigma, n0, n, alpha, seed,
                         time.perf_counter() - t0, smooth.description)


def predict_smoothed(
    defended: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    n: int = 1000,
    alpha: float = 0.001,
    batch_size: int = 1000,
    sigma: float | None = None,
    seed: int | None = 0,
    progress: bool = True,
    desc: str = "predict",
) -> SmoothedPrediction:
    """Cohen et al.'s PREDICT: ``n`` draws, a two-sided binomial test between the two top counts;
    the top class if its p-value is <= ``alpha``, else abstain (``-1``). With probability at least
    ``1 - alpha`` a non-abstaining answer is ``g(x)``. Same model rules and seeding as :func:`certify`
    (image ``i`` uses ``seed + i``); ``y`` is optional (for :attr:`SmoothedPrediction.accuracy`)."""
    if y is None:
        y = torch.zeros(len(x) if hasattr(x, "__len__") else 0, dtype=torch.long)
    smooth, x, y, device = _prepare(defended, x, y, sigma, batch_size, seed)
    n = _check_count(n, "n")
    alpha = _check_alpha(alpha)
    N = x.shape[0]
    preds = torch.full((N,), ABSTAIN, dtype=torch.long)
    pvals = torch.ones(N, dtype=torch.float64)
    t0 = time.perf_counter()
    bar = progress_bar(N * n, desc, progress, unit="draw")
    try:
        with eval_mode(smooth.base):
            for i in range(N):
                c = smooth.counts(x[i], n, batch_size, _generator(device, seed, i))
                bar.update(n)
                top = torch.topk(c, min(2, c.shape[0]))
                n_a = int(top.values[0])
                n_b = int(top.values[1]) if c.shape[0] > 1 else 0
                pvals[i] = binomial_p_value(n_a, n_b)
                if pvals[i] <= alpha:
                    preds[i] = int(top.indices[0])
    finally:
        bar.close()
    return SmoothedPrediction(y, preds, pvals, n, alpha, time.perf_counter() - t0)


def smoothed_vote(
    defended: nn.Module,
    x: torch.Tensor,
    *,
    n: int = 100,
    batch_size: int = 1000,
    sigma: float | None = None,
    seed: int | None = 0,
) -> torch.Tensor:
    """The Monte Carlo majority vote of ``n`` draws per image (no test, no abstention): an estimate
    of ``g(x)``, e.g. to score adversarial examples against the smoothed classifier itself."""
    y = torch.zeros(len(x) if hasattr(x, "__len__") else 0, dtype=torch.long)
    smooth, x, _, device = _prepare(defended, x, y, sigma, batch_size, seed)
    n = _check_count(n, "n")
    out = torch.empty(x.shape[0], dtype=torch.long)
    with eval_mode(smooth.base):
        for i in range(x.shape[0]):
            out[i] = int(smooth.counts(x[i], n, batch_size, _generator(device, seed, i)).argmax())
    return out


# ----------------------------------------------------------------------------- plot
def certified_accuracy_plot(
    results: dict[str, CertifyResult],
    path: str | Path,
    empirical: dict[str, Any] | None = None,
    title: str = "Certified accuracy vs. L2 radius",
) -> Path:
    """Certified accuracy against the L2 radius (solid, one line per defense) and, when given,
    accuracies an attack leaves at a few radii (dashed / dotted, the defense's colour).

    ``empirical`` maps a defense label to ``[(radius, accuracy), ...]`` or to
    ``{series name: [(radius, accuracy), ...]}`` (several attack readings per defense).
    """
    from .plots import plt, save_figure

    series: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for label, v in (empirical or {}).items():
        series[label] = dict(v) if isinstance(v, dict) else {"attack": list(v)}
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    top = max([float(r.radii.max()) if len(r.radii) else 0.0 for r in results.values()] +
              [p[0] for d in series.values() for pts in d.values() for p in pts] + [0.5])
    grid = np.linspace(0.0, top * 1.05, 200)
    styles = ["o--", "s:", "^-."]
    for i, (label, res) in enumerate(results.items()):
        color = f"C{i}"
        ax.plot(grid, [100 * a for a in res.certified_accuracy(list(grid))], "-", color=color,
                label=f"{label}: certified (sigma={res.sigma:g})")
        for j, (name, pts) in enumerate(series.get(label, {}).items()):
            pts = sorted(pts)
            if pts:
                ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], styles[j % len(styles)], color=color,
                        label=f"{label}: {name}")
    ax.set_xlabel("L2 radius")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    return save_figure(fig, path)


__all__ = ["ABSTAIN", "CertifyResult", "SmoothedClassifier", "SmoothedPrediction", "binomial_p_value",
           "certified_accuracy_plot", "certified_radius", "certify", "clopper_pearson_lower", "predict_smoothed",
           "smoothed_vote", "split_smoothing"]
