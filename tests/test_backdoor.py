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
from robustkit.backdoor.metrics import backdoor_metrics, defense_effectiveness_rating, triggered_test_set


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


# ----------------------------------------------------------------------------- issue #12
def _three_class_set(n=30):
    x = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    return ArrayDataset(x, torch.arange(n) % 3, ["a", "b", "c"])


@pytest.mark.parametrize("attack", [BadNets(target=99), Blended(target=3), SIG(target=5), WaNet(target=3)],
                         ids=lambda a: type(a).__name__)
def test_target_outside_the_classes_is_refused(attack):
    """BadNets(target=99) on a 3-class set poisoned with label 99."""
    ds = _three_class_set()
    with pytest.raises(InputError, match=rf"target {attack.target} is not a class of a data set with 3 classes"):
        attack.poison(ds, rate=0.1)
    with pytest.raises(InputError, match=rf"target {attack.target} is not a class"):
        backdoor_metrics(nn.Sequential(nn.Flatten(), nn.Linear(192, 3)), attack, ds)
    # an undeclared class count is inferred (all-to-one) and still bounds the target
    with pytest.raises(InputError, match="is not a class of a data set with 3 classes"):
        attack.poison(ArrayDataset(ds.images, ds.labels), rate=0.1)
    with pytest.raises(InputError, match="class index 2 but there are only 2 classes"):
        BadNets(target=0).poison(ArrayDataset(ds.images, ds.labels), rate=0.1, num_classes=2)


def test_all_to_all_uses_the_declared_class_count():
    """A perfect all-to-all backdoor scored ASR 0.6 when the test set lacked the last classes."""
    x = torch.rand(40, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    y = torch.arange(40) % 5  # classes 0..4 of a 10-class problem
    test = ArrayDataset(x, y, [str(i) for i in range(10)])
    attack = BadNets(all_to_all=True, size=2)
    xt, yt, target = triggered_test_set(attack, test)
    assert torch.equal(target, (yt + 1) % 10)  # 4 -> 5, not 4 -> 0

    class PerfectAllToAll(nn.Module):
        def forward(self, inp):
            patched = (inp[:, :, -2:, -2:] == 1).flatten(1).all(1)
            truth = self.lookup(inp)
            return nn.functional.one_hot(torch.where(patched, (truth + 1) % 10, truth), 10).float()

        def lookup(self, inp):  # the true label of an image from its untouched top-left pixel
            return torch.tensor([int(y[(x[:, 0, 0, 0] == v).nonzero()[0, 0]]) for v in inp[:, 0, 0, 0]])

    r = backdoor_metrics(PerfectAllToAll(), attack, test)
    assert r.asr == 1.0 and r.acc == 1.0
    assert backdoor_metrics(PerfectAllToAll(), attack, torch.utils.data.Subset(test, range(20))).asr == 1.0
    # without a declared count all-to-all refuses to guess
    with pytest.raises(InputError, match="all-to-all attack needs the number of classes: pass num_classes="):
        triggered_test_set(attack, ArrayDataset(x, y))
    with pytest.raises(InputError, match="pass num_classes="):
        attack.poison(ArrayDataset(x, y), rate=0.1)
    assert torch.equal(triggered_test_set(attack, ArrayDataset(x, y), num_classes=10)[2], target)
    p = attack.poison(ArrayDataset(x, y), rate=0.5, num_classes=10)
    idx = torch.tensor(p.poisoned_indices)
    assert torch.equal(p.labels[idx], (y[idx] + 1) % 10) and p.num_classes == 10


def test_folder_format_keeps_duplicate_and_slashed_class_names(tmp_path):
    """The folder format merged duplicate class names and failed on a '/'."""
    x = (torch.rand(12, 3, 4, 4, generator=torch.Generator().manual_seed(2)) * 255).round() / 255
    classes = ["cat", "cat", "a/b", "..", "x y"]
    ds = ArrayDataset(x, torch.arange(12) % 5, classes)
    p = BadNets(target=1, size=1).poison(ds, rate=0.25, seed=0)
    path = p.save(tmp_path / "folder")
    assert sorted(f.name for f in path.iterdir() if f.is_dir()) == ["0", "1", "2", "3", "4"]
    back = load_poisoned(path)
    assert back.classes == classes and back.num_classes == 5
    assert torch.equal(back.labels, p.labels)
    assert torch.allclose(back.images, p.images, atol=1e-6)
    assert back.poisoned_indices == p.poisoned_indices
    # folders sort numerically with 11+ classes (zero-padded), as ImageFolder readers expect
    from robustkit.backdoor.poisoned import class_folder

    assert [class_folder(i, 12) for i in (0, 2, 11)] == ["00", "02", "11"]


def test_blended_custom_pattern_manifest_rebuilds_it(tmp_path):
    """Blended with a custom pattern tensor wrote `seed: 0` and no pattern."""
    from PIL import Image

    pattern = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(3))
    ds = _three_class_set()
    x = ds.images[:4]
    for attack in (Blended(alpha=0.3, pattern=pattern, target=2), ):
        p = attack.poison(ds, rate=0.2, seed=0)
        p.save(tmp_path / "b.npz")
        rebuilt = load_poisoned(tmp_path / "b.npz").attack()
        assert torch.equal(rebuilt.apply(x), attack.apply(x))
        assert not torch.equal(Blended(alpha=0.3, target=2).apply(x), attack.apply(x))
    # an image file: its pixels are recorded, so the manifest does not depend on the file
    img = tmp_path / "pat.png"
    Image.fromarray((pattern.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(img)
    attack = Blended(alpha=0.5, pattern=str(img))
    cfg = attack.config()
    img.unlink()
    assert torch.equal(robustkit.BACKDOORS.build({"name": "blended", **json.loads(json.dumps(cfg))}).apply(x), attack.apply(x))


REBUILD_CASES = {
    "badnets": [{}, {"target": 2, "size": 2, "position": [1, 2], "pattern": "checkerboard"},
                {"size": 2, "position": "top-left", "margin": 1, "all_to_all": True}],
    "blended": [{}, {"alpha": 0.4, "seed": 7, "target": 1}, {"pattern": "tensor"}],
    "sig": [{}, {"delta": 0.2, "frequency": 3.0, "target": 1}],
    "wanet": [{}, {"s": 2.0, "k": 3, "seed": 5, "noise_mode": False, "grid_rescale": 0.9}],
}


@pytest.mark.parametrize("name", sorted(robustkit.BACKDOORS.names()))
def test_every_registered_trigger_rebuilds_exactly_from_its_manifest(name, tmp_path):
    ds = _three_class_set()
    x = ds.images[:5]
    for i, kwargs in enumerate(REBUILD_CASES.get(name, [{}])):
        if kwargs.get("pattern") == "tensor":
            kwargs = {**kwargs, "pattern": torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(i))}
        attack = robustkit.BACKDOORS.build({"name": name, **kwargs})
        p = attack.poison(ds, rate=0.1, seed=i, num_classes=3)
        path = p.save(tmp_path / f"{name}{i}.npz")
        manifest = json.loads((tmp_path / f"{name}{i}.npz.manifest.json").read_text())
        assert manifest["attack"] == name and manifest["attack_params"] == json.loads(json.dumps(attack.config()))
        rebuilt = load_poisoned(path).attack()
        assert type(rebuilt) is type(attack) and rebuilt.config() == attack.config()
        assert torch.equal(rebuilt.apply(x), attack.apply(x))
        again = rebuilt.poison(ds, rate=0.1, seed=i, num_classes=3)
        assert torch.equal(again.images, p.images) and again.noise_indices == p.noise_indices


def test_manifest_refuses_an_attack_it_cannot_record(small_set, tmp_path):
    class Odd(BadNets):
        def __init__(self, target=0, scale=None):
            super().__init__(target)
            self.scale = scale

    p = Odd(scale=torch.ones(2)).poison(small_set, rate=0.1)
    with pytest.raises(InputError, match="Odd.scale is a Tensor"):
        p.save(tmp_path / "odd.npz")
    assert not (tmp_path / "odd.npz").exists()  # nothing half-written
    old = {"format": "robustkit.poisoned", "version": 1, "attack": "blended", "attack_params": {"alpha": 0.2}}
    from robustkit.backdoor.poisoned import rebuild_attack

    with pytest.raises(InputError, match="version 1 does not record"):
        rebuild_attack(old)


def test_extra_samples_protocol_drives_poisoning(small_set):
    """PoisonedDataset asks the attack (extra_samples / apply_extra), not WaNet's attribute names."""
    w = WaNet(cross_ratio=2)
    assert w.extra_samples(10) == 20 and WaNet(noise_mode=False).extra_samples(10) == 0
    assert WaNet(cross_ratio=0.1).extra_samples(2) == 0  # rounds to none: no empty batch is warped
    assert WaNet(cross_ratio=0.1).poison(small_set, rate=0.02).noise_indices == []
    # same indices as before the protocol (numpy's seeded generator: platform independent)
    p = w.poison(small_set, rate=0.1, seed=0)
    assert p.poisoned_indices == [2, 4, 7, 17, 24, 29, 47, 57, 76, 82]
    assert p.noise_indices == [0, 1, 3, 10, 18, 23, 32, 35, 50, 54, 56, 67, 69, 74, 78, 83, 86, 90, 97, 99]
    nidx = torch.tensor(p.noise_indices)
    assert torch.equal(p.images[nidx], w.apply_noise(small_set.images[nidx], torch.Generator().manual_seed(1)))

    class Darken(BadNets):
        def extra_samples(self, n_poisoned):
            return n_poisoned

        def apply_extra(self, x, generator=None):
            return x * 0.5

    d = Darken().poison(small_set, rate=0.1, seed=0)
    assert len(d.noise_indices) == 10 and not set(d.noise_indices) & set(d.poisoned_indices)
    eidx = torch.tensor(d.noise_indices)
    assert torch.equal(d.images[eidx], small_set.images[eidx] * 0.5)
    assert torch.equal(d.labels[eidx], small_set.labels[eidx])


@pytest.mark.parametrize("before,after,match", [
    ({"acc": 97.5, "asr": 100.0}, {"acc": 96.0, "asr": 2.0}, "not percentages"),
    ({"acc": math.nan, "asr": 1.0}, {"acc": 0.9, "asr": 0.1}, "finite fraction"),
    ({"acc": 0.9, "asr": 1.0}, {"acc": 0.9, "asr": math.nan}, r"after\['asr'\]"),
    ({"acc": 0.9}, {"acc": 0.9, "asr": 0.1}, "'acc' and 'asr'"),
    ({"acc": 0.9, "asr": -0.1}, {"acc": 0.9, "asr": 0.1}, "finite fraction"),
])
def test_der_refuses_percentages_and_nan(before, after, match):
    with pytest.raises(InputError, match=match):
        defense_effectiveness_rating(before, after)


@pytest.mark.parametrize("make,match", [
    (lambda: WaNet(grid_rescale=math.nan), "grid_rescale must be finite"),
    (lambda: WaNet(grid_rescale=0), r"grid_rescale must be in \(0, 2\]"),
    (lambda: WaNet(s=math.inf), "s must be finite"),
    (lambda: WaNet(s=math.nan), "s must be finite"),
    (lambda: WaNet(cross_ratio=math.nan), "cross_ratio must be finite"),
    (lambda: WaNet(k=2.5), "k must be an integer"),
    (lambda: WaNet(seed=-1), "seed must be an integer >= 0"),
    (lambda: WaNet(noise_mode="no"), "noise_mode must be true or false"),
    (lambda: SIG(frequency=math.nan), "frequency must be finite"),
    (lambda: SIG(frequency=math.inf), "frequency must be finite"),
    (lambda: SIG(delta=math.nan), "delta must be finite"),
    (lambda: SIG(delta="0.1"), "delta must be a number"),
    (lambda: Blended(alpha=math.nan), "alpha must be finite"),
    (lambda: Blended(seed=1.5), "seed must be an integer"),
    (lambda: Blended(pattern=torch.full((3, 4, 4), math.nan)), "NaN"),
    (lambda: Blended(pattern=torch.rand(3, 4, 4) * 255), r"values in \[0, 1\]"),
    (lambda: Blended(pattern=[[1.0, 0.0]]), "C x H x W"),
    (lambda: BadNets(size=True), "size must be an integer"),
    (lambda: BadNets(margin=-1), "margin must be an integer >= 0"),
    (lambda: BadNets(margin=1.5), "margin must be an integer"),
    (lambda: BadNets(position=[1.5, 2]), "position"),
    (lambda: BadNets(target=True), "target must be an integer"),
    (lambda: BadNets(all_to_all="yes"), "all_to_all must be true or false"),
])
def test_trigger_parameters_validated(make, match):
    """WaNet(grid_rescale=nan) returned a constant image."""
    with pytest.raises(InputError, match=match):
        make()


def test_version1_folder_with_class_name_folders_still_loads(tmp_path):
    from PIL import Image

    root = tmp_path / "v1"
    files = []
    for i, name in enumerate(["cat", "dog", "cat"]):
        (root / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((2, 2), 17 * i, dtype=np.uint8)).save(root / name / f"{i:06d}.png")
        files.append(f"{name}/{i:06d}.png")
    manifest = {"format": "robustkit.poisoned", "version": 1, "attack": "badnets", "attack_params": {"size": 3},
                "classes": ["cat", "dog"], "num_samples": 3, "poisoned_indices": [1], "files": files}
    (root / "manifest.json").write_text(json.dumps(manifest))
    back = load_poisoned(root)
    assert back.labels.tolist() == [0, 1, 0] and back.poisoned_indices == [1]
    with pytest.raises(InputError, match="version 1 does not record"):
        back.attack()
    (root / "manifest.json").write_text("{not json")
    with pytest.raises(InputError, match="not a valid JSON manifest"):
        load_poisoned(root)
