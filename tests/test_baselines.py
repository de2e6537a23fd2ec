"""Backdoor baselines (issue #16): each core formula by hand, refusals where a method does not apply,
and each defense against a really backdoored SmallCNN (BadNets on 16x16 digits, trained once here)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from robustkit.errors import InputError
from robustkit.filtering.strip import (
    STRIP,
    DetectorGuard,
    prediction_entropy,
    superimpose,
)
from robustkit.registry import REPAIRS
from robustkit.repair.fine_pruning import (
    FinePruning,
    channel_means,
    last_conv_feature_map,
)
from robustkit.repair.nad import NAD, attention_distance, attention_map, stage_outputs
from robustkit.repair.neural_cleanse import (
    NeuralCleanse,
    UnlearnStep,
    anomaly_index,
    stamp,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, state):
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def _vit():
    from robustkit.models import SmallViT

    return SmallViT(image_size=16, patch_size=4, in_channels=1, num_classes=10, dim=16, depth=1, heads=2)


# --------------------------------------------------------------------------- formulas by hand
def test_registered_names():
    import robustkit.repair.anp  # noqa: F401  (registers "anp")

    for name in ("fine_pruning", "neural_cleanse", "nad", "anp"):
        assert name in REPAIRS
    assert isinstance(REPAIRS.build({"name": "fine_pruning", "epochs": 0}), FinePruning)


def test_last_conv_feature_map_and_refusals():
    from robustkit.models import PreActResNet18, SmallCNN

    x = torch.rand(2, 1, 16, 16)
    assert last_conv_feature_map(SmallCNN(in_channels=1, width=4), x) == "body.4"  # conv-BN-ReLU of the last conv
    assert last_conv_feature_map(PreActResNet18(in_channels=1, width=4), x) == "layer4"  # block output (conv + skip)
    with pytest.raises(InputError, match="no nn.Conv2d"):
        last_conv_feature_map(nn.Sequential(nn.Flatten(), nn.Linear(256, 10)), x)
    with pytest.raises(InputError, match="tokens"):
        last_conv_feature_map(_vit(), x)
    data = (torch.rand(40, 1, 16, 16), torch.arange(40) % 10)
    from robustkit.data import ArrayDataset

    with pytest.raises(InputError, match="Vision Transformer"):
        FinePruning(epochs=0).repair(_vit(), ArrayDataset(*data), progress=False)
    with pytest.raises(InputError, match="tokens"):
        NAD(teacher_epochs=1, epochs=1).repair(_vit(), ArrayDataset(*data), progress=False)


def test_pruning_order_and_channel_means_by_hand():
    # one conv whose 3 channels are (2 * x, -x, 0.5 * x): means over the images and positions by hand
    conv = nn.Conv2d(1, 3, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([2.0, -1.0, 0.5]).view(3, 1, 1, 1))
    model = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))
    x = torch.rand(5, 1, 4, 4)
    means = channel_means(model, model[1], x)
    torch.testing.assert_close(means, torch.tensor([2.0, 0.0, 0.5]) * x.mean())
    # dormant first; ties broken by the lower index
    assert FinePruning.pruning_order(torch.tensor([0.3, 0.1, 0.2, 0.1])) == [1, 3, 2, 0]
    assert FinePruning.pruning_order(means) == [1, 2, 0]


def test_anomaly_index_by_hand():
    norms = torch.tensor([2.0, 10.0, 11.0, 12.0, 13.0, 14.0])
    med = (11.0 + 12.0) / 2  # even count: mean of the middle two
    dev = [abs(v - med) for v in norms.tolist()]  # 9.5, 1.5, 0.5, 0.5, 1.5, 2.5
    mad = (1.5 + 1.5) / 2  # median of the deviations
    want = torch.tensor([d / (1.4826 * mad) for d in dev], dtype=torch.float64)
    torch.testing.assert_close(anomaly_index(norms), want)
    assert float(anomaly_index(norms)[0]) == pytest.approx(9.5 / (1.4826 * 1.5))
    nc = NeuralCleanse()
    from robustkit.repair.neural_cleanse import ReversedTrigger

    trig = [ReversedTrigger(i, torch.zeros(2, 2), torch.zeros(1, 2, 2), float(v), 1.0, 0.0) for i, v in enumerate(norms)]
    _, flagged, target = nc.flag(trig)
    assert flagged == [0] and target == 0  # index 4.27 > 2 and below the median
    # a large norm is an outlier too, but on the wrong side: never flagged
    trig[5].l1 = 40.0
    assert nc.flag(trig)[1] == [0]
    with pytest.raises(InputError):
        anomaly_index(torch.tensor([1.0]))


def test_stamp_and_unlearn_step_keep_labels():
    x = torch.rand(8, 1, 4, 4)
    m = torch.zeros(4, 4)
    m[0, 0] = 1.0
    p = torch.ones(1, 4, 4)
    s = stamp(x, m, p)
    assert torch.all(s[:, 0, 0, 0] == 1) and torch.equal(s[:, :, 1:], x[:, :, 1:])
    step = UnlearnStep([(m, p)], stamp_ratio=1.0)
    assert torch.all(step.stamp_batch(x)[:, 0, 0, 0] == 1)
    assert torch.equal(UnlearnStep([(m, p)], stamp_ratio=0.0).stamp_batch(x), x)


def test_nad_attention_map_by_hand():
    a = torch.tensor([[[[1.0, -2.0]], [[3.0, 0.0]]]])  # N=1, C=2, H=1, W=2
    raw = torch.tensor([1 + 9, 4 + 0.0])  # sum over channels of |a|^2
    torch.testing.assert_close(attention_map(a), (raw / raw.norm()).view(1, 2))
    b = torch.tensor([[[[0.0, 1.0]], [[0.0, 0.0]]]])  # map (0, 1)
    want = (raw / raw.norm() - torch.tensor([0.0, 1.0])).norm()
    torch.testing.assert_close(attention_distance(b, a), want)
    torch.testing.assert_close(attention_distance(a, a), torch.tensor(0.0))
    # p = 1: sum of absolute values
    torch.testing.assert_close(attention_map(a, p=1), (torch.tensor([4.0, 2.0]) / math.sqrt(20)).view(1, 2))
    with pytest.raises(InputError):
        attention_map(torch.rand(2, 3))


def test_nad_stage_outputs():
    from robustkit.models import PreActResNet18, SmallCNN

    x = torch.rand(2, 1, 16, 16)
    assert stage_outputs(PreActResNet18(in_channels=1, width=4), x) == ["layer2", "layer3", "layer4"]
    assert stage_outputs(SmallCNN(in_channels=1, width=4), x) == ["body.1", "body.4", "body"]


def test_strip_entropy_and_superimposition_by_hand():
    torch.testing.assert_close(prediction_entropy(torch.zeros(1, 2)), torch.tensor([1.0], dtype=torch.float64))
    logits = torch.log(torch.tensor([[1.0, 3.0]]))  # p = (1/4, 3/4)
    h = -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75))
    assert float(prediction_entropy(logits)) == pytest.approx(h)
    assert float(prediction_entropy(torch.tensor([[0.0, 0.0, 0.0, 0.0]]))) == pytest.approx(2.0)
    a, b = torch.tensor([0.2, 0.7]), torch.tensor([0.5, 0.6])
    torch.testing.assert_close(superimpose(a, b), torch.tensor([0.7, 1.0]))  # saturated sum
    torch.testing.assert_close(superimpose(a, b, "average"), torch.tensor([0.35, 0.65]))


class _Bright(nn.Module):
    """Class 1 with confidence growing with the top-left pixel: blends of a bright corner stay confident."""

    def forward(self, x):
        z = 20 * (x[:, 0, 0, 0] - 0.5)
        return torch.stack([-z, z], 1)


def test_strip_threshold_at_the_false_rejection_rate():
    g = torch.Generator().manual_seed(0)
    clean = torch.rand(200, 1, 4, 4, generator=g) * 0.4  # dark corners: blends near 0.5, high entropy
    det = STRIP(n_overlay=8, frr=0.05).fit(_Bright(), (clean, None))
    h = det.entropy(clean[:200], exclude=torch.arange(200))
    assert det.fitted.frr_on_fit <= 0.05 and det.fitted.n_clean == 200
    flags, scores = det.detect(clean[:50])
    assert torch.equal(flags, scores < det.threshold)
    trig = clean[:50].clone()
    trig[:, 0, 0, 0] = 1.0  # the "trigger": a saturated corner
    out = det.evaluate(clean[:50], trig)
    assert out["tpr"] == 1.0 and out["fpr"] <= 0.1
    assert float(h.max()) <= 1.0 + 1e-9  # two classes: at most one bit
    guard = det.wrap(mode="reject")
    assert isinstance(guard, DetectorGuard)
    pred = guard(torch.cat([clean[:5], trig[:5]])).argmax(1)
    assert pred[5:].tolist() == [2] * 5 and guard.last_flags[5:].all()
    with pytest.raises(InputError, match="not fitted"):
        STRIP().detect(clean)


# --------------------------------------------------------------------------- real backdoor
@pytest.fixture(scope="module")
def cnn_victim(digits16, victim):
    """A SmallCNN (width 16) with a real BadNets backdoor (3x3 white patch, target 0) on 16x16 digits.

    Width 16 and a 3x3 patch: at width 8 with a 2x2 patch the backdoor's strength under blending (STRIP)
    and the dormant-channel structure (Fine-Pruning) changed with the float reduction order of training.
    """
    from robustkit.backdoor import BadNets
    from robustkit.models import SmallCNN

    atk = BadNets(size=3)
    torch.manual_seed(0)
    model, _, before = victim(SmallCNN(in_channels=1, width=16), atk, digits16.train, digits16.test,
                              epochs=6, lr=0.05, batch_size=64)
    assert before.acc > 0.9
    return model, atk, before


def _after(res, atk, digits16):
    from robustkit.backdoor.metrics import backdoor_metrics

    return backdoor_metrics(res.model, atk, digits16.test)


@pytest.mark.slow
def test_fine_pruning_removes_real_backdoor(cnn_victim, digits16, tmp_path):
    model, atk, before = cnn_victim
    state = _state(model)
    # small-scale setting: the last conv layer has only 32 channels and the defender 69 images (one image is
    # 1.4 points), so the paper's 4% accuracy bound stops short of the backdoor channels; 15% reaches them
    res = FinePruning(max_prune_acc_drop=0.15, epochs=5, batch_size=32, eval_every=5).repair(
        model, digits16.train, test_data=digits16.test, backdoor=atk, progress=False)
    after = _after(res, atk, digits16)
    d = res.details
    assert _unchanged(model, state) and res.model is not model
    assert d.layer == "body.4" and d.baked_into == "classifier" and d.pruned >= 1
    assert d.sweep[0]["asr"] == pytest.approx(before.asr) and len(d.sweep) >= d.pruned + 1
    # the pruning is in the weights: no hook left, the classifier's pruned columns are zero
    assert not res.model.body[4]._forward_hooks
    assert torch.all(res.model.classifier.weight[:, d.pruned_channels] == 0)
    assert after.asr < 0.4 * before.asr, (before, after, d.sweep)
    assert after.acc > before.acc - 0.08
    assert [h["epoch"] for h in res.history if "asr" in h] == [0, 5]
    assert res.history[-1]["asr"] == pytest.approx(after.asr)
    assert d.figures(tmp_path) == ["fine_pruning_sweep.png"] and (tmp_path / "fine_pruning_sweep.png").is_file()
    assert d.tables()[0][1] == d.sweep


def test_fine_pruning_fixed_ratio_without_finetuning(cnn_victim, digits16):
    model, _, _ = cnn_victim
    res = FinePruning(prune_ratio=0.25, epochs=0).repair(model, digits16.train, progress=False)
    assert res.details.pruned == 8 and res.history == []
    x = digits16.test.images[:32] if hasattr(digits16.test, "images") else None
    from robustkit.data import to_tensors

    x, _ = to_tensors(digits16.test)
    masked = copy.deepcopy(model)
    from robustkit.repair.fine_pruning import ChannelMask

    mk = ChannelMask(masked.body[4], 32)
    mk.set(res.details.pruned_channels)
    with torch.no_grad():
        torch.testing.assert_close(res.model.eval()(x[:64]), masked.eval()(x[:64]), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_neural_cleanse_detects_target_and_unlearns(cnn_victim, digits16, tmp_path):
    model, atk, before = cnn_victim
    state = _state(model)
    res = NeuralCleanse(epochs=5, eval_every=5).repair(model, digits16.train, test_data=digits16.test, backdoor=atk,
                                                      progress=False)
    d = res.details
    after = _after(res, atk, digits16)
    assert _unchanged(model, state)
    assert d.target == atk.target and atk.target in d.flagged, d.tables()
    assert d.anomaly[atk.target] > 2 and d.l1[atk.target] == min(d.l1)
    assert d.masks.shape == (10, 1, 16, 16) and d.patterns.shape == (10, 1, 16, 16)
    assert d.unlearned and after.asr < 0.3 * before.asr, (before, after)
    assert after.acc > before.acc - 0.08
    names = d.figures(tmp_path)
    assert names == ["neural_cleanse_anomaly.png", "neural_cleanse_triggers.png"]
    assert all((tmp_path / n).is_file() for n in names)
    assert [r["label"] for r in d.tables()[0][1]] == list(range(10))


@pytest.mark.slow
def test_nad_removes_real_backdoor(cnn_victim, digits16):
    model, atk, before = cnn_victim
    state = _state(model)
    # small-scale setting (documented in docs/baselines.md): a stronger teacher fine-tuning than the paper's
    # 10 epochs at lr 0.01, since 5% of the digits is 69 images (3 steps per epoch), and beta 20
    res = NAD(teacher_epochs=20, teacher_lr=0.02, epochs=20, batch_size=32, betas=20.0, eval_every=20).repair(
        model, digits16.train, test_data=digits16.test, backdoor=atk, progress=False)
    after = _after(res, atk, digits16)
    d = res.details
    assert _unchanged(model, state)
    assert d.layers == ["body.1", "body.4", "body"] and d.betas == [20.0] * 3
    assert after.asr < 0.3 * before.asr, (before, after, d)
    assert after.acc > before.acc - 0.1
    # the distillation, not the teacher's fine-tuning alone, removes the backdoor
    assert d.teacher_asr > after.asr + 0.2
    assert not any(m._forward_hooks for m in res.model.modules())


def test_strip_detects_real_triggered_inputs(cnn_victim, digits16):
    from robustkit.backdoor.metrics import triggered_test_set
    from robustkit.data import to_tensors
    from robustkit.repair.guard import split_clean

    model, atk, _ = cnn_victim
    state = _state(model)
    det = STRIP(n_overlay=32).fit(model, split_clean(digits16.train, 0.1).train)
    x, _ = to_tensors(digits16.test)
    xt, _, _ = triggered_test_set(atk, digits16.test)
    out = det.evaluate(x, xt)
    assert out["tpr"] > 0.8 and out["fpr"] < 0.05, out
    guard = det.wrap(mode="reject")
    rejected = float((guard(xt[:100]).argmax(1) == 10).float().mean())
    assert rejected > 0.8
    assert _unchanged(model, state)



# --------------------------------------------------------------------------- ANP
def _bn_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        bn = net[1]
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return net.eval()


def test_anp_perturbed_neuron_and_mask_update_by_hand():
    from robustkit.repair.anp import ANPNet, ANPStep
    from robustkit.training import fit

    net = _bn_net()
    bn = net[1]
    x = torch.rand(6, 3)
    y = torch.tensor([0, 1, 1, 0, 1, 0])
    anp = ANPNet(copy.deepcopy(net))
    # the hook computes gamma (m + delta) x_hat + beta (1 + xi)
    m, delta, xi = torch.tensor([1.0, 0.5, 0.0, 0.8]), torch.tensor([0.1, -0.2, 0.3, 0.0]), torch.tensor([0.4, 0.0, -0.1, 0.2])
    with torch.no_grad():
        anp.masks[0].copy_(m)
    anp.deltas[0].copy_(delta)
    anp.xis[0].copy_(xi)
    anp.perturb = True
    h = net[0](x)
    x_hat = (h - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps)
    want = net[3](torch.relu(bn.weight * (m + delta) * x_hat + bn.bias * (1 + xi)))
    torch.testing.assert_close(anp(x), want)
    anp.remove()

    # one ANP iteration with eps = 0: the mask takes one SGD step of lr 0.2 on the clean loss, clipped to [0, 1]
    anp = ANPNet(copy.deepcopy(net))
    mask = torch.ones(4, requires_grad=True)
    loss = nn.functional.cross_entropy(net[3](torch.relu(bn.weight * mask * x_hat + bn.bias)), y)
    (g,) = torch.autograd.grad(loss, mask)
    fit(anp, _Pairs(x, y), ANPStep(eps=0.0), epochs=1, lr=0.2,
        batch_size=6, momentum=0.9, weight_decay=0.0, schedule="constant",
        trainable=lambda n, p: n.startswith("masks."), train_mode=lambda mod: mod.eval(), progress=False)
    anp.clip_masks()
    torch.testing.assert_close(anp.masks[0].detach(), (1 - 0.2 * g).clamp(0, 1))
    # the network's own weights did not move
    for (n, p), q in zip(anp.net.named_parameters(), net.parameters()):
        assert torch.equal(p, q), n
    anp.remove()


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def test_anp_refuses_a_model_without_batchnorm():
    from robustkit.data import ArrayDataset
    from robustkit.repair.anp import ANP

    data = ArrayDataset(torch.rand(40, 1, 8, 8), torch.arange(40) % 10)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    with pytest.raises(InputError, match="no BatchNorm"):
        ANP(iterations=1).repair(model, data, progress=False)


def test_anp_on_the_real_victim_prunes_within_the_accuracy_bound(cnn_victim, digits16, tmp_path):
    """The mechanics on a real network (a few iterations; the digits victim's ASR is not claimed here, see
    docs/baselines.md): masks per BN layer, the pruned neurons' gamma zeroed in a copy, the sweep bounded."""
    from robustkit.repair.anp import ANP
    from robustkit.repair.guard import clean_accuracy, split_clean

    model, _, _ = cnn_victim
    state = _state(model)
    rep = ANP(iterations=10, clean_ratio=0.05, threshold=1.0, max_prune_acc_drop=0.05)
    res = rep.repair(model, digits16.train, progress=False)
    d = res.details
    assert _unchanged(model, state)
    assert set(d.masks) == {"body.0.1", "body.1.1", "body.3.1", "body.4.1"} and d.neurons == 96
    assert all(0.0 <= v <= 1.0 for vs in d.masks.values() for v in vs)
    mods = dict(res.model.named_modules())
    for name, idx in d.pruned_per_layer.items():
        assert torch.all(mods[name].weight[idx] == 0)
    assert d.pruned == sum(len(v) for v in d.pruned_per_layer.values()) and len(d.sweep) >= d.pruned
    sub = split_clean(digits16.train, 0.05).train
    assert clean_accuracy(model, sub) - clean_accuracy(res.model, sub) <= 0.05 + 1e-9
    assert d.figures(tmp_path) == ["anp_masks.png"] and d.tables()[0][1][0]["layer"] == "body.0.1"


def test_anp_optimizes_the_masks_on_crops_when_asked():
    """``augment="crop"`` (the paper's code crops the clean data) changes the masks, seeded; it is recorded and
    refused on non-image data; the default is off (docs/baselines.md: worse on the digits victims)."""
    from robustkit.data import ArrayDataset
    from robustkit.repair.anp import ANP

    torch.manual_seed(0)
    x = torch.rand(40, 1, 8, 8)
    data = ArrayDataset(x, (x[:, :, :, :4].mean((1, 2, 3)) > x[:, :, :, 4:].mean((1, 2, 3))).long())
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 2))
    kw = dict(iterations=3, batch_size=16, clean_ratio=1.0, holdout_ratio=0.1)
    plain, crop, again = (ANP(**kw, augment=a).repair(model, data, progress=False) for a in (None, "crop", "crop"))
    assert ANP().augment is None and plain.details.augment == "none" and crop.details.augment == "crop"
    assert crop.details.masks == again.details.masks and crop.details.masks != plain.details.masks
    assert "augment='crop'" in repr(ANP(augment="crop"))
    with pytest.raises(InputError, match="crop_padding"):
        ANP(crop_padding=-1)
    with pytest.raises(InputError, match="augment must be"):
        ANP(augment="flip")


@pytest.mark.slow
def test_anp_batch_statistics_keep_the_network_running_statistics_collapse_it(cnn_victim, digits16):
    """The root cause of ANP's collapse on small networks (docs/baselines.md): optimizing the masks with BN on
    its running statistics drives ~40 of the 96 masks below the threshold (clean accuracy to chance, the guard
    fires); on batch statistics, as the paper's code does, a few neurons are pruned and accuracy is kept."""
    import warnings

    from robustkit.backdoor.metrics import backdoor_metrics
    from robustkit.repair.anp import ANP

    model, atk, before = cnn_victim
    res = ANP(iterations=100, clean_ratio=0.05).repair(model, digits16.train, progress=False)
    assert res.details.pruned <= 10 and not res.collapsed, res.details.pruned
    assert backdoor_metrics(res.model, atk, digits16.test).acc > before.acc - 0.03
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        bad = ANP(iterations=100, clean_ratio=0.05, bn_mode="running").repair(model, digits16.train, progress=False)
    assert bad.details.pruned > 25 and bad.collapsed
    with pytest.raises(InputError, match="bn_mode"):
        ANP(bn_mode="train")


# --------------------------------------------------------------------------- I-BAU
def _ibau_tiny():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x = 0.25 + 0.5 * torch.rand(5, 1, 2, 2)  # x + delta stays inside [0, 1]: the clip is the identity
    y = torch.tensor([0, 1, 2, 1, 0])
    return model, x, y


def _tiny_loss(x, y):
    def loss(dv, w, b):
        return nn.functional.cross_entropy((x + dv.view(1, 1, 2, 2)).flatten(1) @ w.T + b, y)
    return loss


def test_ibau_neumann_hypergradient_by_hand():
    """The paper's fixed-point method (``hypergrad="neumann"``), one outer step against the formula:
    grad_theta L + (dPhi/dtheta)^T v, v = (dPhi/ddelta)^T g + g (one fixed-point iteration from v = g),
    Phi = delta + eta grad_delta L, with the Hessian written out."""
    from robustkit.data import ArrayDataset
    from robustkit.repair.ibau import IBAUStep

    model, x, y = _ibau_tiny()
    delta = 0.1 * torch.randn(1, 2, 2)
    eta = 0.3
    step = IBAUStep(ArrayDataset(x, y), eps=1.0, inner_steps=1, steps_per_round=100, fixed_point_iters=1, eta=eta,
                    hypergrad="neumann")
    step.setup(model, list(model.named_parameters()))
    step.delta, step._count = delta, 1  # mid-round: keep this delta
    for p in model.parameters():
        p.grad = None
    step(model, x, y)
    got = [p.grad.clone() for p in model.parameters()]

    w, b = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    loss = _tiny_loss(x, y)
    d0 = delta.flatten()
    g = torch.autograd.functional.jacobian(lambda dv: loss(dv, w, b), d0)
    hess = torch.autograd.functional.hessian(lambda dv: loss(dv, w, b), d0)
    v = (torch.eye(4) + eta * hess).T @ g + g
    direct = torch.autograd.grad(loss(d0, w, b), [w, b])
    d0r = d0.clone().requires_grad_(True)
    (gi,) = torch.autograd.grad(loss(d0r, w, b), d0r, create_graph=True)
    indirect = torch.autograd.grad(eta * (gi * v).sum(), [w, b])
    for a, dd, ii in zip(got, direct, indirect):
        torch.testing.assert_close(a, dd + ii, rtol=1e-4, atol=1e-6)


def test_ibau_cg_hypergradient_matches_a_direct_kkt_solve():
    """The default hypergradient against ``torch.linalg.solve`` on the explicit KKT system of the ball-constrained
    inner problem at a boundary point: with M = [[mu I - H, delta], [delta^T, 0]] (H the explicit 4 x 4 Hessian),
    [u; s] = M^-1 [g; 0] and .grad = grad_theta L + d/dtheta (grad_delta L . u)."""
    from robustkit.data import ArrayDataset
    from robustkit.repair.ibau import IBAUStep

    model, x, y = _ibau_tiny()
    eps = 0.2
    delta = torch.randn(1, 2, 2)
    delta = eps * delta / delta.norm()  # on the sphere; |delta_i| <= 0.2 < 0.25 keeps the clip the identity
    w, b = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    loss = _tiny_loss(x, y)
    d0 = delta.flatten()
    hess = torch.autograd.functional.hessian(lambda dv: loss(dv, w, b), d0).detach()
    evals = torch.linalg.eigvalsh(hess)
    assert float(evals[0]) > -1e-6  # cross-entropy of a linear model is convex in the input: ascent cannot contract
    mu = float(evals[-1]) + 0.3  # second-order condition of a strict maximizer on the sphere
    step = IBAUStep(ArrayDataset(x, y), eps=eps, inner_steps=1, steps_per_round=100, cg_iters=50, cg_tol=1e-10)
    step.setup(model, list(model.named_parameters()))
    step.delta, step.mu, step.on_boundary, step._count = delta, mu, True, 1
    for p in model.parameters():
        p.grad = None
    step(model, x, y)
    got = [p.grad.clone() for p in model.parameters()]
    assert step.solver[-1]["residual"] < 1e-5 and not step.solver[-1]["negative_curvature"]

    g = torch.autograd.functional.jacobian(lambda dv: loss(dv, w, b), d0)
    m = torch.zeros(5, 5)
    m[:4, :4] = mu * torch.eye(4) - hess
    m[:4, 4] = d0
    m[4, :4] = d0
    u = torch.linalg.solve(m, torch.cat([g, torch.zeros(1)]))[:4]
    assert float(u @ d0) == pytest.approx(0.0, abs=1e-6)  # tangent
    direct = torch.autograd.grad(loss(d0, w, b), [w, b])
    d0r = d0.clone().requires_grad_(True)
    (gi,) = torch.autograd.grad(loss(d0r, w, b), d0r, create_graph=True)
    indirect = torch.autograd.grad((gi * u).sum(), [w, b])
    for a, dd, ii in zip(got, direct, indirect):
        torch.testing.assert_close(a, dd + ii, rtol=1e-4, atol=1e-6)
    assert any(float(ii.abs().max()) > 1e-3 for ii in indirect)  # the indirect term is not trivially zero here


def test_ibau_tangent_cg_and_kkt_helpers():
    from robustkit.repair.ibau import kkt_multiplier, tangent_cg

    torch.manual_seed(0)
    q = torch.randn(6, 6)
    h = q @ q.T / 6  # PSD, like a ReLU network's input Hessian of the cross-entropy
    delta = torch.randn(6)
    rhs = torch.randn(6)
    mu = float(torch.linalg.eigvalsh(h)[-1]) + 0.5
    u, info = tangent_cg(lambda v: h @ v, rhs, delta, mu, iters=50, tol=1e-10)
    assert info["iters"] <= 6 and info["residual"] < 1e-5 and not info["negative_curvature"], info
    p = torch.eye(6) - torch.outer(delta, delta) / float(delta @ delta)
    torch.testing.assert_close(p @ (mu * torch.eye(6) - h) @ u, p @ rhs, rtol=1e-4, atol=1e-5)
    assert float(u @ delta) == pytest.approx(0.0, abs=1e-5)
    # mu below H's curvature: not a maximizer, the implicit function theorem does not apply - u = 0, flagged
    u, info = tangent_cg(lambda v: h @ v, rhs, delta, 0.0, iters=50, tol=1e-10)
    assert info["negative_curvature"] and torch.equal(u, torch.zeros(6))
    # KKT: grad = mu delta on the sphere -> residual 0; a tangential part shows up in the residual
    d = torch.tensor([3.0, 4.0])
    assert kkt_multiplier(d, 2 * d, eps=5.0) == (pytest.approx(2.0), pytest.approx(0.0), True)
    mu, res, on = kkt_multiplier(d, torch.tensor([3.0, 4.0]) + torch.tensor([4.0, -3.0]), eps=5.0)
    assert on and mu == pytest.approx(1.0) and res == pytest.approx(5 / math.sqrt(50))
    assert kkt_multiplier(d, d, eps=10.0) == (0.0, 1.0, False)


def test_ibau_on_the_real_victim(cnn_victim, digits16):
    """At its defaults I-BAU removes the digits victim's backdoor without swinging back (the implicit gradient now
    solved on the inner problem's KKT system), at a clean-accuracy cost that is documented in docs/baselines.md
    (12-31 points on 66 clean images); the input is untouched, a fresh perturbation of norm eps per round."""
    from robustkit.repair.guard import split_clean
    from robustkit.repair.ibau import IBAU, universal_perturbation

    model, atk, before = cnn_victim
    state = _state(model)
    sub = split_clean(digits16.train, 0.05).train
    delta = universal_perturbation(model, sub.images, sub.labels, eps=2.5, steps=5)
    assert float(delta.norm()) == pytest.approx(2.5, rel=1e-4)
    with torch.no_grad():
        flipped = model((sub.images + delta).clamp(0, 1)).argmax(1)
    assert float((flipped == atk.target).float().mean()) > 0.8
    res = IBAU().repair(model, digits16.train, test_data=digits16.test, backdoor=atk, progress=False)
    d = res.details
    after = _after(res, atk, digits16)
    assert _unchanged(model, state)
    assert d.hypergrad == "cg" and d.rounds == 5 and len(d.delta_norms) == 5
    assert all(n == pytest.approx(2.5, rel=1e-4) for n in d.delta_norms)
    assert [h["epoch"] for h in res.history] == list(range(6)) and "asr" in res.history[-1]
    assert after.asr < 0.2 * before.asr, (before, after, res.history)
    # no swing back: every round after the second stays far below the backdoored ASR
    assert all(h["asr"] < 0.3 * before.asr for h in res.history[2:]), res.history
    assert after.acc > 0.5, (before, after)
    # the diagnostics are honest: an inner solution near a KKT point, CG residuals in [0, 1], bounded indirect term
    assert len(d.kkt_residuals) == 5 and max(d.kkt_residuals) < 0.5
    assert d.cg_residual_max is not None and 0 <= d.cg_residual_max <= 1
    assert d.indirect_ratio_mean is not None and d.neumann_growth_max is None


# --------------------------------------------------------------------------- ViT
def test_vit_methods_that_apply_run_and_the_others_refuse_clearly():
    """On robustkit's SmallViT: Neural Cleanse, STRIP and I-BAU are model-agnostic and run (mechanics, a tiny
    untrained ViT); Fine-Pruning and NAD need conv feature maps and ANP BatchNorm neurons: clear InputErrors."""
    from robustkit.data import ArrayDataset
    from robustkit.repair.anp import ANP
    from robustkit.repair.ibau import IBAU

    torch.manual_seed(0)
    vit = _vit().eval()
    state = _state(vit)
    data = ArrayDataset(torch.rand(60, 1, 16, 16), torch.arange(60) % 10)
    with pytest.raises(InputError, match="Vision Transformer"):
        FinePruning(epochs=0).repair(vit, data, progress=False)
    with pytest.raises(InputError, match="tokens"):
        NAD(teacher_epochs=1, epochs=1).repair(vit, data, progress=False)
    with pytest.raises(InputError, match="no BatchNorm.*LayerNorm"):
        ANP(iterations=1).repair(vit, data, progress=False)
    nc = NeuralCleanse(epochs_per_label=1, epochs=1, clean_ratio=0.5).repair(vit, data, progress=False)
    assert nc.details.masks.shape == (10, 1, 16, 16) and len(nc.details.anomaly) == 10
    ib = IBAU(rounds=1, clean_ratio=0.5).repair(vit, data, progress=False)
    assert ib.details.rounds == 1 and ib.model is not vit
    assert any(not torch.equal(p, q) for p, q in zip(ib.model.parameters(), vit.parameters()))
    det = STRIP(n_overlay=4).fit(vit, data)
    flags, h = det.detect(data.images[:5])
    assert flags.shape == (5,) and torch.all(h >= 0)
    assert _unchanged(vit, state)
