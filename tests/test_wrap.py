import pytest
import torch
from torch import nn

from robustkit import Defended, Preprocessor, wrap
from robustkit.defenses import GaussianNoise
from robustkit.errors import ConfigError, InputError, UnknownNameError


class AddOne(Preprocessor):
    def forward(self, x):
        return x + 1


class Double(Preprocessor):
    differentiable = False

    def forward(self, x):
        return x * 2


def test_wrap_applies_preprocessors_in_order():
    model = nn.Flatten()
    d = wrap(model, AddOne(), Double())
    x = torch.rand(2, 1, 2, 2)
    assert torch.allclose(d(x), ((x + 1) * 2).flatten(1))
    assert isinstance(d, Defended) and d.model is model


def test_rewrap_is_flat_and_new_preprocessors_run_first():
    model = nn.Flatten()
    inner = wrap(model, AddOne(), check_input=False)
    outer = wrap(inner, Double())
    x = torch.rand(1, 1, 2, 2)
    assert outer.model is model and len(outer.preprocessors) == 2
    assert torch.allclose(outer(x), inner(Double()(x)))


def test_flags_summarize_preprocessors():
    m = nn.Flatten()
    assert not wrap(m).randomized and wrap(m).differentiable
    assert wrap(m, GaussianNoise(0.1)).randomized
    assert not wrap(m, Double()).differentiable


def test_wrap_builds_registered_names():
    d = wrap(nn.Flatten(), "gaussian_noise", {"name": "gaussian_noise", "sigma": 0.2})
    assert [type(p).__name__ for p in d.preprocessors] == ["GaussianNoise", "GaussianNoise"]
    assert d.preprocessors[1].sigma == 0.2
    with pytest.raises(UnknownNameError, match="Known preprocessors"):
        wrap(nn.Flatten(), "no_such_defense")
    with pytest.raises(ConfigError, match="unknown parameter"):
        wrap(nn.Flatten(), {"name": "gaussian_noise", "sigmaa": 0.1})


def test_wrap_rejects_bad_input():
    with pytest.raises(InputError, match="nn.Module"):
        wrap("not a model")
    with pytest.raises(InputError, match="preprocessor 0"):
        Defended(nn.Flatten(), [lambda x: x])
    with pytest.raises(InputError, match="unknown keyword"):
        wrap(nn.Flatten(), bogus=1)
    d = wrap(nn.Flatten())
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        d(torch.rand(1, 1, 2, 2) * 255)
    with pytest.raises(InputError, match="N x C x H x W"):
        d(torch.rand(1, 2, 2))
    # checks can be disabled for speed
    wrap(nn.Flatten(), check_input=False)(torch.rand(1, 1, 2, 2) * 255)


def test_gaussian_noise_statistics_seed_and_gradient():
    x = torch.full((4, 3, 32, 32), 0.5)
    out = GaussianNoise(0.1, seed=3)(x)
    noise = out - x
    assert abs(float(noise.std()) - 0.1) < 0.005 and abs(float(noise.mean())) < 0.005
    assert torch.equal(GaussianNoise(0.1, seed=3)(x), out)
    assert not torch.equal(GaussianNoise(0.1, seed=4)(x), out)
    g = GaussianNoise(0.1, seed=3)
    a, b = g(x), g(x)
    assert not torch.equal(a, b)  # the stream advances
    g.reseed(3)
    assert torch.equal(g(x), a)
    # clipping keeps [0, 1]
    y = GaussianNoise(0.5)(torch.rand(2, 1, 8, 8))
    assert float(y.min()) >= 0 and float(y.max()) <= 1
    # identity gradient where not clipped
    xi = torch.full((1, 1, 4, 4), 0.5, requires_grad=True)
    GaussianNoise(0.01, seed=0)(xi).sum().backward()
    assert torch.allclose(xi.grad, torch.ones_like(xi))
    with pytest.raises(InputError):
        GaussianNoise(-1)
