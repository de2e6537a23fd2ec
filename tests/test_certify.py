"""Randomized-smoothing certificates (robustkit.eval.certify and the ``certify`` step).

The toy base classifier is a threshold on a 1-pixel image: f(z) = 1 if z > t else 0. Under
N(0, sigma^2) noise, P(f(x + delta) = 1) = Phi((x - t) / sigma), so the smoothed classifier's
exact certified radius is |x - t| (for t inside (0, 1) the clip to [0, 1] changes no vote).
"""

import json
import math

import pytest
import torch
from torch import nn

import robustkit
from robustkit import wrap
from robustkit.errors import ConfigError, InputError
from robustkit.eval.certify import (
    ABSTAIN,
    certified_radius,
    certify,
    clopper_pearson_lower,
    predict_smoothed,
    split_smoothing,
)
from robustkit.preprocessing import (
    BilateralFilter,
    Compose,
    GaussianNoise,
    NoiseBilateral,
    Quantize,
)

T = 0.5  # threshold of the toy classifier


def threshold_model(t: float = T) -> nn.Module:
    """Logits (0, z - t) of a 1-pixel image z: class 1 iff z > t."""
    lin = nn.Linear(1, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.0], [1.0]]))
        lin.bias.copy_(torch.tensor([0.0, -t]))
    return nn.Sequential(nn.Flatten(), lin)


def pixels(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1)


# ----------------------------------------------------------------------------- statistics by hand
def test_clopper_pearson_by_hand():
    # all n draws agree: P(Bin(n, p) >= n) = p^n = alpha  =>  p = alpha^(1/n)
    assert clopper_pearson_lower(100, 100, 0.001) == pytest.approx(0.001 ** (1 / 100), rel=1e-9)
    assert clopper_pearson_lower(1, 1, 0.05) == pytest.approx(0.05, rel=1e-9)
    assert clopper_pearson_lower(0, 50, 0.001) == 0.0
    # k = n - 1: P(Bin(n, p) >= n - 1) = n p^(n-1) (1 - p) + p^n; solve by bisection
    n, alpha = 10, 0.01

    def tail(p):
        return n * p ** (n - 1) * (1 - p) + p ** n

    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if tail(mid) < alpha else (lo, mid)
    assert clopper_pearson_lower(n - 1, n, alpha) == pytest.approx(lo, abs=1e-9)
    with pytest.raises(InputError):
        clopper_pearson_lower(5, 4, 0.01)
    with pytest.raises(InputError):
        clopper_pearson_lower(1, 4, 1.5)


def test_radius_by_hand():
    # Phi^-1(0.975) = 1.959963985; Phi^-1(0.8413447461) = 1 (one standard deviation)
    assert certified_radius(0.975, 0.5) == pytest.approx(0.5 * 1.959963985, rel=1e-7)
    assert certified_radius(0.8413447461, 0.25) == pytest.approx(0.25, rel=1e-7)
    assert certified_radius(0.5, 1.0) == 0.0 and certified_radius(0.3, 1.0) == 0.0
    # the largest radius n draws can give: every draw agrees
    p = 0.001 ** (1 / 100)
    assert certified_radius(clopper_pearson_lower(100, 100, 0.001), 0.25) == pytest.approx(
        certified_radius(p, 0.25), rel=1e-9)


# ----------------------------------------------------------------------------- closed form
def test_linear_toy_radius_is_below_exact_and_close():
    sigma = 0.25
    x = pixels(0.7, 0.9, 0.3, 0.55)
    y = torch.tensor([1, 1, 0, 1])
    exact = (x.view(-1) - T).abs()
    res = certify(wrap(threshold_model(), GaussianNoise(sigma)), x, y, n0=100, n=20_000, alpha=0.001,
                  batch_size=20_000, seed=0, progress=False)
    assert torch.equal(res.predictions, y)
    assert (res.radii <= exact.double()).all()
    # with 20000 draws the Clopper-Pearson slack costs under 15 % of the radius
    assert (res.radii >= 0.85 * exact.double()).all()
    assert res.sigma == sigma and res.n == 20_000 and res.abstention_rate == 0.0
    # certified accuracy at radius r: images right with radius >= r
    acc = res.certified_accuracy([0.0, 0.1, 0.3, 0.5])
    assert acc == [1.0, 0.75, 0.25, 0.0]
    assert res.certified_accuracy(0.1) == 0.75


def test_abstains_on_the_boundary_and_predict_agrees():
    model = wrap(threshold_model(), GaussianNoise(0.25))
    x, y = pixels(0.5, 0.8), torch.tensor([1, 1])
    res = certify(model, x, y, n0=50, n=2000, batch_size=1000, seed=3, progress=False)
    assert res.predictions[0] == ABSTAIN and res.radii[0] == 0 and res.abstained[0]
    assert res.predictions[1] == 1 and res.radii[1] > 0
    assert res.abstention_rate == 0.5 and res.certified_accuracy(0.0) == 0.5
    pred = predict_smoothed(model, x, y, n=2000, alpha=0.001, batch_size=1000, seed=3, progress=False)
    assert pred.predictions[1] == 1 and pred.p_values[1] < 1e-6
    assert pred.predictions[0] == ABSTAIN  # a 50/50 vote: the binomial test cannot separate the classes


def test_smoothed_vote_is_the_majority():
    from robustkit.eval.certify import smoothed_vote

    votes = smoothed_vote(wrap(threshold_model(), GaussianNoise(0.25)), pixels(0.9, 0.1, 0.75), n=500, batch_size=500)
    assert votes.tolist() == [1, 0, 1]


def test_plain_model_with_sigma_is_gaussian_smoothing():
    x, y = pixels(0.8), torch.tensor([1])
    a = certify(threshold_model(), x, y, sigma=0.25, n=500, batch_size=500, progress=False)
    b = certify(wrap(threshold_model(), GaussianNoise(0.25)), x, y, n=500, batch_size=500, progress=False)
    assert torch.equal(a.radii, b.radii)
    with pytest.raises(InputError, match="sigma"):
        certify(threshold_model(), x, y, progress=False)
    with pytest.raises(InputError, match="sigma"):
        certify(wrap(threshold_model(), GaussianNoise(0.25)), x, y, sigma=0.5, progress=False)


# ----------------------------------------------------------------------------- determinism
def test_seeded_results_repeat_and_leave_global_rng_alone():
    model = wrap(threshold_model(), NoiseBilateral(0.25, kernel_size=3))
    x = pixels(*[0.55 + 0.03 * i for i in range(8)])
    y = torch.ones(8, dtype=torch.long)
    state = torch.get_rng_state()
    a = certify(model, x, y, n0=20, n=200, batch_size=64, seed=7, progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    b = certify(model, x, y, n0=20, n=200, batch_size=64, seed=7, progress=False)
    assert torch.equal(a.counts, b.counts) and torch.equal(a.radii, b.radii) and torch.equal(a.predictions, b.predictions)
    c = certify(model, x, y, n0=20, n=200, batch_size=64, seed=8, progress=False)
    assert not torch.equal(a.counts, c.counts)  # eight images: all counts equal by chance is negligible
    # image i draws from seed + i: certifying a subset gives the same numbers for it
    d = certify(model, x[:3], y[:3], n0=20, n=200, batch_size=64, seed=7, progress=False)
    assert torch.equal(d.counts, a.counts[:3])
    p1 = predict_smoothed(model, x, y, n=200, batch_size=64, seed=1, progress=False)
    p2 = predict_smoothed(model, x, y, n=200, batch_size=64, seed=1, progress=False)
    assert torch.equal(p1.predictions, p2.predictions) and torch.equal(p1.p_values, p2.p_values)


# ----------------------------------------------------------------------------- never above an attack
def test_certificate_is_below_the_distance_of_a_found_adversarial_point():
    """Built to be breakable: moving the pixel across the threshold flips the smoothed classifier.
    PGD-L2 with EOT finds such a point; the smoothed vote there (PREDICT, many draws) is the other
    class, so the true radius is below its distance, and the certificate must be too."""
    from robustkit.attacks.pgd import PGD

    sigma = 0.25
    model = wrap(threshold_model(), GaussianNoise(sigma, seed=0))
    x, y = pixels(0.7, 0.62), torch.tensor([1, 1])
    res = certify(model, x, y, n0=100, n=5000, batch_size=5000, seed=0, progress=False)
    assert (res.predictions == 1).all()
    attack = PGD(eps=0.3, norm="l2", steps=5, eot_samples=4, random_start=False, seed=0)
    x_adv = attack(model, x, y)
    dist = (x_adv - x).flatten(1).norm(dim=1)
    flipped = predict_smoothed(model, x_adv, y, n=5000, batch_size=5000, seed=1, progress=False).predictions
    assert (flipped == 0).all(), "the attack must break the smoothed classifier on this case"
    assert (res.radii < dist.double()).all()
    # along the breaking direction, the first grid point where the smoothed vote flips is beyond the radius
    steps = torch.arange(1, 41, dtype=torch.float32) / 100
    for i in range(2):
        moved = (x[i] - steps.view(-1, 1, 1, 1)).clamp(0, 1)
        votes = predict_smoothed(model, moved, None, n=2000, batch_size=2000, seed=2, progress=False).predictions
        first = float(steps[(votes == 0).nonzero()[0, 0]])
        assert res.radii[i] < first


# ----------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("pre, match", [
    ([], "no Gaussian noise"),
    ([BilateralFilter(3)], "no Gaussian noise"),
    ([Quantize(8), GaussianNoise(0.25)], "runs before the noise"),
    ([Compose([BilateralFilter(3), GaussianNoise(0.25)])], "runs before the noise"),
    ([GaussianNoise(0.25), GaussianNoise(0.1)], "randomized too"),
    ([NoiseBilateral(0.25), GaussianNoise(0.1)], "randomized too"),
    ([GaussianNoise(0.0)], "sigma = 0"),
])
def test_non_noise_defenses_are_refused(pre, match):
    with pytest.raises(InputError, match=match):
        certify(wrap(threshold_model(), *pre), pixels(0.7), torch.tensor([1]), n=10, progress=False)


def test_accepted_chains():
    noise, rest = split_smoothing([NoiseBilateral(0.12)])
    assert noise.sigma == 0.12 and len(rest) == 1 and isinstance(rest[0], BilateralFilter)
    noise, rest = split_smoothing([Compose([GaussianNoise(0.5), BilateralFilter(3)]), Quantize(8)])
    assert noise.sigma == 0.5 and len(rest) == 2
    with pytest.raises(InputError, match="n must be"):
        certify(wrap(threshold_model(), GaussianNoise(0.25)), pixels(0.7), torch.tensor([1]), n=0, progress=False)
    with pytest.raises(InputError):
        certify(wrap(threshold_model(), GaussianNoise(0.25)), pixels(0.7), torch.tensor([1.0]), progress=False)


# ----------------------------------------------------------------------------- the pipeline step
def step_config(tmp_path, **certify_params):
    params = {
        "n_samples": 6, "n0": 10, "n": 40, "batch_size": 50, "predict_n": 20, "radii": [0, 0.25, 0.5],
        "defenses": [{"label": "noise", "preprocessors": [{"name": "gaussian_noise", "sigma": 0.25}]},
                     {"label": "noise+bilateral", "preprocessors": [{"name": "noise_bilateral", "sigma": 0.25}]}],
        "attack": {"name": "pgd", "norm": "l2", "steps": 2, "eot_samples": 2, "label": "EOT-PGD-L2"},
        "draws": 1, "vote_n": 10,
    }
    params.update(certify_params)
    return {"name": "certify tiny", "seed": 0, "device": "cpu", "output_dir": str(tmp_path / "out"),
            "data": {"name": "digits", "size": 8}, "model": {"name": "small_cnn", "width": 4},
            "steps": [{"train": {"epochs": 1, "preprocessors": [{"name": "gaussian_noise", "sigma": 0.25}]}},
                      {"certify": params}]}


@pytest.mark.slow  # trains a tiny CNN and runs the step: ~30 s on 2 busy cores
def test_certify_step_end_to_end(tmp_path):
    report = robustkit.run(step_config(tmp_path), progress=False, log=None)
    out = tmp_path / "out"
    assert (out / "certified_accuracy.png").is_file() and "certified_accuracy.png" in report.figures
    rows = report.table("Certified accuracy vs. L2 radius").rows
    assert [(r["defense"], r["L2 radius"]) for r in rows] == [
        (d, r) for d in ("noise", "noise+bilateral") for r in (0.0, 0.25, 0.5)]
    for r in rows:
        assert 0.0 <= r["certified"] <= 1.0 and 0.0 <= r["attack"] <= 1.0 and r["sigma"] == 0.25
        assert 0.0 <= r["attack (vote)"] <= 1.0
    # certified accuracy does not grow with the radius
    for d in ("noise", "noise+bilateral"):
        cert = [r["certified"] for r in rows if r["defense"] == d]
        assert cert == sorted(cert, reverse=True)
    summary = {r["defense"]: r for r in report.table("Certification summary").rows}
    assert summary["noise+bilateral"]["base classifier"] == "GaussianNoise -> BilateralFilter -> model"
    assert summary["noise"]["n"] == 40 and summary["noise"]["alpha"] == 0.001
    assert 0.0 <= summary["noise"]["abstention"] <= 1.0
    assert summary["noise"]["max radius"] == pytest.approx(0.25 * 0.990, abs=0.05)  # sigma * Phi^-1(0.001^(1/40))
    # n = 40 draws cannot certify 0.5 at sigma 0.25: the report says the zero there is by construction
    assert any("0 by construction" in note and "0.5" in note for note in report.notes)
    assert "noise/certified_accuracy@0.25" in report.metrics and "noise/attack_accuracy@0.5" in report.metrics
    assert "noise+bilateral/vote_attack_accuracy@0.5" in report.metrics
    saved = json.loads((out / "report.json").read_text())
    assert any(t["title"] == "Certification summary" for t in saved["tables"])


@pytest.mark.parametrize("change, where", [
    ({"defenses": [{"label": "bil", "preprocessors": ["bilateral"]}]}, "defenses"),
    ({"defenses": [{"label": "q", "preprocessors": ["quantize", "gaussian_noise"]}]}, "defenses"),
    ({"attack": {"name": "pgd", "norm": "linf"}}, "attack"),
    ({"n": 0}, "n"),
    ({"alpha": 2}, "alpha"),
    ({"radii": [-1]}, "radii"),
    ({"defenses": None}, "defenses"),
])
def test_certify_step_config_errors(tmp_path, change, where):
    from robustkit.pipeline import validate_config

    with pytest.raises(ConfigError) as e:
        validate_config(step_config(tmp_path, **change))
    assert where in str(e.value)


def test_max_radius_formula():
    # n = 40, alpha = 0.001: p = 0.001 ** (1 / 40) = 0.84139514...; Phi^-1 of it is ~ 0.99996
    p = 0.001 ** (1 / 40)
    assert clopper_pearson_lower(40, 40, 0.001) == pytest.approx(p)
    assert certified_radius(p, 1.0) == pytest.approx(1.0, abs=1e-3)
    assert math.isfinite(certified_radius(clopper_pearson_lower(10**6, 10**6, 0.001), 0.5))


def test_shipped_certify_configs_validate():
    from pathlib import Path

    from robustkit.pipeline import load_config, validate_config

    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.glob("certify_*.yaml"))
    assert files
    for f in files:
        cfg = validate_config(load_config(f))
        assert any("certify" in s for s in cfg["steps"])


# ----------------------------------------------------------------------------- the evaluate step's certify option
def evaluate_config(tmp_path, **evaluate_params):
    params = {
        "n_samples": 6, "batch_size": 50, "draws": 1, "checks": False, "eps": [0.25, 0.5],
        "defenses": [{"label": "undefended", "preprocessors": []},
                     {"label": "noise", "preprocessors": [{"name": "gaussian_noise", "sigma": 0.25}]}],
        "attacks": [{"name": "pgd", "norm": "l2", "steps": 2, "eot_samples": 2, "label": "EOT-PGD-L2"}],
        "certify": {"n0": 10, "n": 40, "batch_size": 50, "predict_n": 0},
    }
    params.update(evaluate_params)
    return {"name": "evaluate+certify tiny", "seed": 0, "device": "cpu", "output_dir": str(tmp_path / "out"),
            "data": {"name": "digits", "size": 8}, "model": {"name": "small_cnn", "width": 4},
            "steps": [{"train": {"epochs": 1, "preprocessors": [{"name": "gaussian_noise", "sigma": 0.25}]}},
                      {"evaluate": params}]}


@pytest.mark.slow  # trains a tiny CNN and evaluates 6 images: ~15 s on 2 busy cores
def test_evaluate_step_certify_option(tmp_path):
    report = robustkit.run(evaluate_config(tmp_path), progress=False, log=None)
    rows = report.table("Certified vs. empirical L2 accuracy").rows
    # only the noise defense is certified, at 0 and the step's L2 radii; the undefended model is named in a note
    assert [(r["defense"], r["L2 radius"]) for r in rows] == [("noise", 0.0), ("noise", 0.25), ("noise", 0.5)]
    assert any("'undefended' is not certified" in n for n in report.notes)
    evaluated = {r["attack"]: r["accuracy"] for r in report.table("Clean and robust accuracy").rows
                 if r["defense"] == "noise"}
    for r in rows[1:]:
        # the empirical column is the evaluation's own number at that radius (its worst case over 1 attack)
        assert r["from"].startswith("worst case") and evaluated[r["from"]] == r["empirical (adaptive)"]
        assert 0.0 <= r["certified"] <= 1.0
    assert rows[0]["empirical (adaptive)"] == "-"
    cert = [r["certified"] for r in rows]
    assert cert == sorted(cert, reverse=True)
    assert (tmp_path / "out" / "certified_accuracy.png").is_file()
    assert "noise/certified_accuracy@0.25" in report.metrics


@pytest.mark.parametrize("change, where", [
    ({"certify": {"n": 0}}, "certify"),
    ({"certify": {"alpha": 1.5}}, "certify.alpha"),
    ({"certify": {"n_draws": 10}}, "certify"),
    ({"certify": "yes"}, "certify"),
    ({"defenses": [{"label": "bil", "preprocessors": ["bilateral"]}]}, "certify"),
])
def test_evaluate_step_certify_option_errors(tmp_path, change, where):
    from robustkit.pipeline import validate_config

    with pytest.raises(ConfigError) as e:
        validate_config(evaluate_config(tmp_path, **change))
    assert where in str(e.value)
