"""The statistics the ablation and defaults-sweep benchmarks report (hand formulas, no data)."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(BENCH))


def test_supralinearity_margin_and_error_by_hand():
    supra = _load("supralinear")
    # gains: a +0.10, b +0.05, both +0.30 -> margin +0.15
    margin, se, verdict = supra.supralinearity(0.10, 0.20, 0.15, 0.40, 400)
    assert margin == pytest.approx(0.15)
    want = math.sqrt(sum(p * (1 - p) / 400 for p in (0.10, 0.20, 0.15, 0.40)))
    assert se == pytest.approx(want)
    assert verdict == "supralinear"  # 0.15 > 2 * 0.049


def test_supralinearity_small_margin_is_not_a_claim():
    supra = _load("supralinear")
    _, se, verdict = supra.supralinearity(0.10, 0.20, 0.15, 0.27, 100)  # margin +0.02, se about 0.08
    assert se > 0.01 and verdict == "additive within error"
    assert supra.supralinearity(0.10, 0.40, 0.40, 0.30, 400)[2] == "sub-additive"  # margin -0.40


def test_supralinearity_rejects_bad_input():
    supra = _load("supralinear")
    with pytest.raises(ValueError):
        supra.supralinearity(0.1, 0.2, 0.3, 1.5, 100)
    with pytest.raises(ValueError):
        supra.supralinearity(0.1, 0.2, 0.3, 0.4, 0)


def test_pareto_front_and_one_factor_settings():
    sweep = _load("defaults_sweep")
    pts = [(0.8, 0.1), (0.7, 0.3), (0.6, 0.2), (0.8, 0.1), (0.5, 0.35)]
    assert sweep.pareto(pts) == [True, True, False, True, True]  # (0.6, 0.2) is dominated by (0.7, 0.3)
    base = {"sigma": 0.05, "kernel_size": 5, "sigma_color": 0.1, "sigma_space": 1.5, "train_iterations": 1, "iterations": 1}
    todo = sweep.settings(base, {"sigma": [0.05, 0.1], "ab": [(1, 1), (1, 4)]})
    labels = [lab for lab, _ in todo]
    assert labels == ["base", "sigma=0.1", "a/b=1/4"]  # changes equal to the base are not repeated
    assert dict(todo)["a/b=1/4"] == {**base, "train_iterations": 1, "iterations": 4}
    assert sum(p != base for _, p in todo) == 2
    # sigma 0 drops the noise (a bilateral-only defense); otherwise noise comes first, as in the paper
    assert [s["name"] for s in sweep.preprocessors({**base, "sigma": 0.0})] == ["bilateral"]
    assert [s["name"] for s in sweep.preprocessors(base)] == ["gaussian_noise", "bilateral"]


def test_paired_bootstrap_two_images_by_hand():
    supra = _load("supralinear")
    # per-image margins m = both - a - b + none = [1, 0]: the resampled mean is 1, 0.5 or 0 with
    # probabilities 1/4, 1/2, 1/4, so its SD is sqrt(1/8) = 0.354 (= population sd 0.5 / sqrt(2))
    res = supra.paired_bootstrap([0, 0], [0, 0], [0, 0], [1, 0], reps=20000, seed=1)
    assert res["margin"] == pytest.approx(0.5)
    assert res["se_formula"] == pytest.approx(math.sqrt(1 / 8))
    assert res["se"] == pytest.approx(math.sqrt(1 / 8), rel=0.03)
    assert res["ci95"] == [0.0, 1.0]
    assert res["verdict"] == "additive within error"


def test_paired_bootstrap_keeps_the_pairing():
    supra = _load("supralinear")
    flags = [1, 0] * 50  # the same images robust behind all four defenses: every per-image margin is 0
    res = supra.paired_bootstrap(flags, flags, flags, flags, reps=200)
    assert res["margin"] == 0.0 and res["se"] == 0.0 and res["se_formula"] == 0.0
    # the independent-samples error of the same accuracies is not zero: the pairing is what removes it
    assert supra.supralinearity(0.5, 0.5, 0.5, 0.5, 100)[1] == pytest.approx(math.sqrt(4 * 0.25 / 100))
    # the margin equals the margin of the mean accuracies; a clear per-image gain is supralinear
    none, a, b = [0] * 100, [1] * 10 + [0] * 90, [0] * 90 + [1] * 10
    both = [1] * 60 + [0] * 40
    res = supra.paired_bootstrap(none, a, b, both, reps=500)
    assert res["margin"] == pytest.approx(supra.supralinearity(0.0, 0.1, 0.1, 0.6, 100)[0])
    assert res["verdict"] == "supralinear"


def test_paired_bootstrap_rejects_bad_input():
    supra = _load("supralinear")
    with pytest.raises(ValueError):
        supra.paired_bootstrap([0, 1], [0, 1], [0, 1], [0])  # unequal lengths
    with pytest.raises(ValueError):
        supra.paired_bootstrap([0, 2], [0, 1], [0, 1], [0, 1])  # not a flag / fraction
    with pytest.raises(ValueError):
        supra.paired_bootstrap([], [], [], [])


def test_backdoor_matrix_merge_tells_runs_apart_by_their_recipes():
    """Two CNN runs on one data set, one per victim recipe: their merge can be merged again (each
    row is matched to the run whose --recipes / --attacks selected it), and a later run replaces
    only the victims it re-ran."""
    mx = _load("backdoor_matrix")

    def run(recipe, attacks, acc):
        argv = ["--part", "cnn", "--datasets", "cifar", "--attacks", *attacks, "--recipes", recipe]
        rows = [{"kind": "victim", "data": "cifar", "attack": a, "recipe": recipe, "model": "preact_resnet18_w8",
                 "acc": acc} for a in attacks]
        return {"part": "cnn", "data": {"cifar": {}}, "argv": argv, "date": recipe, "rows": rows}

    first = mx.merge([run("lr0.01", ["badnets", "sig"], 0.4), run("lr0.05", ["badnets", "sig"], 0.5)])
    again = mx.merge([first])
    assert again["rows"] == first["rows"] and len(again["runs"]) == 2
    newer = mx.merge([first, run("lr0.05", ["sig"], 0.6)])
    accs = {(r["recipe"], r["attack"]): r["acc"] for r in newer["rows"]}
    assert accs == {("lr0.01", "badnets"): 0.4, ("lr0.01", "sig"): 0.4, ("lr0.05", "badnets"): 0.5, ("lr0.05", "sig"): 0.6}
    with pytest.raises(SystemExit, match="cannot tell"):  # two runs that could both hold a row
        mx.merge([{**first, "runs": [{**r, "argv": []} for r in first["runs"]]}])
