"""Adaptive evaluation (issue #17): per-example early stop inside PGD, the cascade across the
attacks of one defense, stacked EOT draws, and no EOT passes on deterministic models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import robustkit
from robustkit.attacks import PGD
from robustkit.attacks.pgd import draws_batchable
from robustkit.base import EvasionAttack, Preprocessor
from robustkit.defenses import GaussianNoise
from robustkit.eval import evaluate_defenses, robust_accuracy
from robustkit.eval.robust import attack_cost


class BandModel(nn.Module):
    """Two classes from pixel (0, 0) = v: class 1 iff v is inside the band (0.525, 0.575).

    The logit gap ``1 - 40 |v - 0.55|`` pulls the true-class-0 loss towards the band's centre, so PGD
    with a step larger than the band walks into it and out again: an intermediate iterate is
    misclassified while the last one is not."""

    def forward(self, x):
        v = x[:, 0, 0, 0]
        gap = 1 - 40 * (v - 0.55).abs()
        return torch.stack([torch.zeros_like(v), gap], dim=1)


def test_early_stop_never_raises_robust_accuracy_and_keeps_the_broken_iterate():
    # image 0 starts at 0.45: 0.51 (correct) -> 0.57 (in the band: broken) -> 0.51 (correct again)
    # image 1 starts at 0.2: three steps of 0.06 never reach the band
    x = torch.zeros(2, 1, 2, 2)
    x[0, 0, 0, 0], x[1, 0, 0, 0] = 0.45, 0.2
    y = torch.zeros(2, dtype=torch.long)
    model = BandModel()
    kw = dict(eps=0.2, alpha=0.06, steps=3, random_start=False)
    late = robust_accuracy(model, PGD(early_stop=False, **kw), x, y, progress=False, keep_adversarials=True)
    early = robust_accuracy(model, PGD(early_stop=True, **kw), x, y, progress=False, keep_adversarials=True)
    assert late.robust_correct.tolist() == [True, True]  # the last iterate walked out of the band
    assert early.robust_correct.tolist() == [False, True]  # early stop kept the misclassified iterate
    assert early.robust_accuracy <= late.robust_accuracy
    assert float(early.x_adv[0, 0, 0, 0]) == pytest.approx(0.57, abs=1e-6)
    assert torch.equal(early.x_adv[1], late.x_adv[1])  # an unbroken image follows the same path


class CountCalls(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls, self.images = inner, 0, 0

    def forward(self, x):
        self.calls += 1
        self.images += x.shape[0]
        return self.inner(x)


def test_no_eot_passes_on_a_deterministic_model_and_stacked_draws_on_noise():
    x = torch.rand(4, 1, 4, 4)
    y = torch.zeros(4, dtype=torch.long)
    counted = CountCalls(nn.Sequential(nn.Flatten(), nn.Linear(16, 3)))
    PGD(eps=0.01, steps=2, eot_samples=8, early_stop=False)(counted, x, y)
    assert counted.calls == 2 + 1  # one gradient pass per step, one final check: no EOT on a deterministic model
    noisy = robustkit.wrap(counted, GaussianNoise(0.1, seed=0))
    counted.calls = counted.images = 0
    PGD(eps=0.01, steps=2, eot_samples=8, early_stop=False)(noisy, x, y)
    assert (counted.calls, counted.images) == (2 + 1, 2 * 8 * 4 + 4)  # the 8 draws stacked into one forward
    counted.calls = counted.images = 0
    PGD(eps=0.01, steps=2, eot_samples=8, early_stop=False, eot_chunk=16)(noisy, x, y)
    assert counted.calls == 2 * 2 + 1  # at most 16 images per forward: 4 draws of 4 images per pass


def test_no_early_stop_on_a_randomized_model_unless_asked():
    counted = CountCalls(nn.Sequential(nn.Flatten(), nn.Linear(16, 3)))
    with torch.no_grad():
        counted.inner[1].weight.zero_()
        counted.inner[1].bias.copy_(torch.tensor([0.0, 5.0, 0.0]))  # always class 1: label 0 is broken at once
    noisy = robustkit.wrap(counted, GaussianNoise(0.1, seed=0))
    x, y = torch.rand(3, 1, 4, 4), torch.zeros(3, dtype=torch.long)
    PGD(eps=0.01, steps=4, eot_samples=4)(noisy, x, y)
    assert counted.calls == 4 + 1  # every step runs: a randomized model is not stopped early by default
    counted.calls = 0
    PGD(eps=0.01, steps=4, eot_samples=4, early_stop_randomized=True)(noisy, x, y)
    assert counted.calls == 1  # every draw of the first step was fooled: all three stop there
    counted.calls = 0
    PGD(eps=0.01, steps=4, eot_samples=1, early_stop_randomized=True)(noisy, x, y)
    assert counted.calls == 4 + 1  # one draw is never enough to stop


class OneDrawPerCall(Preprocessor):
    """A plug-in drawing ONE random shift for the whole batch: stacked copies would share it."""

    randomized = True

    def forward(self, x):
        shift = torch.rand((), generator=self.generator(x.device)) * 0.2
        return (x + shift).clamp(0, 1)


def test_draws_stay_separate_for_a_plugin_that_draws_once_per_call():
    lin = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    assert draws_batchable(robustkit.wrap(lin, GaussianNoise(0.1)))
    assert draws_batchable(lin)
    once = robustkit.wrap(lin, OneDrawPerCall(seed=0))
    assert not draws_batchable(once)
    counted = CountCalls(lin)
    PGD(eps=0.01, steps=1, eot_samples=5, early_stop=False)(robustkit.wrap(counted, OneDrawPerCall(seed=0)),
                                                             torch.rand(2, 1, 4, 4), torch.zeros(2, dtype=torch.long))
    assert counted.calls == 5 + 1


class BreakById(EvasionAttack):
    """Exact, per-example attack: breaks the images whose id (pixel (0, 1) * 100) is in ``ids``,
    by pushing pixel (0, 0) over ThresholdModel's threshold. ``cost`` orders the cascade."""

    def __init__(self, ids, cost, eps=0.1):
        super().__init__(eps=eps)
        self.ids, self.cost = set(ids), cost
        self.seen = [0]  # shared by the copies evaluators make (with_options)

    def perturb(self, model, x, y):
        self.seen[0] += x.shape[0]
        out = x.clone()
        ids = (x[:, 0, 0, 1] * 100).round().long().tolist()
        for i, k in enumerate(ids):
            if k in self.ids:
                out[i, 0, 0, 0] = (x[i, 0, 0, 0] + self.eps).clamp(0, 1)
        return out


class ThresholdModel(nn.Module):
    """Class 1 iff pixel (0, 0) >= 0.5, else class 0."""

    def forward(self, x):
        v = x[:, 0, 0, 0]
        return torch.stack([0.5 - v, v - 0.5, torch.full_like(v, -1.0)], dim=1)


def test_cascade_equals_the_per_example_worst_case_of_separate_runs():
    n = 12
    x = torch.zeros(n, 1, 2, 2)
    x[:, 0, 0, 1] = torch.arange(n) / 100  # the image's id
    x[:, 0, 0, 0] = torch.tensor([0.45] * 6 + [0.49] * 5 + [0.6])  # image 11 is misclassified clean
    y = torch.zeros(n, dtype=torch.long)
    pgd = PGD(eps=0.1, alpha=0.02, steps=1, random_start=False)  # exact here: breaks exactly the images at 0.49
    costly = BreakById({0, 1, 2, 6}, cost=1000)  # listed first but the most expensive
    cheap = BreakById({1, 3, 4}, cost=0.5)  # cheaper than the 1-step PGD

    def run(cascade, attacks):
        return evaluate_defenses(ThresholdModel(), x, y, attacks=attacks, progress=False, cascade=cascade,
                                 checks=False)

    sep = run(False, [costly, pgd, cheap])
    costly.seen[0] = cheap.seen[0] = 0
    cas = run(True, [costly, pgd, cheap])
    worst = [r for r in sep.rows if r["kind"] == "worst_case"]
    worst_c = [r for r in cas.rows if r["kind"] == "worst_case"]
    # by hand: broken = {0,1,2,6} | {6..10} | {1,3,4} | {11 (clean)} -> survivors {5}
    assert worst[0]["accuracy"] == worst_c[0]["accuracy"] == pytest.approx(1 / n)
    assert worst[0]["all_draws"] == worst_c[0]["all_draws"]
    # rows keep the config's order; cascade runs cheapest first: cheap (on the 11 clean-correct), pgd, costly
    assert [r["attack"] for r in sep.rows] == [r["attack"] for r in cas.rows]
    attacked = {r["attack"]: r["attacked"] for r in cas.rows if "attacked" in r}
    assert sorted(attacked.values()) == [3, 8, 11]
    assert cheap.seen[0] == 11 and costly.seen[0] == 3  # clean-correct; then survivors of cheap and PGD: 0, 2, 5
    # an attack's cascade row = robust after it and every cheaper one; the last one equals the worst case
    assert cas.rows[1]["accuracy"] == pytest.approx(1 / n)
    assert any("cascade" in note for note in cas.notes)


def test_attack_cost_orders_pgd_by_passes():
    det = ThresholdModel()
    noisy = robustkit.wrap(det, GaussianNoise(0.1))
    assert attack_cost(PGD(steps=10, eot_samples=8), det) == 10
    assert attack_cost(PGD(steps=10, eot_samples=8), noisy) == 80
    assert attack_cost(PGD(steps=10, restarts=2), noisy) == 20


def test_eot_twin_runs_once_on_a_deterministic_defense_whatever_its_early_stop_setting():
    x, y = torch.rand(4, 1, 2, 2), torch.zeros(4, dtype=torch.long)
    ev = evaluate_defenses(ThresholdModel(), x, y, attacks=[
        {"name": "pgd", "steps": 2}, {"name": "pgd", "steps": 2, "eot_samples": 4, "early_stop_randomized": True}],
        progress=False, checks=False)
    assert [r["kind"] for r in ev.rows] == ["clean", "pgd", "worst_case"]
    assert any("ran once" in n for n in ev.notes)
