"""Batch augmentation (robustkit.data.augment) and its use in fit / fine-tuning repairs."""

import pytest
import torch
import torch.nn.functional as F

from robustkit.data.augment import CropFlip, crop_flip, default_padding, make_augment
from robustkit.errors import InputError


def _reference(x, dy, dx, flip, p):
    """Per-sample slicing of the zero-padded image, the definition of the map."""
    out = []
    for i in range(x.shape[0]):
        xp = F.pad(x[i:i + 1], (p, p, p, p))[0]
        win = xp[:, int(dy[i]):int(dy[i]) + x.shape[2], int(dx[i]):int(dx[i]) + x.shape[3]]
        out.append(win.flip(-1) if bool(flip[i]) else win)
    return torch.stack(out)


def test_crop_flip_matches_per_sample_slicing():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(7, 3, 9, 6, generator=g)
    p = 3
    dy = torch.randint(0, 2 * p + 1, (7,), generator=g)
    dx = torch.randint(0, 2 * p + 1, (7,), generator=g)
    flip = torch.rand(7, generator=g) < 0.5
    assert torch.equal(crop_flip(x, dy, dx, flip, p), _reference(x, dy, dx, flip, p))


def test_crop_flip_identity_and_pure_flip():
    x = torch.rand(4, 2, 5, 5)
    centre = torch.full((4,), 2)
    assert torch.equal(crop_flip(x, centre, centre, torch.zeros(4, dtype=torch.bool), 2), x)
    assert torch.equal(crop_flip(x, centre, centre, torch.ones(4, dtype=torch.bool), 2), x.flip(-1))
    # a shift by one pixel down: the top row becomes zero padding, the rest moves
    out = crop_flip(x, centre - 1, centre, torch.zeros(4, dtype=torch.bool), 2)
    assert torch.equal(out[:, :, 0], torch.zeros_like(out[:, :, 0]))
    assert torch.equal(out[:, :, 1:], x[:, :, :-1])


def test_cropflip_draws_are_independent_of_the_shard():
    x = torch.rand(10, 3, 8, 8)
    aug = CropFlip(2, flip=True)
    full = aug(x, torch.Generator().manual_seed(5))
    part = aug(x[4:7], torch.Generator().manual_seed(5), start=4, total=10)
    assert torch.equal(part, full[4:7])


def test_cropflip_draws_reach_every_offset_and_both_flips():
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 0, 0] = 1.0  # a marker pixel: where it lands says the offset and the flip
    aug = CropFlip(1, flip=True)
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(300):
        out = aug(x, g)
        hits = torch.nonzero(out[0, 0])
        seen.add(tuple(hits[0].tolist()) if len(hits) else None)
    # marker at (0, 0) shifted by (1 - dy, 1 - dx) in {-1, 0, 1}^2, mirrored or not: 8 visible places + cropped out
    assert {(0, 0), (1, 1), (0, 3), (1, 2), None} <= seen


def test_crop_without_flip_never_mirrors():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    aug = CropFlip(0, flip=False)
    assert torch.equal(aug(x, torch.Generator().manual_seed(1)), x)


def test_bad_inputs_are_refused():
    with pytest.raises(InputError, match="N x C x H x W"):
        CropFlip(2)(torch.rand(3, 8, 8))
    with pytest.raises(InputError, match="floating-point"):
        CropFlip(2)(torch.zeros(1, 1, 4, 4, dtype=torch.uint8))
    with pytest.raises(InputError, match="padding"):
        CropFlip(-1)
    with pytest.raises(InputError, match="offsets"):
        crop_flip(torch.rand(1, 1, 4, 4), torch.tensor([5]), torch.tensor([0]), torch.tensor([False]), 2)
    with pytest.raises(InputError, match="augment must be"):
        make_augment("rotate", 32)


def test_make_augment_and_default_padding():
    assert make_augment(None, 32) is None and make_augment("none", 32) is None
    a = make_augment("crop_flip", 32)
    assert (a.padding, a.flip) == (4, True)  # BackdoorBench's RandomCrop(32, padding=4) + flip
    b = make_augment("crop", 16)
    assert (b.padding, b.flip) == (2, False)
    assert default_padding(8) == 1 and default_padding(64) == 8
    assert make_augment("crop", 16, padding=3).padding == 3


def test_finetune_repair_records_and_uses_the_augmentation():
    from robustkit.data.arrays import ArrayDataset
    from robustkit.repair import FineTune

    torch.manual_seed(0)
    x = torch.rand(120, 1, 8, 8)
    y = (x.mean((1, 2, 3)) > 0.5).long()
    data = ArrayDataset(x, y)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(256, 2))
    kw = dict(epochs=2, batch_size=16, clean_ratio=0.5, holdout_ratio=0.2)
    plain = FineTune(**kw, augment=None).repair(net, data, progress=False)
    crop = FineTune(**kw, augment="crop").repair(net, data, progress=False)
    again = FineTune(**kw, augment="crop").repair(net, data, progress=False)
    assert plain.details["augment"] == "none"
    assert crop.details["augment"] == "random crop (zero padding 1)"
    w = [dict(r.model.named_parameters())["0.weight"] for r in (plain, crop, again)]
    assert not torch.equal(w[0], w[1])  # the crops changed what was trained on
    assert torch.equal(w[1], w[2])  # seeded: the same run twice is the same
    with pytest.raises(InputError, match="augment must be"):
        FineTune(augment="mixup")
    with pytest.raises(InputError, match="crop_padding"):
        FineTune(crop_padding=-2)


def test_curvature_estimate_reads_the_augmented_loss():
    """lr="auto" reads the sharpness of the loss fine-tuning minimises: on augmented batches when it augments."""
    from robustkit.data.arrays import ArrayDataset
    from robustkit.repair.finetune import top_hessian_eigenvalue

    torch.manual_seed(0)
    x = torch.rand(40, 1, 6, 6)
    y = (x[:, :, :, :3].mean((1, 2, 3)) > x[:, :, :, 3:].mean((1, 2, 3))).long()  # left vs right: a flip matters
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))

    def mirror(batch, generator=None):
        return batch.flip(-1)

    lam_aug = top_hessian_eigenvalue(net, ArrayDataset(x, y), batch_size=16, augment=mirror, seed=3)
    lam_ref = top_hessian_eigenvalue(net, ArrayDataset(x.flip(-1), y), batch_size=16, seed=3)
    lam_plain = top_hessian_eigenvalue(net, ArrayDataset(x, y), batch_size=16, seed=3)
    assert lam_aug == pytest.approx(lam_ref, rel=1e-4)
    assert lam_aug != pytest.approx(lam_plain, rel=1e-3)


def test_train_classifier_augments_like_fit_with_the_named_augmentation():
    """``train_classifier(augment="crop")`` is ``fit`` with ``CropFlip(H / 8, flip=False)``, seeded; bad names and
    non-image samples are refused."""
    from robustkit.data.arrays import ArrayDataset
    from robustkit.training import fit, train_classifier
    from robustkit.training.steps import PlainStep

    torch.manual_seed(0)
    x = torch.rand(48, 1, 8, 8)
    y = (x[:, :, :4].mean((1, 2, 3)) > x[:, :, 4:].mean((1, 2, 3))).long()
    data = ArrayDataset(x, y)

    def net():
        torch.manual_seed(1)
        return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                   torch.nn.Linear(256, 2))

    kw = dict(epochs=2, batch_size=16, lr=0.1, seed=3, progress=False)
    a, b, c = net(), net(), net()
    train_classifier(a, data, augment="crop", **kw)
    fit(b, data, PlainStep(), augment=CropFlip(1, flip=False), **kw)
    train_classifier(c, data, **kw)
    assert torch.equal(a[0].weight, b[0].weight)
    assert not torch.equal(a[0].weight, c[0].weight)
    with pytest.raises(InputError, match="augment must be"):
        train_classifier(net(), data, augment="cutout", **kw)
    flat = torch.utils.data.TensorDataset(torch.rand(8, 5), torch.zeros(8, dtype=torch.long))
    with pytest.raises(InputError, match="C x H x W"):
        train_classifier(torch.nn.Linear(5, 2), flat, augment="crop", **kw)


def test_fine_tuning_repairs_crop_by_default():
    from robustkit.repair import FTSAM, FineTune

    assert FTSAM().augment == "crop" and FineTune().augment == "crop"
    assert FTSAM(augment="none").augment is None



def test_top_eigenvalue_is_the_largest_not_the_largest_in_magnitude():
    """An indefinite operator whose most negative eigenvalue dominates: power iteration would return
    -10; Lanczos returns the largest eigenvalue, 3 (a direct reference), and within 6 steps on 6 dims."""
    from robustkit.repair.finetune import top_eigenvalue

    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    a = q @ torch.diag(torch.tensor([3.0, 1.0, 0.5, -0.2, -4.0, -10.0], dtype=torch.float64)) @ q.T
    start = [torch.randn(6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)]
    assert top_eigenvalue(lambda v: [a @ v[0]], start, iters=6) == pytest.approx(3.0, rel=1e-6)
    b = q @ torch.diag(torch.tensor([10.0, 1.0, 0.5, -0.2, -4.0, -3.0], dtype=torch.float64)) @ q.T
    assert top_eigenvalue(lambda v: [b @ v[0]], start, iters=6) == pytest.approx(10.0, rel=1e-6)
    assert top_eigenvalue(lambda v: [b @ v[0]], start, iters=40) == pytest.approx(10.0, rel=1e-6)  # past breakdown
