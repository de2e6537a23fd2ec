"""Adversarial training on the one loop: TRADES loss against a hand computation, PGD-AT / TRADES
against plain training, modes and BatchNorm, the preprocessor in the loop (a/b schedule, EOT),
the monitor, the ``train`` step's config validation, warm start and the training plot."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robustkit
from robustkit.attacks import PGD
from robustkit.data import to_tensors
from robustkit.errors import ConfigError, DataNotFoundError, InputError
from robustkit.eval.metrics import robust_accuracy
from robustkit.models import SmallCNN
from robustkit.preprocessing import BilateralFilter, GaussianNoise
from robustkit.training import (
    PGDATStep,
    PlainStep,
    RobustAccuracy,
    TRADESStep,
    check_adversarial,
    check_monitor,
    fit,
)

EPS = 8 / 255


def _batch(digits16, n=32):
    x, y = to_tensors(digits16.train, n)
    return x, y


def _cnn(seed=0, width=8):
    torch.manual_seed(seed)
    return SmallCNN(in_channels=1, num_classes=10, width=width)


def _settled(digits16, seed=0):
    """A model whose BatchNorm running statistics differ from their initial values."""
    m = _cnn(seed)
    x, _ = _batch(digits16, 64)
    m.train()
    with torch.no_grad():
        m(x)
    return m


# --------------------------------------------------------------------------- TRADES by hand
def test_trades_loss_and_attack_equal_a_hand_computation(digits16):
    x, y = _batch(digits16)
    model = _settled(digits16)
    hand = copy.deepcopy(model)
    step = TRADESStep(eps=EPS, steps=3, beta=6.0, seed=123)
    step.set_seed(0)
    step.setup(model, list(model.named_parameters()))
    model.train()
    loss, logits = step(model, x, y)

    # the TRADES reference algorithm, written out: eval-mode attack from x + 0.001 N(0, I)
    gen = torch.Generator().manual_seed(123)
    hand.eval()
    with torch.no_grad():
        p_nat = F.softmax(hand(x), dim=1)
    project = lambda z: (x + (z - x).clamp(-EPS, EPS)).clamp(0, 1)  # noqa: E731  (Linf ball and [0, 1])
    x_adv = project(x + 0.001 * torch.randn(x.shape, generator=gen))
    for _ in range(3):
        x_adv.requires_grad_(True)
        kl = F.kl_div(F.log_softmax(hand(x_adv), dim=1), p_nat, reduction="sum")
        (g,) = torch.autograd.grad(kl, x_adv)
        x_adv = project(x_adv.detach() + 0.007 * g.sign())
    assert torch.allclose(step.last_adversarial, x_adv, atol=1e-6)
    assert (x_adv - x).abs().max() <= EPS + 1e-6 and (x_adv - x).abs().max() > EPS / 2

    # loss in train mode: CE(f(x), y) + beta * (1/B) sum_i KL(p(x_i) || p(x'_i)), no stop-gradient
    hand.train()
    nat, adv = hand(x), hand(x_adv)
    p, logp, logq = F.softmax(nat, 1), F.log_softmax(nat, 1), F.log_softmax(adv, 1)
    expected = F.cross_entropy(nat, y) + 6.0 * (p * (logp - logq)).sum() / x.shape[0]
    expected.backward()
    assert float(loss) == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    assert torch.allclose(logits, nat.detach(), atol=1e-5)
    for (name, a), (_, b) in zip(model.named_parameters(), hand.named_parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6), name
    for a, b in zip(model.buffers(), hand.buffers()):  # same BN updates: two train-mode forwards
        assert torch.allclose(a.float(), b.float(), atol=1e-6)


def test_pgd_at_step_trains_on_pgd_examples_inside_the_ball(digits16):
    x, y = _batch(digits16)
    model = _settled(digits16)
    step = PGDATStep(eps=EPS, steps=4)
    assert step.step_size == pytest.approx(2.5 * EPS / 4)
    step.set_seed(0)
    model.train()
    step(model, x, y)
    x_adv = step.last_adversarial
    assert (x_adv - x).abs().max() <= EPS + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    model.eval()
    with torch.no_grad():
        assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y)  # the attack did its job
    assert all(p.grad is not None for p in model.parameters())
    # same seed, same draws: the step is reproducible
    other = PGDATStep(eps=EPS, steps=4)
    other.set_seed(0)
    m2 = _settled(digits16)
    m2.train()
    other(m2, x, y)
    assert torch.equal(other.last_adversarial, x_adv)


def test_l2_steps_stay_in_the_l2_ball(digits16):
    x, y = _batch(digits16, 16)
    for step in (PGDATStep(eps=0.5, steps=3, norm="l2"), TRADESStep(eps=0.5, steps=3, norm="l2")):
        model = _settled(digits16)
        model.train()
        step(model, x, y)
        assert (step.last_adversarial - x).flatten(1).norm(dim=1).max() <= 0.5 + 1e-5


# --------------------------------------------------------------------------- modes and BatchNorm
def _bn_state(model):
    return [(m.running_mean.clone(), m.running_var.clone(), int(m.num_batches_tracked))
            for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


@pytest.mark.parametrize("attack_mode", ["eval", "train"])
@pytest.mark.parametrize("cls", [PGDATStep, TRADESStep])
def test_attack_leaves_bn_statistics_and_modes_alone(digits16, cls, attack_mode):
    x, y = _batch(digits16)
    model = _settled(digits16)
    model.train()
    frozen = model.body[0][1]  # a BatchNorm deliberately kept in eval mode (e.g. by fit's train_mode)
    frozen.eval()
    modes = [m.training for m in model.modules()]
    before = _bn_state(model)
    step = cls(eps=EPS, steps=2, attack_mode=attack_mode)
    step.perturb(model, x, y)
    assert [m.training for m in model.modules()] == modes
    for (m0, v0, n0), (m1, v1, n1) in zip(before, _bn_state(model)):
        assert torch.equal(m0, m1) and torch.equal(v0, v1) and n0 == n1
    # the training step's own forwards are in train mode: PGD-AT one, TRADES two (clean and adversarial)
    step(model, x, y)
    forwards = 1 if cls is PGDATStep else 2
    after = _bn_state(model)
    assert [m.training for m in model.modules()] == modes
    trained = [i for i, m in enumerate(m for m in model.modules() if isinstance(m, nn.BatchNorm2d)) if m is not frozen]
    assert all(after[i][2] == before[i][2] + forwards for i in trained)
    assert after[0][2] == before[0][2] and torch.equal(after[0][0], before[0][0])  # the frozen BN stayed frozen


def test_eval_and_train_attack_modes_differ(digits16):
    x, y = _batch(digits16)
    model = _settled(digits16)
    model.train()
    a = PGDATStep(eps=EPS, steps=3, random_start=False, attack_mode="eval").perturb(model, x, y)
    b = PGDATStep(eps=EPS, steps=3, random_start=False, attack_mode="train").perturb(model, x, y)
    assert not torch.equal(a, b)


class _Recorder(nn.Module):
    """An identity 'preprocessor' recording its mode and whether gradients flow through it."""

    randomized = False

    def __init__(self):
        super().__init__()
        self.modes: list[bool] = []
        self.grad_calls = 0

    def forward(self, x):
        self.modes.append(self.training)
        self.grad_calls += int(x.requires_grad)
        return x * 1.0


def test_preprocessor_is_in_the_loop_in_train_mode_with_gradients(digits16):
    x, y = _batch(digits16)
    rec = _Recorder()
    rec.eval()
    model = _settled(digits16)
    model.train()
    step = TRADESStep(eps=EPS, steps=2, preprocess=rec)
    step(model, x, y)
    # target (1) + attack steps (2) + clean and adversarial loss forwards (2), all in train mode
    assert rec.modes == [True] * 5
    assert rec.grad_calls == 2  # the attack differentiates through the preprocessor


def test_a_b_schedule_train_iterations_in_training_iterations_at_test_time(digits16):
    calls: list[int] = []

    def spy_on(mod):
        def spy(x):
            calls.append(mod.train_iterations if mod.training else mod.iterations)
            return BilateralFilter.forward(mod, x)

        mod.forward = spy

    bil = BilateralFilter(kernel_size=3, iterations=3, train_iterations=1)
    spy_on(bil)
    x, y = _batch(digits16, 16)
    model = _settled(digits16)
    model.train()
    PGDATStep(eps=EPS, steps=1, preprocess=bil)(model, x, y)
    assert calls and set(calls) == {1}  # "a" filter iterations in training
    calls.clear()
    mon = RobustAccuracy((x, y), n_samples=16, steps=1, preprocess=bil)
    assert mon.preprocess is not bil  # the monitor measures a copy
    spy_on(mon.preprocess)
    mon.measure(model.eval())
    assert calls and set(calls) == {3}  # "b" at test time


def test_eot_is_used_when_the_training_defense_is_randomized(digits16):
    assert TRADESStep(preprocess=BilateralFilter()).eot == 1
    assert TRADESStep(preprocess=nn.Sequential(GaussianNoise(0.05), BilateralFilter())).eot == 4
    assert PGDATStep(preprocess=GaussianNoise(0.05), eot_samples=2).eot == 2
    x, y = _batch(digits16, 8)
    rec = _Recorder()
    rec.randomized = True
    model = _settled(digits16)
    model.train()
    PGDATStep(eps=EPS, steps=2, preprocess=rec, eot_samples=3)(model, x, y)
    assert rec.grad_calls == 2 * 3


# --------------------------------------------------------------------------- the point of it
@pytest.mark.slow
def test_adversarial_training_beats_plain_training_under_pgd(digits16):
    """Same model, data, epochs and optimizer: PGD-AT and TRADES models (trained at 16/255) are far
    more robust under PGD-10 at 16/255 (digits are easy: at 8/255 plain training keeps ~0.4-0.5)."""
    eps = 16 / 255
    x, y = to_tensors(digits16.test, 200)
    attack = PGD(eps=eps, steps=10, seed=0)
    results = {}
    for name, step in (("plain", PlainStep()), ("pgd", PGDATStep(eps=eps, steps=5)), ("trades", TRADESStep(eps=eps, steps=5))):
        model = _cnn(0)
        fit(model, digits16.train, step, epochs=3, lr=0.05, progress=False)
        res = robust_accuracy(model, attack, x, y, progress=False)
        results[name] = (res.clean_accuracy, res.robust_accuracy)
    # measured: PGD accuracy plain 0.085, PGD-AT 0.47, TRADES 0.49 (clean 0.90, 0.715, 0.86)
    assert results["pgd"][1] > results["plain"][1] + 0.2, results
    assert results["trades"][1] > results["plain"][1] + 0.2, results
    assert min(r[0] for r in results.values()) > 0.6, results


def test_monitor_records_clean_and_pgd_accuracy_per_epoch(digits16, tmp_path):
    model = _cnn(0)
    mon = RobustAccuracy(digits16.test, n_samples=64, steps=2)
    train = torch.utils.data.Subset(digits16.train, range(256))
    hist = fit(model, train, TRADESStep(eps=EPS, steps=1), epochs=2, progress=False, callbacks=[mon])
    assert [h["epoch"] for h in hist] == [0, 1, 2]
    assert set(hist[0]) == {"epoch", "clean_acc", "pgd_acc"}
    assert all(0 <= h["pgd_acc"] <= h["clean_acc"] <= 1 for h in hist)
    from robustkit.eval.plots import training_curves

    assert training_curves(hist, tmp_path / "t.png").is_file()


# --------------------------------------------------------------------------- config
def test_check_adversarial_normalizes_and_names_bad_keys():
    out = check_adversarial({"method": "TRADES", "eps": "8/255", "steps": 10, "beta": 6})
    assert out == {"method": "trades", "eps": pytest.approx(EPS), "steps": 10, "beta": 6.0}
    assert check_adversarial(None) is None and check_adversarial("pgd") == {"method": "pgd"}
    bad = [
        ({"eps": 0.03}, "adversarial", "needs 'method'"),
        ({"method": "fgsm"}, "adversarial.method", "pgd or trades"),
        ({"method": "trade"}, "adversarial.method", "Did you mean 'trades'"),
        ({"method": "pgd", "beta": 6}, "adversarial.beta", "only applies to method trades"),
        ({"method": "trades", "random_start": False}, "adversarial.random_start", "only applies to method pgd"),
        ({"method": "trades", "step": 5}, "adversarial.step", "Did you mean 'steps'"),
        ({"method": "trades", "eps": -0.1}, "adversarial.eps", ">= 0"),
        ({"method": "trades", "eps": 8}, "adversarial.eps", "8/255"),
        ({"method": "trades", "eps": "eight"}, "adversarial.eps", "expected a number"),
        ({"method": "pgd", "steps": 0}, "adversarial.steps", ">= 1"),
        ({"method": "pgd", "alpha": 0}, "adversarial.alpha", "> 0"),
        ({"method": "pgd", "norm": "l1"}, "adversarial.norm", "linf, l2"),
        ({"method": "pgd", "eot_samples": 0}, "adversarial.eot_samples", ">= 1"),
        ({"method": "pgd", "attack_mode": "test"}, "adversarial.attack_mode", "eval, train"),
        ({"method": "pgd", "random_start": "yes"}, "adversarial.random_start", "true or false"),
        ([1, 2], "adversarial", "expected a mapping"),
    ]
    for spec, path, text in bad:
        with pytest.raises(ConfigError) as info:
            check_adversarial(spec)
        assert info.value.path == path and text in str(info.value), (spec, str(info.value))
    with pytest.raises(ConfigError, match="Did you mean 'n_samples'") as info:
        check_monitor({"samples": 10}, None)
    assert info.value.path == "monitor.samples"
    assert check_monitor(None, None) is None
    assert check_monitor(None, {"eps": 0.1, "norm": "l2"}) == {"eps": 0.1, "norm": "l2"}


def _config(train: dict, **top) -> dict:
    # 8x8 digits, 80 % held out: 359 training images (quick)
    return {"name": "adv", "seed": 0, "device": "cpu", "data": {"name": "digits", "size": 8, "test_fraction": 0.8},
            "model": {"name": "small_cnn", "width": 8}, "steps": [{"train": train}], **top}


def test_train_step_config_is_validated_before_anything_runs(tmp_path):
    ok = robustkit.validate_config(_config({"epochs": 1, "adversarial": {"method": "trades", "eps": "8/255"}}))
    assert ok["steps"][0]["train"]["adversarial"]["method"] == "trades"
    cases = [
        ({"adversarial": {"method": "trades", "beta": "six"}}, "steps[0].train.adversarial.beta"),
        ({"adversarial": {"method": "madry", "beta": 6}}, "steps[0].train.adversarial.beta"),
        ({"adversarial": {"method": "trades"}, "monitor": {"n_sample": 5}}, "steps[0].train.monitor.n_sample"),
        ({"adversarial": {"method": "trades"}, "monitor": "yes"}, "steps[0].train.monitor"),
        ({"warm_start": str(tmp_path / "missing.pt")}, "steps[0].train.warm_start.checkpoint"),
        ({"warm_start": {"path": "x.pt"}}, "steps[0].train.warm_start"),
        ({"preprocessors": "noise_bilateral"}, "steps[0].train.preprocessors"),
        ({"preprocessors": [{"name": "bilateral", "train_iterations": -1}]}, "steps[0].train.preprocessors[0]"),
        ({"augment": "mixup"}, "steps[0].train.augment"),
        ({"augment": "crop", "crop_padding": -1}, "steps[0].train.crop_padding"),
    ]
    for train, path in cases:
        with pytest.raises(ConfigError) as info:
            robustkit.validate_config(_config({"epochs": 1, **train}))
        assert info.value.path == path, (train, str(info.value))


def test_train_step_runs_trades_with_the_defense_in_the_loop(tmp_path):
    cfg = _config({"epochs": 1, "batch_size": 128,
                   "preprocessors": [{"name": "noise_bilateral", "sigma": 0.02, "kernel_size": 3,
                                      "train_iterations": 1, "iterations": 2}],
                   "adversarial": {"method": "trades", "eps": "8/255", "steps": 1, "eot_samples": 1},
                   "monitor": {"n_samples": 32, "steps": 1, "draws": 1, "eot_samples": 1}})
    report = robustkit.run(cfg, out_dir=tmp_path, progress=False, log=None)
    rows = report.table("Training").rows
    assert [r["epoch"] for r in rows] == [0, 1] and "pgd_acc" in rows[1] and "loss" in rows[1]
    assert "monitor_pgd_accuracy" in report.metrics
    assert any("TRADESStep" in n for n in report.notes)
    assert (tmp_path / "training.png").is_file()


def test_warm_start_loads_a_bare_state_dict_before_training(tmp_path):
    torch.manual_seed(1)
    source = SmallCNN(in_channels=1, num_classes=10, width=8)
    torch.save(source.state_dict(), tmp_path / "sd.pt")  # a bare state dict, as plain PyTorch code writes
    cfg = _config({"epochs": 1, "lr": 1e-6, "warm_start": str(tmp_path / "sd.pt")},
                  output_dir=str(tmp_path / "run"))
    cfg["steps"].append({"save_model": {"path": "model.pt"}})
    robustkit.run(cfg, progress=False, log=None)
    trained = robustkit.models.load_checkpoint(tmp_path / "run" / "model.pt")
    fresh = _cnn(0)  # what the run would start from without warm_start (seed 0)
    w = "body.0.0.weight"
    assert torch.allclose(trained.state_dict()[w], source.state_dict()[w], atol=1e-4)
    assert not torch.allclose(fresh.state_dict()[w], source.state_dict()[w], atol=1e-2)
    cfg["model"]["width"] = 16
    with pytest.raises(InputError, match="shape mismatch"):
        robustkit.run(cfg, out_dir=tmp_path / "run2", progress=False, log=None)


def test_step_arguments_are_checked():
    with pytest.raises(InputError, match="steps"):
        TRADESStep(steps=0)
    with pytest.raises(InputError, match="beta"):
        TRADESStep(beta=-1)
    with pytest.raises(InputError, match="attack_mode"):
        PGDATStep(attack_mode="test")
    with pytest.raises(InputError, match="preprocess"):
        PGDATStep(preprocess="noise_bilateral")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="distributed=True"):
        fit(_cnn(), [(torch.rand(1, 16, 16), 0)] * 4, PlainStep(), epochs=1, progress=False, distributed=True)
    with pytest.raises(DataNotFoundError):
        robustkit.models.load_weights(_cnn(), "/nonexistent/weights.pt")


def test_shipped_adversarial_training_configs_validate():
    from pathlib import Path

    files = sorted((Path(__file__).resolve().parents[1] / "configs").glob("adv_train*.yaml"))
    assert files
    for f in files:
        cfg = robustkit.load_config(f)
        train = next(s["train"] for s in cfg["steps"] if "train" in s)
        assert check_adversarial(train["adversarial"]) is not None


def test_non_differentiable_training_defense_is_refused():
    from robustkit.preprocessing import Quantize

    if getattr(Quantize(), "differentiable", True):
        pytest.skip("Quantize declares itself differentiable")
    with pytest.raises(InputError, match="not differentiable"):
        TRADESStep(preprocess=nn.Sequential(Quantize()))
    assert PGDATStep(preprocess=nn.Sequential(GaussianNoise(0.1), BilateralFilter())).describe()["preprocess"] == \
        "GaussianNoise+BilateralFilter"


def test_fit_accepts_int32_labels_and_refuses_float_labels():
    """Datasets yielding int32 labels used to crash inside cross_entropy (issue #12)."""
    from robustkit.errors import InputError
    from robustkit.models import SmallCNN
    from robustkit.training import fit

    class Labels(torch.utils.data.Dataset):
        def __init__(self, dtype):
            self.dtype = dtype

        def __len__(self):
            return 8

        def __getitem__(self, i):
            return torch.rand(1, 8, 8), torch.tensor(i % 3, dtype=self.dtype)

    torch.manual_seed(0)
    history = fit(SmallCNN(in_channels=1, num_classes=3, width=4), Labels(torch.int32), epochs=1, progress=False)
    assert len(history) == 1 and history[0]["loss"] > 0
    with pytest.raises(InputError, match="integer class indices"):
        fit(SmallCNN(in_channels=1, num_classes=3, width=4), Labels(torch.float32), epochs=1, progress=False)
