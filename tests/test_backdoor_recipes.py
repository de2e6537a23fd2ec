"""Issue #15: triggers and victim recipes the older tests do not use, and the filters' diagnostics.

- a random 4x4 colour patch in a corner on RGB digits, a victim trained with SGD lr 0.05
  (the older tests train victims at lr 0.01), repaired by FT-SAM at the victim's learning rate;
- the two-sided attention-entropy score on entropy matrices where the trigger raises entropy
  (a blend) or collapses it (a patch), and the warnings when its premise fails;
- the activation-clustering and spectral-signature warnings on features without a poisoned cluster.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from robustkit.backdoor import BadNets, Blended
from robustkit.data import ArrayDataset
from robustkit.filtering import ActivationClustering, SpectralSignatures, filter_metrics
from robustkit.filtering.attention_entropy import entropy_scores, entropy_warnings, high_cluster
from robustkit.filtering.common import fit_gmm2


class ColourPatch(BadNets):
    """A fixed random-colour patch (uniform per pixel and channel) instead of BadNets' white square."""

    def __init__(self, size: int = 4, position: str = "top-left", seed: int = 3):
        super().__init__(target=0, size=size, position=position)
        self.seed = seed

    def patch(self, channels, dtype=torch.float32, device=None):
        g = torch.Generator().manual_seed(self.seed)
        return torch.rand(channels, self.size, self.size, generator=g).to(dtype=dtype, device=device)


def test_colour_patch_and_noise_blend_triggers_are_what_they_claim():
    x = torch.zeros(2, 3, 16, 16)
    p = ColourPatch().apply(x)
    assert torch.equal(p[:, :, 4:, :], x[:, :, 4:, :]) and torch.equal(p[:, :, :, 4:], x[:, :, :, 4:])
    assert p[0, :, :4, :4].std() > 0.1 and torch.equal(p[0], p[1])  # coloured, the same on every image
    b = Blended(alpha=0.1, seed=1).apply(torch.full((1, 3, 16, 16), 0.5))
    assert torch.all((b - 0.5).abs() <= 0.05 + 1e-6) and (b - 0.5).std() > 0.02  # 10% of uniform noise


# --------------------------------------------------------------------------- attention entropy, two-sided
def _entropies(shift: float, layers=(1, 2), n_clean: int = 900, n_poisoned: int = 100, seed: int = 0):
    """Clean entropies ~ N(2.5, 0.1) on 4 layers; the poisoned samples moved by ``shift`` on ``layers``."""
    rng = np.random.default_rng(seed)
    e = rng.normal(2.5, 0.1, (n_clean + n_poisoned, 4))
    truth = np.r_[np.zeros(n_clean, bool), np.ones(n_poisoned, bool)]
    for j in layers:
        e[truth, j] += shift
    return e, truth


def _auroc(scores, truth):
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(truth, scores))


@pytest.mark.parametrize("shift, side", [(-1.0, "low"), (0.6, "high")])
def test_two_sided_entropy_score_finds_collapsing_and_spreading_triggers(shift, side):
    e, truth = _entropies(shift)
    both = entropy_scores(e, "both")
    assert both["layers"] == [1, 2] and not both["fallback"]
    assert [both["per_layer"][j]["direction"] for j in (1, 2)] == [side, side]
    assert _auroc(both["scores"], truth) == 1.0
    assert np.array_equal(both["flagged"], truth)
    assert entropy_warnings(both, 2.0) == []
    # the one-sided rule of the other direction ranks the poisoned samples last and says so
    wrong = entropy_scores(e, "high" if side == "low" else "low")
    assert _auroc(wrong["scores"], truth) == 0.0
    assert any("majority" in w for w in entropy_warnings(wrong, 2.0))


def test_entropy_score_is_a_deviation_in_clean_mode_widths():
    e, truth = _entropies(-1.0)
    info = entropy_scores(e, "both")
    for j in (1, 2):
        r = info["per_layer"][j]
        assert r["clean_mode"] == pytest.approx(2.5, abs=0.02) and r["clean_scale"] == pytest.approx(0.1, rel=0.1)
    z = -(e[:, [1, 2]] - [info["per_layer"][j]["clean_mode"] for j in (1, 2)]) / [
        info["per_layer"][j]["clean_scale"] for j in (1, 2)]
    np.testing.assert_allclose(info["scores"], z.mean(axis=1))


def test_entropy_warnings_when_the_premise_fails():
    e, _ = _entropies(0.0)  # no trigger effect at all
    info = entropy_scores(e, "both")
    notes = entropy_warnings(info, 2.0)
    assert info["fallback"] and any("no layer" in n for n in notes) and any("not bimodal" in n for n in notes)
    # two equal halves: which is clean cannot be told
    e, _ = _entropies(-1.0, n_clean=500, n_poisoned=500)
    assert any("equal size" in n or "majority" in n for n in entropy_warnings(entropy_scores(e, "both"), 2.0))
    # layers moving in opposite directions are reported
    e, truth = _entropies(-1.0, layers=(1,))
    e[truth, 2] += 0.6
    info = entropy_scores(e, "both")
    assert _auroc(info["scores"], truth) == 1.0
    assert any("opposite directions" in n for n in entropy_warnings(info, 2.0))


def test_high_cluster_is_an_upper_tail():
    rng = np.random.default_rng(1)
    v = np.r_[rng.normal(0, 1, 500), rng.normal(8, 0.2, 50)]
    mask, cut = high_cluster(v, fit_gmm2(v, 0))
    assert cut is not None and np.array_equal(mask, v >= cut) and mask[500:].all() and mask.sum() == 50


# --------------------------------------------------------------------------- feature filters' diagnostics
class _Identity(nn.Module):
    def __init__(self, dim: int, classes: int):
        super().__init__()
        self.flat = nn.Flatten()
        self.fc = nn.Linear(dim, classes)

    def forward(self, x):
        return self.fc(self.flat(x))


def test_feature_filters_warn_when_no_class_holds_a_poisoned_cluster():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(600, 20, generator=g)  # isotropic: no class has a cluster or a dominant direction
    data = ArrayDataset(x.view(-1, 1, 1, 20), torch.arange(600) % 3)
    model = _Identity(20, 3)
    with pytest.warns(RuntimeWarning, match="spectral_signatures: no class has a dominant direction"):
        ss = SpectralSignatures(progress=False).fit(model, data)
    assert not ss.details.confident
    with pytest.warns(RuntimeWarning, match="activation_clustering: no class splits"):
        ac = ActivationClustering(progress=False).fit(model, data)
    assert not ac.flagged.any() and not ac.details.confident


# --------------------------------------------------------------------------- a new victim recipe, end to end
@pytest.mark.slow
def test_ftsam_at_the_victims_learning_rate_removes_a_colour_patch_backdoor(victim):
    """RGB digits, a random 4x4 colour patch top-left, PreActResNet18 (width 8) trained with SGD lr 0.05."""
    from robustkit.data import digits
    from robustkit.defenses import FTSAM
    from robustkit.models import PreActResNet18

    d = digits(size=16, channels=3)
    atk = ColourPatch()
    torch.manual_seed(0)
    model, _, before = victim(PreActResNet18(in_channels=3, width=8), atk, d.train, d.test, epochs=10, lr=0.05,
                              batch_size=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no collapse warning
        res = FTSAM(lr=0.05, epochs=40, batch_size=32, clean_ratio=0.1, eval_every=40).repair(
            model, d.train, test_data=d.test, backdoor=atk, progress=False)
    after = res.history[-1]
    assert after["asr"] < 0.1, res.history
    assert after["acc"] > before.acc - 0.08 and not res.collapsed
    assert res.details["steps"] == 40 * res.details["steps_per_epoch"]
