import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import robustkit
from robustkit.data import (
    ArrayDataset,
    cifar10,
    digits,
    image_folder,
    load_npz,
    save_npz,
    stratified_split,
    to_tensors,
)
from robustkit.errors import DataNotFoundError, InputError, UnknownNameError


# ----------------------------------------------------------------------------- digits
def test_digits_is_real_and_split_stratified():
    b = digits(size=32)
    assert len(b.train) + len(b.test) == 1797
    assert (b.channels, b.image_size, b.num_classes) == (1, (32, 32), 10)
    x, y = to_tensors(b.train)
    assert x.shape[1:] == (1, 32, 32) and float(x.min()) >= 0 and float(x.max()) <= 1
    # every class appears in test in proportion (about 45 each)
    counts = torch.bincount(to_tensors(b.test)[1], minlength=10)
    assert int(counts.min()) >= 40 and int(counts.max()) <= 50
    # the 8x8 originals are recovered by area-downsampling only approximately; check values are not binarized
    assert len(torch.unique(x[:10])) > 50


def test_digits_deterministic_and_3_channels():
    a, b = digits(size=16, seed=1), digits(size=16, seed=1)
    assert torch.equal(to_tensors(a.test)[0], to_tensors(b.test)[0])
    c = digits(size=16, seed=2)
    assert not torch.equal(to_tensors(a.test)[1], to_tensors(c.test)[1])
    rgb = digits(size=16, channels=3)
    x = to_tensors(rgb.test)[0]
    assert x.shape[1] == 3 and torch.equal(x[:, 0], x[:, 2])
    with pytest.raises(InputError):
        digits(channels=2)


def test_registry_build_and_unknown():
    b = robustkit.DATASETS.build({"name": "digits", "size": 16})
    assert b.image_size == (16, 16)
    with pytest.raises(UnknownNameError, match="Known datasets: cifar10, digits, image_folder, npz"):
        robustkit.DATASETS.build("mnist")


def test_stratified_split_properties():
    y = np.repeat(np.arange(3), [10, 20, 30])
    tr, te = stratified_split(y, 0.2, seed=0)
    assert sorted(np.concatenate([tr, te]).tolist()) == list(range(60))
    assert np.bincount(y[te]).tolist() == [2, 4, 6]
    tr2, te2 = stratified_split(y, 0.2, seed=0)
    assert np.array_equal(te, te2)
    with pytest.raises(InputError):
        stratified_split(y, 1.5)


def test_array_dataset_checks_and_subset():
    ds = ArrayDataset(torch.rand(5, 1, 4, 4), torch.tensor([0, 1, 2, 1, 0]))
    assert len(ds) == 5 and ds.num_classes == 3 and isinstance(ds[0][1], int)
    sub = ds.subset([1, 3])
    assert torch.equal(sub.labels, torch.tensor([1, 1]))
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        ArrayDataset(torch.rand(2, 1, 4, 4) * 255, torch.tensor([0, 1]))
    with pytest.raises(InputError, match="2 labels but there are 3 images"):
        ArrayDataset(torch.rand(3, 1, 4, 4), torch.tensor([0, 1]))


# ----------------------------------------------------------------------------- CIFAR-10
def write_fake_cifar(root, n_per_batch=4, seed=0):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n_per_batch).tolist()
        with open(folder / name, "wb") as fh:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": name.encode()}, fh)
        batches[name] = (data, labels)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": names, b"num_cases_per_batch": n_per_batch}, fh)
    return folder, batches


def test_cifar10_reads_genuine_format(tmp_path):
    folder, batches = write_fake_cifar(tmp_path)
    for root in (tmp_path, folder):  # parent or the folder itself
        b = cifar10(str(root))
        assert len(b.train) == 20 and len(b.test) == 4
        assert b.classes[0] == "airplane" and b.num_classes == 10 and b.image_size == (32, 32)
    x, y = to_tensors(b.train)
    data, labels = batches["data_batch_1"]
    # pixel (c, h, w) of image 0 is data[0, c*1024 + h*32 + w] / 255
    assert torch.allclose(x[0], torch.from_numpy(data[0].reshape(3, 32, 32)).float() / 255)
    assert y[:4].tolist() == labels
    xt, yt = to_tensors(b.test)
    assert yt.tolist() == batches["test_batch"][1]
    lim = cifar10(str(tmp_path), train_limit=6, test_limit=2)
    assert len(lim.train) == 6 and len(lim.test) == 2


def test_cifar10_missing_files_clear_error(tmp_path):
    with pytest.raises(DataNotFoundError, match=r"lacks data_batch_1.*cifar-10-python.tar.gz"):
        cifar10(str(tmp_path))
    folder, _ = write_fake_cifar(tmp_path / "x")
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataNotFoundError, match="lacks data_batch_3"):
        cifar10(str(folder))


def test_cifar10_download_failure_is_clear(tmp_path, monkeypatch):
    import torchvision

    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(DataNotFoundError, match="could not be downloaded.*network unreachable"):
        cifar10(str(tmp_path), download=True)


def test_cifar10_corrupt_files(tmp_path):
    folder, _ = write_fake_cifar(tmp_path)
    (folder / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(InputError, match="not a CIFAR-10 python batch"):
        cifar10(str(tmp_path))
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, fh)
    with pytest.raises(InputError, match="N x 3072"):
        cifar10(str(tmp_path))


# ----------------------------------------------------------------------------- ImageFolder
def write_folder(root, classes=("cat", "dog"), n=6, size=(10, 8), mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    arrays = {}
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            a = rng.integers(0, 256, size=shape, dtype=np.uint8)
            Image.fromarray(a, mode=mode).save(root / c / f"{i}.png")
            arrays[(c, i)] = a
    return arrays


def test_image_folder_split_and_values(tmp_path):
    arrays = write_folder(tmp_path / "imgs")
    b = image_folder(str(tmp_path / "imgs"), test_fraction=0.5, seed=0)
    assert b.classes == ["cat", "dog"] and b.channels == 3 and b.image_size == (8, 10)
    assert len(b.train) == 6 and len(b.test) == 6
    x, y = b.train[0]
    assert x.dtype == torch.float32 and float(x.max()) <= 1
    # exact round trip of a known file
    full = b.train.dataset
    idx = full.samples.index((str(tmp_path / "imgs" / "cat" / "0.png"), 0))
    expected = torch.from_numpy(arrays[("cat", 0)]).permute(2, 0, 1).float() / 255
    assert torch.allclose(full[idx][0], expected)


def test_image_folder_train_test_layout_resize_gray(tmp_path):
    write_folder(tmp_path / "d" / "train", n=3)
    write_folder(tmp_path / "d" / "test", n=2, seed=1)
    b = image_folder(str(tmp_path / "d"), size=16, channels=1)
    assert len(b.train) == 6 and len(b.test) == 4 and b.channels == 1 and b.image_size == (16, 16)
    x, _ = to_tensors(b.test)
    assert x.shape == (4, 1, 16, 16)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataNotFoundError, match="not found"):
        image_folder(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFoundError, match="no class sub-folders"):
        image_folder(str(tmp_path / "empty"))
    (tmp_path / "noimg" / "a").mkdir(parents=True)
    with pytest.raises(DataNotFoundError, match="no images"):
        image_folder(str(tmp_path / "noimg"))
    write_folder(tmp_path / "mixed", classes=("a",), n=2, size=(8, 8))
    write_folder(tmp_path / "mixed", classes=("b",), n=2, size=(9, 9))
    with pytest.raises(InputError, match="differ in size.*pass size="):
        image_folder(str(tmp_path / "mixed"))
    write_folder(tmp_path / "cls" / "train", classes=("a", "b"), n=2)
    write_folder(tmp_path / "cls" / "test", classes=("a", "c"), n=2)
    with pytest.raises(InputError, match="different classes"):
        image_folder(str(tmp_path / "cls"))


# ----------------------------------------------------------------------------- npz
def test_npz_roundtrip_uint8_channels_last(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(20, 8, 8, 3), dtype=np.uint8)
    y = np.repeat(np.arange(2), 10)
    np.savez(tmp_path / "a.npz", x=x, y=y, classes=np.array(["no", "yes"]))
    b = load_npz(tmp_path / "a.npz", test_fraction=0.2, seed=0)
    assert b.channels == 3 and b.image_size == (8, 8) and b.classes == ["no", "yes"]
    assert len(b.train) == 16 and len(b.test) == 4
    xt, yt = to_tensors(b.train)
    # every loaded image is exactly one of the originals mapped p -> p / 255
    flat = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    assert any(torch.equal(flat[i], xt[0]) for i in range(20))


def test_npz_float_nchw_train_test_keys(tmp_path):
    x = np.random.default_rng(1).random((6, 1, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "b.npz", x_train=x[:4], y_train=[0, 1, 0, 1], x_test=x[4:], y_test=[1, 0])
    b = load_npz(tmp_path / "b.npz")
    assert torch.equal(to_tensors(b.test)[0], torch.from_numpy(x[4:]))
    assert robustkit.DATASETS.build({"name": "npz", "path": str(tmp_path / "b.npz")}).channels == 1


def test_save_npz_atomic_and_reloadable(tmp_path):
    x = torch.randint(0, 256, (10, 3, 4, 4)).float() / 255
    y = torch.arange(10) % 2
    p = save_npz(tmp_path / "out.npz", x, y, classes=["a", "b"])
    assert p.exists() and [f.name for f in tmp_path.iterdir()] == ["out.npz"]
    with np.load(p) as f:
        assert f["x"].dtype == np.uint8  # exact multiples of 1/255 stored losslessly as uint8
    b = load_npz(p, test_fraction=0.2)
    xs = torch.cat([to_tensors(b.train)[0], to_tensors(b.test)[0]])
    assert sorted(map(tuple, xs.flatten(1).tolist())) == sorted(map(tuple, x.flatten(1).tolist()))
    # arbitrary floats stay float32
    save_npz(tmp_path / "f.npz", torch.rand(4, 1, 2, 2), torch.tensor([0, 1, 0, 1]))
    with np.load(tmp_path / "f.npz") as f:
        assert f["x"].dtype == np.float32


@pytest.mark.parametrize(
    "payload,exc,match",
    [
        ({"a": np.zeros(3)}, InputError, "found keys \\['a'\\]"),
        ({"x": np.full((2, 1, 2, 2), 2.0), "y": [0, 1]}, InputError, "must be in \\[0, 1\\]"),
        ({"x": np.full((2, 1, 2, 2), np.nan), "y": [0, 1]}, InputError, "NaN"),
        ({"x": np.zeros((2, 1, 2, 2), np.float32), "y": [0, 1, 1]}, InputError, "2 images but labels"),
        ({"x": np.zeros((2, 2), np.float32), "y": [0, 1]}, InputError, "3 or 4 dimensions"),
    ],
)
def test_npz_errors(tmp_path, payload, exc, match):
    np.savez(tmp_path / "bad.npz", **payload)
    with pytest.raises(exc, match=match):
        load_npz(tmp_path / "bad.npz")


def test_npz_missing_and_garbage(tmp_path):
    with pytest.raises(DataNotFoundError, match="not found"):
        load_npz(tmp_path / "none.npz")
    (tmp_path / "g.npz").write_bytes(b"garbage")
    with pytest.raises(InputError, match="not a readable"):
        load_npz(tmp_path / "g.npz")
