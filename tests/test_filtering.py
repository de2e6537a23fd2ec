"""Poisoned-sample filters: entropy maths, attention reading, and detection on really poisoned data."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from robustkit.backdoor import BadNets
from robustkit.models.introspect import attention_layers
from robustkit.filtering import (
    ActivationClustering,
    AttentionEntropyFilter,
    SpectralSignatures,
    attention_entropies,
    cls_attention_entropy,
    fit_gmm2,
    is_bimodal,
    low_cluster,
)
from robustkit.errors import InputError
from robustkit.filtering.run import filter_metrics, run_filter


# --------------------------------------------------------------------------- maths
def test_entropy_on_handmade_maps():
    n_patches = 16
    t = 1 + n_patches
    attn = torch.zeros(3, 2, t, t)
    attn[0, :, 0, 1:] = 1.0 / n_patches                       # uniform over patches -> log P
    attn[1, :, 0, 5] = 1.0                                     # one-hot -> 0
    attn[2, 0, 0, 1] = 1.0                                     # two heads on two patches -> log 2
    attn[2, 1, 0, 2] = 1.0
    attn[:, :, 0, 0] += 0.0
    h = cls_attention_entropy(attn)
    assert h[0] == pytest.approx(math.log(n_patches), abs=1e-5)
    assert h[1] == pytest.approx(0.0, abs=1e-6)
    assert h[2] == pytest.approx(math.log(2), abs=1e-5)


def test_entropy_ignores_cls_self_attention_and_renormalizes():
    attn = torch.zeros(1, 1, 5, 5)
    attn[0, 0, 0] = torch.tensor([0.6, 0.1, 0.1, 0.1, 0.1])  # 60% on CLS itself: patches still uniform
    assert cls_attention_entropy(attn)[0] == pytest.approx(math.log(4), abs=1e-5)
    p = torch.tensor([0.5, 0.3, 0.2])
    attn = torch.zeros(1, 1, 4, 4)
    attn[0, 0, 0, 1:] = p
    assert cls_attention_entropy(attn)[0] == pytest.approx(float(-(p * torch.log(p + 1e-8)).sum()), abs=1e-6)
    with pytest.raises(InputError, match="N x heads x T x T"):
        cls_attention_entropy(torch.zeros(2, 3, 4))


def test_bimodality_test():
    rng = np.random.default_rng(0)
    apart = np.concatenate([rng.normal(0, 0.1, 300), rng.normal(2, 0.1, 60)])
    close = np.concatenate([rng.normal(0, 0.5, 300), rng.normal(0.5, 0.5, 60)])
    g = fit_gmm2(apart, seed=0)
    assert is_bimodal(g) and g["means"][0] == pytest.approx(0, abs=0.05) and g["means"][1] == pytest.approx(2, abs=0.05)
    assert not is_bimodal(fit_gmm2(close, seed=0))


def test_low_cluster_is_a_lower_tail():
    """A narrow low cluster next to a wide one: the mixture alone would give the extreme lows to the wide one."""
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(3.8, 0.15, 1000), rng.normal(3.3, 0.02, 100), [3.1, 3.12, 3.15]])
    g = fit_gmm2(values, seed=0)
    low = int(g["order"][0])
    assert not (g["model"].predict(values[-3:, None]) == low).any()  # the trap the cut avoids
    mask, cut = low_cluster(values, g)
    assert mask[-103:].all() and mask.sum() < 1000 * 0.05 + 103
    assert np.array_equal(mask, values <= cut) and g["means"][0] <= cut < g["means"][1]
    mask, cut = low_cluster(np.linspace(8.0, 9.0, 10), fit_gmm2(np.arange(10.0), seed=0))
    assert cut is None and not mask.any()  # all at or above the upper mean: nothing flagged


def _planted_profiles(pinned: bool, seed: int = 0):
    """10 classes x 100 samples of 16 per-head entropies; with ``pinned``, class 0 gets 100 more
    samples (all-to-one poisoning) whose heads 3 and 9 are pinned (tiny variance, shifted)."""
    rng = np.random.default_rng(seed)
    h = rng.normal(2.5, 0.1, (1000, 16)) + np.repeat(rng.normal(0, 0.05, (10, 16)), 100, axis=0)
    y = np.repeat(np.arange(10), 100)
    truth = np.zeros(1000, dtype=bool)
    if pinned:
        p = rng.normal(2.5, 0.1, (100, 16))
        p[:, 3] = rng.normal(2.2, 0.005, 100)  # a patch collapses one head
        p[:, 9] = rng.normal(2.76, 0.003, 100)  # and makes another near-uniform
        h, y, truth = np.vstack([h, p]), np.concatenate([y, np.zeros(100, int)]), np.concatenate([truth, np.ones(100, bool)])
    return h, y, truth


def test_split_scores_find_the_pinned_cluster_of_the_target_class():
    from sklearn.metrics import roc_auc_score
    from robustkit.filtering.attention_entropy import split_scores, split_warnings

    h, y, truth = _planted_profiles(True)
    info = split_scores(h, y, seed=0)
    assert info["poisoned_classes"] == [0]
    assert roc_auc_score(truth, info["scores"]) > 0.99
    assert info["flagged"][truth].mean() > 0.95 and info["flagged"][~truth].mean() < 0.01
    assert info["per_class"][0]["gap"] > 2 and info["per_class"][0]["evidence_z"] > 10
    assert split_warnings(info) == []
    att = split_scores(h, y, seed=0, classes="attention")  # the split alone, no class-size assumption
    assert att["poisoned_classes"] == [0] and roc_auc_score(truth, att["scores"]) > 0.99
    with pytest.raises(InputError):
        split_scores(h, y, classes="labels")


def test_split_scores_warn_when_no_class_stands_out():
    from robustkit.filtering.attention_entropy import split_scores, split_warnings

    h, y, _ = _planted_profiles(False)
    info = split_scores(h, y, seed=0)
    assert not info["flagged"].any() and info["poisoned_classes"] == []
    assert any("no class stands out" in n for n in split_warnings(info))
    two = split_scores(h[y < 2], y[y < 2], seed=0)
    assert not two["flagged"].any() and any("at least 3 needed" in n for n in split_warnings(two))
    with pytest.raises(InputError):
        split_scores(h, y[:10])


def test_method_and_direction_options():
    assert AttentionEntropyFilter().method == "split" and AttentionEntropyFilter().direction is None
    bye = AttentionEntropyFilter(method="bye")
    assert bye.method == "bye" and bye.direction == "low"
    assert AttentionEntropyFilter(direction="both").method == "bye"  # callers of the one-rule filter
    with pytest.raises(InputError, match="method='bye'"):
        AttentionEntropyFilter(method="split", direction="low")
    with pytest.raises(InputError):
        AttentionEntropyFilter(method="gmm")


def test_head_entropies_match_per_head_maps():
    from robustkit.filtering.attention_entropy import cls_head_entropies

    attn = torch.softmax(torch.randn(3, 2, 5, 5), dim=-1)
    h = cls_head_entropies(attn)
    for k in range(2):
        p = attn[:, k, 0, 1:] / attn[:, k, 0, 1:].sum(-1, keepdim=True)
        torch.testing.assert_close(h[:, k], -(p * torch.log(p + 1e-8)).sum(-1))


# --------------------------------------------------------------------------- reading attention
def test_timm_attention_read_through_hooks_matches_explicit_maps():
    vt = pytest.importorskip("timm.models.vision_transformer")
    torch.manual_seed(0)
    vit = vt.VisionTransformer(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2,
                               num_classes=10).eval()
    x = torch.rand(5, 1, 16, 16)
    from robustkit.data import ArrayDataset

    ent, names = attention_entropies(vit, ArrayDataset(x, torch.zeros(5, dtype=torch.long)), progress=False)
    assert names == ["blocks.0.attn", "blocks.1.attn"]
    # explicit maps: run the blocks by hand with the non-fused attention formula
    maps = []
    with torch.no_grad():
        h = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
        for blk in vit.blocks:
            a = blk.attn
            y = blk.norm1(h)
            qkv = a.qkv(y).reshape(5, y.shape[1], 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
            maps.append(((qkv[0] * a.scale) @ qkv[1].transpose(-2, -1)).softmax(-1))
            h = blk(h)
    expected = torch.stack([cls_attention_entropy(m) for m in maps], dim=1)
    torch.testing.assert_close(ent, expected, rtol=1e-4, atol=1e-5)
    assert all(not m._forward_hooks for m in vit.modules()), "hooks must be removed"


def _timm_maps_from_unfused_path(vit, x):
    """Attention maps captured inside timm's own non-fused code path (input of ``attn_drop``)."""
    maps, handles = [], []
    for blk in vit.blocks:
        blk.attn.fused_attn = False
        handles.append(blk.attn.attn_drop.register_forward_hook(lambda m, a, out: maps.append(out.detach())))
    try:
        with torch.no_grad():
            vit(x)
    finally:
        for h in handles:
            h.remove()
        for blk in vit.blocks:
            blk.attn.fused_attn = True
    return maps


def test_timm_hooks_match_unfused_maps_with_qk_norm_and_register_tokens():
    """q/k norms and tokens between CLS and the patches: the hook maps equal timm's own non-fused maps."""
    vt = pytest.importorskip("timm.models.vision_transformer")
    from robustkit.data import ArrayDataset

    torch.manual_seed(1)
    vit = vt.VisionTransformer(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2,
                               num_classes=10, qk_norm=True, reg_tokens=2).eval()
    assert vit.num_prefix_tokens == 3
    x = torch.rand(4, 1, 16, 16)
    ent, _ = attention_entropies(vit, ArrayDataset(x, torch.zeros(4, dtype=torch.long)), batch_size=3, progress=False)
    maps = _timm_maps_from_unfused_path(vit, x)
    assert len(maps) == 2 and maps[0].shape == (4, 2, 3 + 16, 3 + 16)
    expected = torch.stack([cls_attention_entropy(m, prefix_tokens=3) for m in maps], dim=1)
    torch.testing.assert_close(ent, expected, rtol=1e-4, atol=1e-5)
    # the register tokens are excluded: counting them as patches gives other entropies
    wrong = torch.stack([cls_attention_entropy(m, prefix_tokens=1) for m in maps], dim=1)
    assert not torch.allclose(ent, wrong, atol=1e-3)
    assert all(blk.attn.fused_attn for blk in vit.blocks)  # the model is left as it was


def test_timm_vit_without_cls_token_is_rejected():
    vt = pytest.importorskip("timm.models.vision_transformer")
    from robustkit.data import ArrayDataset

    vit = vt.VisionTransformer(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=1, num_heads=2,
                               num_classes=10, class_token=False, global_pool="avg")
    data = ArrayDataset(torch.rand(2, 1, 16, 16), torch.zeros(2, dtype=torch.long))
    with pytest.raises(InputError, match="no CLS token"):
        attention_entropies(vit, data, progress=False)


@pytest.mark.parametrize("make", [
    lambda: AttentionEntropyFilter(batch_size=0),
    lambda: AttentionEntropyFilter(separation=-1),
    lambda: AttentionEntropyFilter(layers=[]),
    lambda: AttentionEntropyFilter(layers="0"),
    lambda: AttentionEntropyFilter(seed=-1),
    lambda: ActivationClustering(components=0),
    lambda: ActivationClustering(size_threshold=0.7),
    lambda: SpectralSignatures(expected_rate=1.5),
    lambda: SpectralSignatures(batch_size=2.5),
])
def test_bad_parameters_are_rejected(make):
    with pytest.raises(InputError):
        make()


def test_layer_indices_checked_against_the_model():
    from robustkit.data import ArrayDataset
    from robustkit.models import SmallViT

    vit = SmallViT(image_size=16, in_channels=1, patch_size=4, dim=16, depth=2, heads=2)
    data = ArrayDataset(torch.rand(4, 1, 16, 16), torch.zeros(4, dtype=torch.long))
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        AttentionEntropyFilter(layers=[2], progress=False).fit(vit, data)


def test_small_vit_entropies_match_returned_maps():
    from robustkit.data import ArrayDataset
    from robustkit.models import SmallViT

    torch.manual_seed(0)
    vit = SmallViT(image_size=16, in_channels=1, patch_size=4, dim=16, depth=2, heads=2).eval()
    x = torch.rand(6, 1, 16, 16)
    ent, _ = attention_entropies(vit, ArrayDataset(x, torch.zeros(6, dtype=torch.long)), batch_size=4, progress=False)
    _, maps = vit(x, return_attention=True)
    torch.testing.assert_close(ent, torch.stack([cls_attention_entropy(m) for m in maps], 1))


def test_model_without_attention_is_rejected(digits16):
    from robustkit.models import SmallCNN

    with pytest.raises(InputError, match="no attention layers"):
        attention_layers(SmallCNN(in_channels=1))
    with pytest.raises(InputError, match="no attention layers"):
        AttentionEntropyFilter(progress=False).fit(SmallCNN(in_channels=1), digits16.train)


# --------------------------------------------------------------------------- real poisoned data
@pytest.fixture(scope="module")
def poisoned_cnn(digits16, victim):
    """SmallCNN trained on 16x16 digits with 5% BadNets (a third of the target class is poisoned)."""
    from robustkit.backdoor import BadNets
    from robustkit.models import SmallCNN

    torch.manual_seed(0)
    model, data, _ = victim(SmallCNN(in_channels=1, width=16), BadNets(size=2), digits16.train, digits16.test,
                            rate=0.05, epochs=8, lr=0.05)
    return model, data


class GreyPatch(BadNets):
    """A fixed 4x4 patch of random grey levels (``torch.rand`` from seed 0): a trigger no other test uses."""

    def patch(self, channels, dtype=torch.float32, device=None):
        p = torch.rand(self.size, self.size, generator=torch.Generator().manual_seed(0))
        return p.to(dtype=dtype, device=device).expand(channels, self.size, self.size)


@pytest.fixture(scope="module")
def poisoned_vit(victim):
    """SmallViT (dim 64, depth 4, patch 4) trained on 16x16 digits with 10% of a random-grey 4x4
    patch top-left (seed 0, 20 epochs: TPR 1.0, FPR <= 0.3%, orientation gap ~2.4 nats here,
    stable under 1e-5 weight nudges; the former 32x32 3x3-white-patch victim sat at TPR 0.69
    against the bound 0.6 and took 6x longer to train)."""
    from robustkit.data import digits
    from robustkit.models import SmallViT

    d = digits(size=16)
    torch.manual_seed(0)
    model = SmallViT(image_size=16, in_channels=1, patch_size=4, dim=64, depth=4, heads=4)
    model, data, _ = victim(model, GreyPatch(size=4, position="top-left"), d.train, d.test, epochs=20, lr=1e-3, optimizer="adamw",
                            weight_decay=0.05, warmup_epochs=2, seed=0)
    return model, data


@pytest.fixture(scope="module")
def blended_vit(victim):
    """SmallViT (dim 64, depth 4, patch 4) trained on 16x16 RGB digits with 10% Blended (uniform noise, alpha 0.2)."""
    from robustkit.backdoor import Blended
    from robustkit.data import digits
    from robustkit.models import SmallViT

    d = digits(size=16, channels=3)
    torch.manual_seed(0)
    model = SmallViT(image_size=16, in_channels=3, patch_size=4, dim=64, depth=4, heads=4)
    model, data, _ = victim(model, Blended(alpha=0.2), d.train, d.test, epochs=20, lr=1e-3, optimizer="adamw",
                            weight_decay=0.05, warmup_epochs=2, seed=0)
    return model, data


@pytest.mark.slow
def test_attention_entropy_flags_poisoned_far_better_than_chance(poisoned_vit):
    model, data = poisoned_vit
    res = AttentionEntropyFilter(progress=False).fit(model, data)  # method="split"
    m = filter_metrics(res, data.is_poisoned)
    assert m["auroc"] > 0.95, m  # 1.000 here
    assert m["tpr"] > 0.9 and m["fpr"] < 0.05, m  # 1.0 / 0.0008 here
    assert res.details["poisoned_classes"] == [0] and len(res.details["per_layer"]) == 4
    assert res.details["head_entropy"].shape == (len(data), 4, 4)
    again = AttentionEntropyFilter(progress=False).fit(model, data)
    assert torch.equal(res.scores, again.scores) and torch.equal(res.flagged, again.flagged)
    bye = AttentionEntropyFilter(method="bye", progress=False).fit(model, data)  # BYE's rule stays reachable
    assert bye.details["method"] == "bye" and bye.details["direction"] == "low"


@pytest.mark.slow
def test_attention_entropy_on_a_blend_says_when_it_fails(blended_vit):
    """Issue #15: a full-image blend *raises* the CLS attention entropy on this ViT, so BYE's low-entropy
    rule ranks the poisoned samples last; the per-class split does not find the target class here and
    must say so rather than return a confident, wrong answer."""
    model, data = blended_vit
    truth = data.is_poisoned
    low = filter_metrics(AttentionEntropyFilter(method="bye", direction="low", progress=False).fit(model, data), truth)
    high = filter_metrics(AttentionEntropyFilter(method="bye", direction="high", progress=False).fit(model, data), truth)
    assert low["auroc"] < 0.3 and high["auroc"] > 0.8, (low, high)
    with pytest.warns(RuntimeWarning, match="attention_entropy"):
        res = AttentionEntropyFilter(progress=False).fit(model, data)
    m = filter_metrics(res, truth)
    # the contract: right (most poisoned flagged, few clean) or not confident, never confidently wrong
    assert (m["tpr"] > 0.6 and m["tpr"] > 4 * m["fpr"]) or not res.details.confident, (m, res.details.warnings)


def test_feature_filters_flag_poisoned_far_better_than_chance(poisoned_cnn):
    model, data = poisoned_cnn
    base_rate = float(data.is_poisoned.float().mean())
    ac = ActivationClustering(progress=False).fit(model, data)
    m = filter_metrics(ac, data.is_poisoned)
    assert m["auroc"] > 0.7 and m["tpr"] > 0.5 and m["tpr"] > 4 * m["fpr"], m
    ss = SpectralSignatures(expected_rate=0.05, progress=False).fit(model, data)
    m = filter_metrics(ss, data.is_poisoned)
    assert m["auroc"] > 0.7 and m["precision"] > 2 * base_rate, m
    # spectral signatures removes 1.5 x expected rate of every class
    for c, info in ss.details["per_class"].items():
        assert info["flagged"] == int(0.075 * info["n"])
    again = ActivationClustering(progress=False).fit(model, data)
    assert torch.equal(ac.flagged, again.flagged)


def test_activation_clustering_is_stable_under_feature_noise(poisoned_cnn, monkeypatch):
    """#12: the result must not move with the last bits of the victim's features (another CPU / BLAS)."""
    import robustkit.filtering.activation_clustering as acm
    from robustkit.filtering.common import penultimate_features

    model, data = poisoned_cnn
    feats, labels = penultimate_features(model, data, progress=False)
    g = torch.Generator().manual_seed(1)
    variants = {"exact": feats, "float16": feats.half().float(),
                "noise": feats + 1e-3 * feats.abs().mean() * torch.randn(feats.shape, generator=g)}
    results = {}
    for name, f in variants.items():
        monkeypatch.setattr(acm, "penultimate_features", lambda *a, f=f, **k: (f, labels))
        results[name] = ActivationClustering(progress=False).fit(model, data)
    base = filter_metrics(results["exact"], data.is_poisoned)
    for name, res in results.items():
        m = filter_metrics(res, data.is_poisoned)
        assert int((res.flagged != results["exact"].flagged).sum()) <= 2, name
        assert abs(m["auroc"] - base["auroc"]) < 0.02 and m["auroc"] > 0.7 and m["tpr"] > 0.5, (name, m)


def test_filter_metrics_by_hand():
    from robustkit.base import FilterResult

    res = FilterResult(torch.tensor([0.9, 0.8, 0.1, 0.7, 0.2]), torch.tensor([1, 1, 0, 1, 0]))
    truth = torch.tensor([1, 1, 1, 0, 0], dtype=torch.bool)
    m = filter_metrics(res, truth)
    assert m["tpr"] == pytest.approx(2 / 3) and m["fpr"] == pytest.approx(1 / 2)
    assert m["precision"] == pytest.approx(2 / 3) and m["f1"] == pytest.approx(2 / 3)
    assert m["auroc"] == pytest.approx(4 / 6)  # pairs (poisoned, clean) ranked right: 4 of 6
    with pytest.raises(InputError):
        filter_metrics(res, torch.ones(3, dtype=torch.bool))


def test_run_filter_writes_kept_subset_and_never_touches_input(poisoned_cnn, tmp_path):
    from robustkit.data.npz import images_to_tensor, load_npz

    model, data = poisoned_cnn
    before = data.images.clone(), data.labels.clone()
    res, metrics = run_filter(model, data, {"name": "spectral_signatures", "expected_rate": 0.05, "progress": False},
                              tmp_path / "out")
    assert torch.equal(data.images, before[0]) and torch.equal(data.labels, before[1])
    for f in ("kept.npz", "flagged.json", "report.json", "report.md", "scores.png"):
        assert (tmp_path / "out" / f).is_file(), f
    flagged = json.loads((tmp_path / "out" / "flagged.json").read_text())["flagged_indices"]
    assert flagged == torch.nonzero(res.flagged).flatten().tolist()
    with np.load(tmp_path / "out" / "kept.npz") as f:
        assert f["x"].shape[0] == len(data) - len(flagged)
        assert f["source_index"].tolist() == res.kept_indices()
        i = int(f["source_index"][3])
        assert np.array_equal(f["y"][3], data.labels[i].numpy())
        torch.testing.assert_close(images_to_tensor(f["x"])[3], data.images[i], atol=1 / 255, rtol=0)
    assert load_npz(tmp_path / "out" / "kept.npz").train is not None
    assert {"tpr", "fpr", "auroc"} <= set(metrics)
    assert len(res.clean_subset(data)) == len(data) - len(flagged)
    # an output file that would overwrite the input (file, or folder holding the outputs) is refused up front
    src = tmp_path / "out" / "kept.npz"
    stamp = src.stat().st_mtime_ns
    for input_path, out in ((src, tmp_path / "out"), (tmp_path / "out", tmp_path / "out" / "sub")):
        with pytest.raises(InputError, match="overwrite the input"):
            run_filter(model, data, {"name": "spectral_signatures", "progress": False}, out, input_path=input_path)
    assert src.stat().st_mtime_ns == stamp


def test_cli_filter_and_pipeline_step(poisoned_cnn, tmp_path, capsys):
    from robustkit.cli import main
    from robustkit.models.checkpoints import save_checkpoint
    from robustkit.pipeline import run

    model, data = poisoned_cnn
    save_checkpoint(model, tmp_path / "m.pt")
    data.save(tmp_path / "poisoned.npz")
    rc = main(["filter", "--model", str(tmp_path / "m.pt"), "--data", str(tmp_path / "poisoned.npz"),
               "--out", str(tmp_path / "clean"), "--filter", "activation_clustering", "--param", "components=5",
               "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "TPR" in out and (tmp_path / "clean" / "kept.npz").is_file()
    assert main(["filter", "--model", str(tmp_path / "m.pt"), "--data", str(tmp_path / "nope.npz"),
                 "--out", str(tmp_path / "x")]) == 2
    assert main(["filter", "--model", str(tmp_path / "m.pt"), "--data", str(tmp_path / "poisoned.npz"),
                 "--out", str(tmp_path / "x"), "--no-progress"]) == 2  # SmallCNN has no attention layers

    cfg = {"name": "filter test", "seed": 0, "device": "cpu", "data": {"name": "digits", "size": 16},
           "model": {"name": "small_cnn", "width": 16},
           "steps": [{"poison": {"attack": {"name": "badnets", "size": 2}, "rate": 0.05}},
                     {"train": {"epochs": 3}},
                     {"filter": {"filter": {"name": "spectral_signatures", "expected_rate": 0.05, "progress": False}}},
                     {"reset_model": {}},
                     {"train": {"epochs": 1}}]}
    report = run(cfg, out_dir=tmp_path / "run", progress=False)
    row = report.table("Filtering").rows[0]
    assert row["kept"] == row["samples"] - row["flagged"] and "auroc" in row
    assert report.table("Training").rows  # the retraining ran on the kept set
    assert (tmp_path / "run" / "filtered" / "scores.png").is_file()


# --------------------------------------------------------------------------- feature filters on planted features
class _FeaturesAreInput(torch.nn.Module):
    """A 'model' whose penultimate features are its input pixels (a flatten, then the classifier)."""

    def __init__(self, dim: int, classes: int):
        super().__init__()
        self.flat = torch.nn.Flatten()
        self.classifier = torch.nn.Linear(dim, classes)

    def forward(self, x):
        return self.classifier(self.flat(x))


def _planted_set(n_poisoned: int, n_clean_target: int, seed: int = 0, dim: int = 16, classes: int = 4, per: int = 80):
    """Class blobs in [0, 1]^dim; poisoned = images of classes 1..3 plus a planted offset, labelled 0."""
    from robustkit.data import ArrayDataset

    g = torch.Generator().manual_seed(seed)
    means = 0.25 + 0.5 * torch.rand(classes, dim, generator=g)
    trigger = torch.zeros(dim)
    trigger[:4] = 0.35
    xs, ys, truth = [], [], []
    for c in range(classes):
        n = n_clean_target if c == 0 else per
        xs.append(means[c] + 0.03 * torch.randn(n, dim, generator=g))
        ys.append(torch.full((n,), c))
        truth.append(torch.zeros(n, dtype=torch.bool))
    src = 1 + torch.arange(n_poisoned) % (classes - 1)
    xs.append(means[src] + 0.03 * torch.randn(n_poisoned, dim, generator=g) + trigger)
    ys.append(torch.zeros(n_poisoned, dtype=torch.long))
    truth.append(torch.ones(n_poisoned, dtype=torch.bool))
    x = torch.cat(xs).clamp(0, 1).view(-1, 1, 1, dim)
    return ArrayDataset(x, torch.cat(ys)), torch.cat(truth), _FeaturesAreInput(dim, classes)


@pytest.mark.parametrize("n_poisoned, n_clean", [(30, 70), (70, 30)])
def test_activation_clustering_scores_point_at_the_poisoned_cluster_whichever_is_larger(n_poisoned, n_clean):
    """#15: a perfect split scored AUROC 0.008 when the poisoned part was the larger cluster."""
    from robustkit.base import FilterResult

    data, truth, model = _planted_set(n_poisoned, n_clean)
    res = ActivationClustering(progress=False).fit(model, data)
    target = res.details["per_class"][0]
    assert target["silhouette"] > 0.5 and target["suspicious_share"] == pytest.approx(n_poisoned / 100)
    in_target = data.labels == 0
    sub = FilterResult(res.scores[in_target], res.flagged[in_target])
    assert filter_metrics(sub, truth[in_target])["auroc"] == 1.0
    assert filter_metrics(res, truth)["auroc"] > 0.95
    if n_poisoned < n_clean:  # a minority: flagged, exactly
        assert torch.equal(res.flagged, truth)
    else:  # a majority: the relative-size rule keeps it, and says so
        assert not res.flagged.any() and any("larger one" in w for w in res.details["warnings"])
        by_size = ActivationClustering(suspicious="size", progress=False).fit(model, data)
        assert filter_metrics(FilterResult(by_size.scores[in_target], by_size.flagged[in_target]),
                              truth[in_target])["auroc"] == 0.0  # the paper's smaller-cluster orientation: inverted


def _planted_direction(p: float, n: int = 400, dim: int = 20, seed: int = 0):
    """One class: clean ~ m + N(0, 0.1^2 I); a share p is poisoned, shifted by 1.0 along a planted unit vector u."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    u = torch.randn(dim, generator=g, dtype=torch.float64)
    u /= u.norm()
    m = 1.0 + torch.rand(dim, generator=g, dtype=torch.float64)
    x = m + 0.1 * torch.randn(n, dim, generator=g, dtype=torch.float64)
    truth = torch.zeros(n, dtype=torch.bool)
    truth[: int(p * n)] = True
    x[truth] += 1.0 * u * (1 if float(m @ u) >= 0 else -1)  # the trigger adds activation on the class-mean side
    return x, truth, u


def _auroc(scores, truth):
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(truth.numpy(), scores.numpy()))


def test_spectral_scores_on_a_planted_direction():
    """Tran et al.: squared correlation with the top singular vector of the *centred* class matrix."""
    from robustkit.filtering.spectral_signatures import class_scores

    x, truth, u = _planted_direction(0.1)
    sq, info = class_scores(x, "squared")
    assert _auroc(sq, truth) == 1.0 and info["top_share"] > 0.25
    assert set(torch.topk(sq, 40).indices.tolist()) == set(torch.nonzero(truth).flatten().tolist())
    # centring: a constant offset of every representation changes nothing (uncentred, v would be the mean)
    torch.testing.assert_close(class_scores(x + 5.0, "squared")[0], sq)
    # the top singular vector is the planted direction: the score is the squared projection on u
    centred = x - x.mean(0)
    assert abs(_spearman(sq, (centred @ u) ** 2)) > 0.95
    # a 50/50 class: the squared score cannot rank the halves (both lie as far from the mean); the signed one can
    x, truth, _ = _planted_direction(0.5)
    assert 0.3 < _auroc(class_scores(x, "squared")[0], truth) < 0.7
    signed, info = class_scores(x, "signed")
    assert _auroc(signed, truth) == 1.0 and info["mean_projection"] >= 0
    # IBM ART's score |<r_i, v>| with uncentred r_i ranks like the signed score here
    _, _, vh = torch.linalg.svd(x - x.mean(0), full_matrices=False)
    assert _auroc((x @ vh[0]).abs(), truth) == 1.0


def _spearman(a, b):
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def test_spectral_signatures_signed_option_end_to_end():
    data, truth, model = _planted_set(60, 60)
    paper = SpectralSignatures(expected_rate=0.3, progress=False).fit(model, data)
    signed = SpectralSignatures(expected_rate=0.3, score="signed", progress=False).fit(model, data)
    assert signed.details["scoring"] == "signed" and paper.details["scoring"] == "squared"
    in_target = data.labels == 0
    assert _auroc(signed.scores[in_target], truth[in_target]) == 1.0
    with pytest.raises(InputError, match="score"):
        SpectralSignatures(score="abs")
