import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import robustkit
from robustkit.attacks import SIG, BadNets, Blended, WaNet
from robustkit.data import ArrayDataset, load_poisoned, to_tensors
from robustkit.errors import DataNotFoundError, InputError
from robustkit.backdoor.metrics import backdoor_metrics, defense_effectiveness_rating


@pytest.fixture(scope="module")
def small_set():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(100, 3, 16, 16, generator=g)
    y = torch.arange(100) % 5
    return ArrayDataset(x, y)


ATTACKS = [BadNets(), Blended(), SIG(), WaNet()]


@pytest.mark.parametrize("attack", ATTACKS, ids=lambda a: type(a).__name__)
def test_trigger_shape_range_and_no_mutation(attack, small_set):
    x = small_set.images[:8].clone()
    out = attack.apply(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    assert torch.equal(x, small_set.images[:8])  # input untouched
    assert float((out - x).abs().max()) > 0.01  # the trigger is there
    with pytest.raises(InputError):
        attack.apply(x * 255)


def test_badnets_patch_exact():
    x = torch.zeros(2, 1, 10, 10)
    out = BadNets(size=3).apply(x)
    assert torch.equal(out[:, :, 7:, 7:], torch.ones(2, 1, 3, 3))
    assert float(out.sum()) == 18
    tl = BadNets(size=2, position="top-left", pattern="checkerboard", margin=1).apply(x)
    assert tl[0, 0, 1:3, 1:3].tolist() == [[1, 0], [0, 1]]
    at = BadNets(size=2, position=[4, 5]).apply(x)
    assert float(at[0, 0, 4:6, 5:7].sum()) == 4
    with pytest.raises(InputError, match="does not fit"):
        BadNets(size=12).apply(x)
    with pytest.raises(InputError, match="position"):
        BadNets(position="middle")


def test_blended_formula_and_seed():
    x = torch.rand(2, 3, 8, 8)
    a = Blended(alpha=0.2, seed=1)
    p = a.pattern_for(3, 8, 8)
    assert torch.allclose(a.apply(x), 0.8 * x + 0.2 * p)
    assert torch.equal(Blended(seed=1).pattern_for(3, 8, 8), p)
    assert not torch.equal(Blended(seed=2).pattern_for(3, 8, 8), p)
    img = torch.rand(3, 4, 4)
    assert torch.allclose(Blended(alpha=0.5, pattern=img).apply(torch.zeros(1, 3, 4, 4)), 0.5 * img[None])
    with pytest.raises(InputError, match="alpha"):
        Blended(alpha=1.5)


def test_sig_formula():
    x = torch.full((1, 1, 4, 12), 0.5)
    out = SIG(delta=0.1, frequency=2).apply(x)
    j = torch.arange(12, dtype=torch.float64)
    expected = 0.5 + 0.1 * torch.sin(2 * math.pi * j * 2 / 12)
    assert torch.allclose(out[0, 0, 0].double(), expected, atol=1e-6)
    assert torch.equal(out[0, 0, 0], out[0, 0, 3])  # constant along rows
    assert SIG.clean_label


def test_wanet_deterministic_small_and_noise_mode():
    x = torch.rand(4, 3, 16, 16)
    a, b = WaNet(seed=3).apply(x), WaNet(seed=3).apply(x)
    assert torch.equal(a, b)
    assert not torch.equal(WaNet(seed=4).apply(x), a)
    # a warp moves pixels by a fraction of a pixel-grid: small but non-zero change
    assert 0 < float((a - x).abs().mean()) < 0.3
    n1 = WaNet(seed=3).apply_noise(x, torch.Generator().manual_seed(0))
    assert not torch.equal(n1, a)
    # vanishing strength is the identity warp
    assert torch.allclose(WaNet(s=1e-6).apply(x), x, atol=1e-4)


def test_poisoning_rate_exact_labels_and_seed(small_set):
    p = BadNets(target=0).poison(small_set, rate=0.1, seed=0)
    assert len(p.poisoned_indices) == 10 and len(p) == 100
    idx = torch.tensor(p.poisoned_indices)
    assert (small_set.labels[idx] != 0).all()  # drawn from non-target samples
    assert (p.labels[idx] == 0).all()
    clean = torch.tensor([i for i in range(100) if i not in set(p.poisoned_indices)])
    assert torch.equal(p.images[clean], small_set.images[clean]) and torch.equal(p.labels[clean], small_set.labels[clean])
    assert p.is_poisoned.sum() == 10
    assert BadNets().poison(small_set, 0.1, seed=0).poisoned_indices == p.poisoned_indices
    assert BadNets().poison(small_set, 0.1, seed=1).poisoned_indices != p.poisoned_indices
    assert len(BadNets().poison(small_set, rate=0.23).poisoned_indices) == 23


def test_all_to_all(small_set):
    p = BadNets(all_to_all=True).poison(small_set, rate=0.2, seed=0, num_classes=5)
    idx = torch.tensor(p.poisoned_indices)
    assert torch.equal(p.labels[idx], (small_set.labels[idx] + 1) % 5)


def test_clean_label_touches_only_target_class(small_set):
    p = SIG(target=2).poison(small_set, rate=0.15, seed=0)
    idx = torch.tensor(p.poisoned_indices)
    assert len(idx) == 15 and (small_set.labels[idx] == 2).all()
    assert torch.equal(p.labels, small_set.labels)  # labels never change
    changed = (p.images - small_set.images).flatten(1).abs().amax(1) > 0
    assert torch.equal(changed, p.is_poisoned)
    with pytest.raises(InputError, match="only the 20 target-class samples"):
        SIG(target=2).poison(small_set, rate=0.3)


def test_wanet_noise_samples_keep_labels(small_set):
    p = WaNet(cross_ratio=2).poison(small_set, rate=0.1, seed=0)
    assert len(p.noise_indices) == 20 and not set(p.noise_indices) & set(p.poisoned_indices)
    nidx = torch.tensor(p.noise_indices)
    assert torch.equal(p.labels[nidx], small_set.labels[nidx])
    assert (p.images[nidx] != small_set.images[nidx]).any()


def test_bad_rate(small_set):
    with pytest.raises(InputError, match="rate"):
        BadNets().poison(small_set, rate=1.5)


@pytest.mark.parametrize("fmt", ["npz", "folder"])
def test_save_load_roundtrip(small_set, tmp_path, fmt):
    ds = ArrayDataset((small_set.images * 255).round() / 255, small_set.labels)  # exactly representable as PNG/uint8
    p = Blended(alpha=0.2).poison(ds, rate=0.1, seed=0)
    path = tmp_path / ("p.npz" if fmt == "npz" else "pfolder")
    p.save(path)
    back = load_poisoned(path)
    assert back.poisoned_indices == p.poisoned_indices
    assert torch.equal(back.labels, p.labels)
    assert torch.allclose(back.images, p.images, atol=1 / 255 / 2 + 1e-6)
    assert back.manifest["attack"] == "blended" and back.manifest["attack_params"]["alpha"] == 0.2
    leftovers = [f.name for f in tmp_path.rglob("*") if f.name.startswith(".")]
    assert leftovers == []  # atomic writes leave no temp files


def test_load_detects_tampering_and_missing(small_set, tmp_path):
    p = BadNets().poison(small_set, rate=0.1)
    path = p.save(tmp_path / "p.npz")
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="sha256"):
        load_poisoned(path)
    with pytest.raises(DataNotFoundError):
        load_poisoned(tmp_path / "missing.npz")
    (tmp_path / "orphan.npz").write_bytes(b"")
    with pytest.raises(DataNotFoundError, match="manifest"):
        load_poisoned(tmp_path / "orphan.npz")


def test_metrics_on_handmade_models(small_set):
    attack = BadNets(target=0)

    class Oracle(nn.Module):  # predicts the true label unless the patch is present, then 0
        def forward(self, x):
            patched = (x[:, :, -3:, -3:] == 1).flatten(1).all(1)
            labels = torch.full((x.shape[0],), -1)
            logits = torch.zeros(x.shape[0], 5)
            logits[torch.arange(x.shape[0]), 0] = patched.float() * 10
            return logits + self.truth_logits[: x.shape[0]] * (~patched).float()[:, None]

    x, y = to_tensors(small_set)
    m = Oracle()
    m.truth_logits = torch.nn.functional.one_hot(y, 5).float()
    r = backdoor_metrics(m, attack, small_set)
    assert r.acc == 1.0 and r.asr == 1.0 and r.ra == 0.0 and r.n_triggered == 80
    assert defense_effectiveness_rating({"acc": 0.9, "asr": 1.0}, {"acc": 0.88, "asr": 0.02}) == pytest.approx((0.98 - 0.02 + 1) / 2)
    assert defense_effectiveness_rating({"acc": 0.9, "asr": 0.5}, {"acc": 0.95, "asr": 0.6}) == 0.5


def test_registry_names():
    assert {"badnets", "blended", "sig", "wanet"} <= set(robustkit.BACKDOORS.names())
    a = robustkit.BACKDOORS.build({"name": "badnets", "size": 4, "target": 3})
    assert a.size == 4 and a.target == 3


@pytest.mark.slow
def test_short_training_implants_backdoor(digits16):
    from robustkit.models import SmallCNN
    from robustkit.training import train_classifier

    torch.manual_seed(0)
    attack = BadNets(target=0, size=3)
    poisoned = attack.poison(digits16.train, rate=0.1, seed=0)
    model = SmallCNN(in_channels=1, num_classes=10, width=16)
    train_classifier(model, poisoned, epochs=5, progress=False)
    r = backdoor_metrics(model, attack, digits16.test)
    assert r.acc > 0.85
    assert r.asr > 0.8  # chance would be ~0.1


@pytest.mark.parametrize("model_name", ["preact_resnet18", "small_vit"])
def test_train_victim_any_model_with_checkpoints(digits16, tmp_path, model_name):
    """robustkit.train drives every victim architecture, records ASR per epoch and checkpoints atomically."""
    from robustkit.models import load_checkpoint
    from robustkit.pipeline import build_model

    torch.manual_seed(0)
    sub = digits16.train.subset(range(200))
    attack = BadNets()
    poisoned = attack.poison(sub, rate=0.1, seed=0, num_classes=10)
    model = build_model({"name": model_name}, digits16)
    res = robustkit.train(model, poisoned, digits16.test.subset(range(100)), backdoor=attack, epochs=1, batch_size=50,
                          lr=0.01, checkpoint_dir=tmp_path / "ck", model_name=model_name, progress=False)
    assert set(res.history[0]) >= {"loss", "train_acc", "val_acc", "asr", "ra"}
    assert [p.split("/")[-1] for p in res.checkpoints] == ["epoch_001.pt", "last.pt"]
    reloaded = load_checkpoint(tmp_path / "ck" / "last.pt")
    x = digits16.test.images[:4]
    assert torch.allclose(reloaded(x), model.eval()(x), atol=1e-5)
