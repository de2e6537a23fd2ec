import contextlib

import pytest
import torch
import yaml

import robustkit
from robustkit.defenses import BilateralFilter, GaussianNoise, NoiseBilateral
from robustkit.errors import ConfigError, InputError
from robustkit.preprocessing.kernels import bilateral_filter


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
    ({"window": "hexagon"}, "window"),
    ({"sigma_space": -1.0}, "sigma_space"),
    ({"train_iterations": 1.5}, "train_iterations"),
    ({"backend": "opencl"}, "backend"),
])
def test_bad_parameters(kwargs, match):
    with pytest.raises(InputError, match=match):
        BilateralFilter(**kwargs)


def test_gaussian_noise_unchanged_and_seedable():
    x = torch.rand(4, 3, 8, 8)
    a = GaussianNoise(0.1, seed=1)(x)
    assert torch.equal(a, GaussianNoise(0.1, seed=1)(x)) and not torch.equal(a, GaussianNoise(0.1, seed=2)(x))
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    torch.manual_seed(0)
    expected = (x + 0.1 * torch.randn(x.shape)).clamp(0, 1)  # unseeded: the global stream
    torch.manual_seed(0)
    assert torch.equal(GaussianNoise(0.1)(x), expected)
    assert torch.equal(GaussianNoise(0.0)(x), x)


@pytest.mark.parametrize("make", [lambda: GaussianNoise(0.05, seed=0), lambda: robustkit.PREPROCESSORS.build("quantize", bits=4),
                                  lambda: NoiseBilateral(seed=0)], ids=["noise", "quantize", "noise_bilateral"])
def test_noise_and_quantize_validate_input(make):
    """Issue #12: 0..255 data came back as an all-ones image and NaN passed through."""
    pre = make()
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(InputError, match=r"values in \[0, 1\].*max"):
        pre(x * 255)
    with pytest.raises(InputError, match="NaN"):
        pre(torch.full((1, 3, 8, 8), float("nan")))
    with pytest.raises(InputError, match="floating-point"):
        pre((x * 255).to(torch.uint8))
    with pytest.raises(InputError, match="N x C x H x W"):
        pre(x[0])


def test_gaussian_noise_function_validates_sigma_and_input():
    from robustkit.preprocessing import gaussian_noise

    x = torch.rand(2, 1, 4, 4)
    with pytest.raises(InputError, match="NaN"):
        gaussian_noise(x.clone().fill_(float("nan")), 0.1)
    with pytest.raises(InputError, match="sigma must be finite"):
        gaussian_noise(x, torch.tensor([0.1, float("nan")]))
    with pytest.raises(InputError, match="one value per sample"):
        gaussian_noise(x, torch.tensor([0.1, 0.2, 0.3]))


def test_noise_bilateral_a_b_schedule_and_reseed():
    x = torch.rand(2, 3, 10, 10)
    nb = robustkit.PREPROCESSORS.build({"name": "noise_bilateral", "iterations": 4, "train_iterations": 2, "seed": 7})
    noisy = GaussianNoise(nb.sigma, seed=7)(x)
    nb.train()
    assert torch.allclose(nb(x), bilateral_filter(noisy, 5, 0.1, 1.5, iterations=2), atol=1e-6)
    nb.reseed(7).eval()
    assert torch.allclose(nb(x), bilateral_filter(noisy, 5, 0.1, 1.5, iterations=4), atol=1e-6)
    assert not torch.equal(nb(x), nb(x))  # a fresh draw each call
    assert "iterations=2/4" in repr(nb)


def test_defaults_are_sane_for_32px_images():
    """Our defaults (not the paper's, which are unpublished) smooth noise but keep the image."""
    from robustkit.data.digits import load_digit_images

    with one_thread():
        x = load_digit_images(32, 3)[0][:16]
    f = BilateralFilter().eval()
    assert (f.kernel_size, f.sigma_color, f.sigma_space, NoiseBilateral().sigma) == (5, 0.1, 1.5, 0.05)
    noisy = GaussianNoise(0.05, seed=0)(x)
    assert float((f(noisy) - x).square().mean()) < float((noisy - x).square().mean())  # denoises
    assert float((f(x) - x).abs().mean()) < 0.05  # and leaves a clean image mostly alone


def test_bad_parameters_from_config_name_the_key():
    with pytest.raises(ConfigError, match="sigma_colour.*Did you mean 'sigma_color'"):
        robustkit.PREPROCESSORS.build({"name": "bilateral", "sigma_colour": 0.1})


@contextlib.contextmanager
def one_thread():
    """Tiny tensors: one thread avoids thread-pool round trips (very slow on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def digits_mlp():
    """A small MLP trained in about a second on the real 8x8 digits (about 90% test accuracy)."""
    from robustkit.data.digits import load_digit_images

    torch.manual_seed(0)
    x, y = load_digit_images(8, 1)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with one_thread():
        for _ in range(300):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[:1400]), y[:1400]).backward()
            opt.step()
    return model.eval(), x[1400:1700], y[1400:1700]


def test_eot_attack_is_stronger_on_randomized_defense(digits_mlp):
    """NoiseBilateral is randomized: EOT-PGD (adaptive) beats plain PGD, which a single noise draw misleads."""
    from robustkit.attacks import PGD
    from robustkit.eval import robust_accuracy

    model, x, y = digits_mlp
    defended = robustkit.wrap(model, NoiseBilateral(sigma=0.3, seed=0))
    with one_thread():
        clean = robust_accuracy(defended, None, x, y, progress=False).robust_accuracy
        plain = robust_accuracy(defended, PGD(eps=0.1, steps=10, seed=0), x, y, progress=False).robust_accuracy
        eot = robust_accuracy(defended, PGD(eps=0.1, steps=10, eot_samples=16, seed=0), x, y, progress=False).robust_accuracy
    assert eot < plain < clean, (clean, plain, eot)
