"""IBM ART's ActivationDefence and SpectralSignatureDefense run on robustkit's features (benchmark-only peer).

ART is not a robustkit dependency: ``pip install adversarial-robustness-toolbox``. Both ART
defenses read "the activations of the classifier's last layer"; they are given an ART
``PyTorchClassifier`` around ``nn.Sequential(Identity, Identity)`` whose input *is* the feature
matrix robustkit's filters use (the victim's penultimate features), so the two libraries see
exactly the same numbers and only the algorithms differ. ART's own defaults are kept
(ActivationDefence: FastICA to 10 dimensions, 2-means, the smaller cluster is poisoned;
SpectralSignatureDefense: ``eps_multiplier`` 1.5 with the expected poisoning rate).
"""

from __future__ import annotations

import numpy as np


def available() -> bool:
    try:
        import art  # noqa: F401
    except ImportError:
        return False
    return True


def _feature_classifier(dim: int, num_classes: int):
    import torch
    from art.estimators.classification import PyTorchClassifier

    model = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Identity())
    return PyTorchClassifier(model=model, loss=torch.nn.CrossEntropyLoss(), input_shape=(dim,), nb_classes=num_classes)


def _onehot(y: np.ndarray, k: int) -> np.ndarray:
    out = np.zeros((len(y), k), dtype=np.float32)
    out[np.arange(len(y)), y] = 1
    return out


def activation_defence(features: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """ART's ActivationDefence: ``flagged`` mask (ART gives no per-sample score)."""
    from art.defences.detector.poison import ActivationDefence

    f = features.astype(np.float32)
    defence = ActivationDefence(_feature_classifier(f.shape[1], num_classes), f, _onehot(labels, num_classes))
    _, is_clean = defence.detect_poison(nb_clusters=2, nb_dims=10, reduce="FastICA")
    return {"flagged": np.asarray(is_clean) == 0, "scores": None}


def spectral_signature(features: np.ndarray, labels: np.ndarray, num_classes: int, expected_rate: float) -> dict:
    """ART's SpectralSignatureDefense: ``flagged`` mask and its raw per-sample scores
    (``|<r_i, v>|``, uncentred ``r_i``; ART returns them only for flagged samples, so every
    sample's score is recomputed with ART's own ``spectral_signature_scores`` per class)."""
    from art.defences.detector.poison import SpectralSignatureDefense

    f = features.astype(np.float32)
    defence = SpectralSignatureDefense(_feature_classifier(f.shape[1], num_classes), f, _onehot(labels, num_classes),
                                       expected_pp_poison=expected_rate, batch_size=256, eps_multiplier=1.5)
    _, is_clean = defence.detect_poison()
    scores = np.zeros(len(labels))
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        scores[idx] = SpectralSignatureDefense.spectral_signature_scores(f[idx]).ravel()
    return {"flagged": np.asarray(is_clean) == 0, "scores": scores}
