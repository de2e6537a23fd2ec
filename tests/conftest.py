"""Shared fixtures: real data (scikit-learn digits) and a small model trained on it once."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def digits16():
    """scikit-learn digits upsampled to 1x16x16, stratified 75/25 split."""
    from robustkit.data import digits

    return digits(size=16, channels=1, test_fraction=0.25, seed=0)


@pytest.fixture(scope="session")
def trained_cnn(digits16):
    """A SmallCNN trained for a few epochs on digits16 (test accuracy > 0.9)."""
    from robustkit.models import SmallCNN
    from robustkit.training import train_classifier

    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, num_classes=10, width=16)
    train_classifier(model, digits16.train, epochs=6, lr=0.05, batch_size=64, progress=False)
    return model.eval()


@pytest.fixture(scope="session")
def digits_test_tensors(digits16):
    from robustkit.data import to_tensors

    return to_tensors(digits16.test)


def train_victim(model, attack, train_data, test_data, rate: float = 0.1, min_asr: float = 0.9, **train_kw):
    """Poison ``train_data`` with ``attack`` at ``rate`` (seed 0), train ``model`` on it (the caller seeds torch
    before building the model) and check the backdoor took (ASR > ``min_asr``). Returns
    ``(model in eval mode, poisoned set, BackdoorMetrics)``."""
    from robustkit.backdoor.metrics import backdoor_metrics
    from robustkit.training import train

    poisoned = attack.poison(train_data, rate=rate, seed=0)
    train(model, poisoned, progress=False, **train_kw)
    metrics = backdoor_metrics(model, attack, test_data)
    assert metrics.asr > min_asr, f"the victim did not learn the backdoor: {metrics}"
    return model.eval(), poisoned, metrics


@pytest.fixture(scope="session")
def victim():
    """The shared victim-training helper (:func:`train_victim`) as a fixture."""
    return train_victim


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models: as fast on an idle machine, far faster on a shared one.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
