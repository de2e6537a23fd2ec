"""Shared pieces of the data filters: 2-component GMMs, lower-tail flagging, penultimate features,
ordered loaders, hooks and parameter checks."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..base import ResultDetails
from ..errors import InputError
from ..inference import eval_mode
from ..models.introspect import get_classifier
from ..utils import model_device, progress_bar


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


def positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_seed(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise InputError(f"seed must be an integer >= 0, got {value!r}")
    return int(value)


@contextlib.contextmanager
def hooked(pairs: list[tuple[nn.Module, Any]], pre: bool = False) -> Iterator[None]:
    """Forward hooks (``pre=True``: forward pre-hooks) on ``(module, hook)`` pairs for the block."""
    handles = [(m.register_forward_pre_hook(h) if pre else m.register_forward_hook(h)) for m, h in pairs]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def ordered_loader(dataset: Dataset, batch_size: int) -> DataLoader:
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise InputError("the data set to filter is empty")
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


@torch.no_grad()
def penultimate_features(model: nn.Module, dataset: Dataset, batch_size: int = 256,
                         progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N x D features, N labels)``: the input of the model's classification layer, and the data's labels."""
    try:
        head = get_classifier(model)
    except TypeError as exc:
        raise InputError(f"cannot find the classification layer of {type(model).__name__}: {exc}") from None
    feats: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []

    def grab(module: nn.Module, args: tuple) -> None:
        feats.append(args[0].detach().flatten(1).float().cpu())

    device = model_device(model)
    loader = ordered_loader(dataset, batch_size)
    with eval_mode(model), hooked([(head, grab)], pre=True):
        bar = progress_bar(len(loader), "features", progress, unit="batch")
        for x, y in loader:
            model(x.to(device))
            labels.append(torch.as_tensor(y).cpu())
            bar.update(1)
        bar.close()
    return torch.cat(feats), torch.cat(labels).long()


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


def per_class(labels: torch.Tensor) -> Iterator[tuple[int, np.ndarray]]:
    y = labels.numpy()
    for c in np.unique(y):
        yield int(c), np.flatnonzero(y == c)


@dataclass
class PerClassDetails(ResultDetails):
    """Details of the per-class feature filters: what was decided for each class, and how scores read."""

    per_class: dict[int, dict[str, Any]] = field(default_factory=dict)
    score: str = ""

    def tables(self) -> list[tuple[str, list[dict[str, Any]]]]:
        return [("Classes", [{"class": c, **v} for c, v in self.per_class.items()])]
