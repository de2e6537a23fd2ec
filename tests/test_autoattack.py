"""AutoAttack through the real package (pyautoattack), and the upstream-API shim robustbench needs."""

import sys

import pytest
import torch

import robustkit
from robustkit.attacks import PGD, AutoAttack, install_upstream_shim
from robustkit.defenses import GaussianNoise
from robustkit.errors import InputError
from robustkit.eval import robust_accuracy


def test_apgd_at_least_as_strong_as_pgd_and_in_bounds(trained_cnn, digits_test_tensors):
    x, y = digits_test_tensors
    x, y = x[:96], y[:96]
    eps = 0.04
    pgd = robust_accuracy(trained_cnn, PGD(eps=eps, steps=10, seed=0), x, y, progress=False)
    aa = robust_accuracy(trained_cnn, AutoAttack(eps=eps, version="custom", attacks=["apgd-ce", "apgd-t"], n_iter=25),
                         x, y, keep_adversarials=True, progress=False)
    assert aa.clean_accuracy == pytest.approx(pgd.clean_accuracy)
    assert aa.robust_accuracy < aa.clean_accuracy - 0.2
    assert aa.robust_accuracy <= pgd.robust_accuracy + 0.02
    delta = (aa.x_adv - x).flatten(1).abs().amax(1)
    assert float(delta.max()) <= eps + 1e-6 and float(aa.x_adv.min()) >= 0 and float(aa.x_adv.max()) <= 1


@pytest.mark.slow
def test_standard_version_runs_l2(trained_cnn, digits_test_tensors):
    x, y = digits_test_tensors
    res = robust_accuracy(trained_cnn, AutoAttack(eps=0.5, norm="l2", n_iter=10), x[:24], y[:24], progress=False)
    assert res.robust_accuracy < res.clean_accuracy


def test_rand_version_on_randomized_defense(trained_cnn, digits_test_tensors):
    x, y = digits_test_tensors
    defended = robustkit.wrap(trained_cnn, GaussianNoise(0.1, seed=0))
    atk = AutoAttack(eps=0.05, version="rand", n_iter=5)
    assert atk.eot_samples == 20  # counts as adaptive for a randomized defense
    res = robust_accuracy(defended, atk, x[:32], y[:32], progress=False)
    assert 0 <= res.robust_accuracy <= res.clean_accuracy


@pytest.mark.parametrize("kwargs,match", [
    ({"version": "fast"}, "version"),
    ({"version": "custom"}, "non-empty attacks"),
    ({"version": "custom", "attacks": ["apgd-xx"]}, "unknown AutoAttack attack"),
    ({"attacks": ["apgd-ce"]}, "only used with version='custom'"),
    ({"norm": "l1"}, "norm"),
])
def test_bad_parameters(kwargs, match):
    with pytest.raises(InputError, match=match):
        AutoAttack(**kwargs)


def test_registry_and_yaml_spec():
    atk = robustkit.ATTACKS.build({"name": "autoattack", "eps": "8/255", "version": "rand"})
    assert isinstance(atk, AutoAttack) and atk.eps == pytest.approx(8 / 255)


def test_upstream_shim_lets_robustbench_import(trained_cnn, digits_test_tensors, tmp_path):
    mod = install_upstream_shim()
    import autoattack

    assert autoattack is mod and hasattr(autoattack.state, "EvaluationState")
    x, y = digits_test_tensors
    adversary = autoattack.AutoAttack(trained_cnn, norm="Linf", eps=0.04, version="custom",
                                      attacks_to_run=["apgd-ce"], device="cpu", log_path=str(tmp_path / "aa.log"))
    adversary.apgd.n_iter = 10
    x_adv = adversary.run_standard_evaluation(x[:16], y[:16], bs=8)
    assert x_adv.shape == x[:16].shape
    x_adv2, labels = adversary.run_standard_evaluation(x[:16], y[:16], bs=8, return_labels=True)
    assert labels.shape == (16,)
    import robustbench.eval  # imports `autoattack` and `autoattack.state`

    assert callable(robustbench.eval.benchmark)


@pytest.mark.slow
def test_robustbench_benchmark_runs_on_a_defended_model(monkeypatch):
    """robustbench.eval.benchmark (AutoAttack 'standard' inside) runs unchanged on a wrapped model.

    CIFAR-10 cannot be downloaded here, so robustbench's loader is replaced by 3-channel digits;
    everything after it (the AutoAttack calls through the shim, the accuracy) is robustbench's own.
    """
    install_upstream_shim()
    import robustbench.eval as rbe
    from robustkit.data import digits, to_tensors
    from robustkit.models import SmallCNN

    data = digits(size=32, channels=3)
    torch.manual_seed(0)
    net = SmallCNN(in_channels=3, num_classes=10, width=8)
    robustkit.train_classifier(net, data.train, epochs=2, progress=False)
    x, y = to_tensors(data.test, max_samples=8)
    monkeypatch.setattr(rbe, "load_clean_dataset", lambda *a, **k: (x, y))
    defended = robustkit.wrap(net, "bilateral").eval()
    clean, robust = rbe.benchmark(defended, n_examples=8, dataset="cifar10", threat_model="Linf", eps=8 / 255,
                                  device=torch.device("cpu"), batch_size=8)
    assert 0 <= robust <= clean <= 1
