import pytest
import torch
import yaml

import robustkit
from robustkit.defenses import BilateralFilter, GaussianNoise, NoiseBilateral
from robustkit.errors import ConfigError, InputError
from robustkit.kernels import bilateral_filter


def test_registered_and_built_from_yaml():
    spec = yaml.safe_load("""
    - name: noise_bilateral
      sigma: 0.1
      kernel_size: 7
      sigma_color: 0.2
      iterations: 3
      train_iterations: 1
      seed: 5
    - {name: bilateral, window: square, distance: l2}
    """)
    nb, bf = (robustkit.PREPROCESSORS.build(s) for s in spec)
    assert isinstance(nb, NoiseBilateral) and nb.sigma == 0.1 and nb.filter.kernel_size == 7
    assert (nb.filter.train_iterations, nb.filter.iterations) == (1, 3)
    assert isinstance(bf, BilateralFilter) and bf.window == "square"
    assert nb.randomized and not bf.randomized and nb.differentiable and bf.differentiable


def test_noise_then_filter_order_and_seed():
    x = torch.rand(2, 3, 16, 16)
    nb = NoiseBilateral(sigma=0.1, seed=3).eval()
    out = nb(x)
    noise = GaussianNoise(0.1, seed=3)(x)  # same stream: same noise draw
    expected = bilateral_filter(noise, 5, 0.1, 1.5)
    assert torch.allclose(out, expected, atol=1e-6)
    reverse = GaussianNoise(0.1, seed=3)(bilateral_filter(x, 5, 0.1, 1.5))
    assert not torch.allclose(out, reverse, atol=1e-3)  # the two do not commute
    assert torch.equal(NoiseBilateral(sigma=0.1, seed=3).eval()(x), out)


def test_train_and_eval_iterations():
    x = torch.rand(1, 1, 12, 12)
    f = BilateralFilter(iterations=3, train_iterations=1)
    f.train()
    assert torch.allclose(f(x), bilateral_filter(x, 5, 0.1, 1.5, iterations=1))
    f.eval()
    assert torch.allclose(f(x), bilateral_filter(x, 5, 0.1, 1.5, iterations=3))
    # wrapping in eval mode propagates
    d = robustkit.wrap(torch.nn.Flatten(), f).eval()
    assert torch.allclose(d(x), bilateral_filter(x, 5, 0.1, 1.5, iterations=3).flatten(1))


def test_gradient_flows_through_defense():
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    NoiseBilateral(seed=0)(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and float(x.grad.abs().sum()) > 0


@pytest.mark.parametrize("kwargs,match", [
    ({"kernel_size": 4}, "odd"),
    ({"sigma_color": 0}, "sigma_color"),
    ({"iterations": -1}, "iterations"),
    ({"distance": "cosine"}, "distance"),
])
def test_bad_parameters(kwargs, match):
    with pytest.raises(InputError, match=match):
        BilateralFilter(**kwargs)


def test_bad_parameters_from_config_name_the_key():
    with pytest.raises(ConfigError, match="sigma_colour.*Did you mean 'sigma_color'"):
        robustkit.PREPROCESSORS.build({"name": "bilateral", "sigma_colour": 0.1})


def test_eot_attack_is_stronger_on_randomized_defense(trained_cnn, digits_test_tensors):
    """A randomized defense looks more robust to plain PGD than to EOT-PGD (adaptive)."""
    from robustkit.attacks import PGD
    from robustkit.eval import robust_accuracy

    x, y = digits_test_tensors
    x, y = x[:200], y[:200]
    defended = robustkit.wrap(trained_cnn, GaussianNoise(0.3, seed=0))
    plain = robust_accuracy(defended, PGD(eps=0.1, steps=10, seed=0), x, y, progress=False).robust_accuracy
    eot = robust_accuracy(defended, PGD(eps=0.1, steps=10, eot_samples=8, seed=0), x, y, progress=False).robust_accuracy
    assert eot < plain, (plain, eot)
