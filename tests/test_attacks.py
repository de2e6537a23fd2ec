import pytest
import torch
from torch import nn

from robustkit import ATTACKS, wrap
from robustkit.attacks import PGD
from robustkit.defenses import GaussianNoise
from robustkit.errors import ConfigError, InputError
from robustkit.eval import accuracy, robust_accuracy


@pytest.mark.parametrize("norm,eps", [("linf", 8 / 255), ("l2", 0.5)])
def test_pgd_stays_in_bounds(trained_cnn, digits_test_tensors, norm, eps):
    x, y = digits_test_tensors
    x, y = x[:64], y[:64]
    atk = PGD(eps=eps, norm=norm, steps=5, seed=0)
    x_adv = atk(trained_cnn, x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    delta = (x_adv - x).flatten(1)
    if norm == "linf":
        assert float(delta.abs().max()) <= eps + 1e-6
        # PGD-Linf pushes most pixels to the boundary of the ball (or of [0, 1])
    else:
        assert float(delta.norm(dim=1).max()) <= eps + 1e-5
    assert not x_adv.requires_grad


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 1.5)])
def test_pgd_lowers_accuracy_of_trained_model(trained_cnn, digits_test_tensors, norm, eps):
    x, y = digits_test_tensors
    clean = accuracy(trained_cnn, (x, y))
    assert clean > 0.9
    res = robust_accuracy(trained_cnn, PGD(eps=eps, norm=norm, steps=10, seed=0), x, y, progress=False)
    assert res.clean_accuracy == pytest.approx(clean)
    assert res.robust_accuracy < clean - 0.4, (clean, res.robust_accuracy)


def test_pgd_beats_random_noise_of_same_size(trained_cnn, digits_test_tensors):
    """A gradient attack must do far better than a random sign perturbation of equal norm."""
    x, y = digits_test_tensors
    eps = 0.1
    noise = (x + eps * torch.sign(torch.randn(x.shape, generator=torch.Generator().manual_seed(0)))).clamp(0, 1)
    acc_noise = accuracy(trained_cnn, (noise, y))
    acc_pgd = robust_accuracy(trained_cnn, PGD(eps=eps, steps=10, seed=0), x, y, progress=False).robust_accuracy
    assert acc_pgd < acc_noise - 0.3


def test_pgd_deterministic_with_seed(trained_cnn, digits_test_tensors):
    x, y = digits_test_tensors
    a = PGD(eps=0.05, steps=3, seed=1)(trained_cnn, x[:16], y[:16])
    b = PGD(eps=0.05, steps=3, seed=1)(trained_cnn, x[:16], y[:16])
    assert torch.equal(a, b)


def test_pgd_targeted_reaches_target(trained_cnn, digits_test_tensors):
    x, y = digits_test_tensors
    x, y = x[:64], y[:64]
    target = (y + 1) % 10
    x_adv = PGD(eps=0.3, steps=20, targeted=True, seed=0)(trained_cnn, x, target)
    with torch.no_grad():
        hit = (trained_cnn(x_adv).argmax(1) == target).float().mean()
    assert hit > 0.8


def test_restarts_never_worse(trained_cnn, digits_test_tensors):
    x, y = digits_test_tensors
    one = robust_accuracy(trained_cnn, PGD(eps=0.05, steps=3, seed=0), x, y, progress=False).robust_accuracy
    three = robust_accuracy(trained_cnn, PGD(eps=0.05, steps=3, restarts=3, seed=0), x, y, progress=False).robust_accuracy
    assert three <= one


def test_pgd_eps_zero_is_identity(trained_cnn, digits_test_tensors):
    x, y = digits_test_tensors
    assert torch.equal(PGD(eps=0.0)(trained_cnn, x[:4], y[:4]), x[:4])


def test_pgd_preserves_training_mode(trained_cnn, digits_test_tensors):
    x, y = digits_test_tensors
    trained_cnn.train()
    try:
        PGD(eps=0.01, steps=1)(trained_cnn, x[:4], y[:4])
        assert trained_cnn.training
    finally:
        trained_cnn.eval()


def test_eot_gradient_averages_over_randomness():
    """With EOT the gradient is the mean over noise draws; without, one noisy draw."""
    torch.manual_seed(0)
    model = wrap(nn.Sequential(nn.Flatten(), nn.Linear(16, 3)), GaussianNoise(0.3, clip=False, seed=0))
    x = torch.full((1, 1, 4, 4), 0.5)
    y = torch.tensor([0])
    g1 = PGD(eps=0.1, eot_samples=1).gradient(model, x, y)
    g_many = PGD(eps=0.1, eot_samples=200).gradient(model, x, y)
    # the linear model's input gradient depends on the softmax at the noisy point; averaging
    # many draws differs from a single draw but is close to another many-draw average
    g_many2 = PGD(eps=0.1, eot_samples=200).gradient(model, x, y)
    assert (g_many - g_many2).abs().max() < (g1 - g_many).abs().max()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"eps": -1}, "eps"),
        ({"norm": "l1"}, "norm"),
        ({"steps": 0}, "steps"),
        ({"restarts": 0}, "restarts"),
        ({"eot_samples": 0}, "eot_samples"),
    ],
)
def test_pgd_rejects_bad_params(kwargs, match):
    with pytest.raises(InputError, match=match):
        PGD(**kwargs)


def test_attack_rejects_bad_inputs(trained_cnn, digits_test_tensors):
    x, y = digits_test_tensors
    atk = PGD(eps=0.01, steps=1)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        atk(trained_cnn, x[:2] * 255, y[:2])
    with pytest.raises(InputError, match="labels"):
        atk(trained_cnn, x[:2], y[:3])
    with pytest.raises(InputError, match="integer"):
        atk(trained_cnn, x[:2], y[:2].float())


def test_pgd_from_registry_with_fraction():
    atk = ATTACKS.build({"name": "pgd", "eps": "8/255", "norm": "l2", "steps": 3})
    assert isinstance(atk, PGD) and atk.eps == pytest.approx(8 / 255) and atk.norm == "l2"
    with pytest.raises(ConfigError, match="steps: expected int"):
        ATTACKS.build({"name": "pgd", "steps": "many"})
