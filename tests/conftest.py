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
