"""BPDA makes a gradient attack work through a non-differentiable preprocessor."""

import pytest
import torch

import robustkit
from robustkit.attacks import BPDA, PGD, with_bpda
from robustkit.defenses import Quantize
from robustkit.errors import InputError
from robustkit.eval import robust_accuracy


def test_quantize_forward_and_zero_gradient():
    x = torch.tensor([[[[0.0, 0.26, 0.5, 1.0]]]], requires_grad=True)
    q = Quantize(bits=2)
    assert torch.allclose(q(x), torch.tensor([[[[0.0, 1 / 3, 2 / 3, 1.0]]]]))
    q(x).sum().backward()
    assert float(x.grad.abs().sum()) == 0  # the obfuscated gradient BPDA works around
    with pytest.raises(InputError):
        Quantize(bits=0)


def test_bpda_forward_equal_backward_identity():
    x = torch.rand(2, 1, 4, 4, requires_grad=True)
    b = BPDA(Quantize(3))
    assert torch.equal(b(x), Quantize(3)(x))
    b(x).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_bpda_attack_beats_plain_gradient(trained_cnn, digits_test_tensors):
    x, y = digits_test_tensors
    x, y = x[:128], y[:128]
    defended = robustkit.wrap(trained_cnn, Quantize(bits=3))
    assert not defended.differentiable
    atk = PGD(eps=0.1, steps=10, random_start=False, seed=0)
    plain = robust_accuracy(defended, atk, x, y, progress=False).robust_accuracy  # zero gradient: no progress
    bpda = robust_accuracy(with_bpda(defended), atk, x, y, progress=False).robust_accuracy
    assert bpda < plain - 0.3, (plain, bpda)


def test_evaluate_step_uses_bpda(tmp_path):
    report = robustkit.run({
        "name": "bpda", "device": "cpu", "data": {"name": "digits", "size": 16},
        "model": {"name": "small_cnn", "width": 8},
        "steps": [{"train": {"epochs": 2}},
                  {"evaluate": {"n_samples": 32, "defenses": [{"label": "q", "preprocessors": [{"name": "quantize", "bits": 3}]}],
                                "attacks": [{"name": "pgd", "eps": 0.1, "steps": 3}]}}],
    }, out_dir=tmp_path, progress=False, log=None)
    row = report.table("Clean and robust accuracy").rows[1]
    assert row["gradient"] == "BPDA" and row["adaptive"] is True
