"""Data loaders on real (digits) and generated files: exact values, splits, and clear errors."""

import builtins
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset, Subset

import robustkit
from robustkit.data import (
    ArrayDataset,
    DataBundle,
    cifar10,
    digits,
    image_folder,
    load_npz,
    save_npz,
    stratified_split,
    to_tensors,
)
from robustkit.errors import ConfigError, DataNotFoundError, InputError, UnknownNameError


@pytest.fixture(scope="module")
def sk_digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.from_numpy(d.images).float(), torch.from_numpy(d.target).long()


# ----------------------------------------------------------------------------- digits
def test_digits_is_real_exact_and_split_stratified(sk_digits):
    images, target = sk_digits
    b = digits()  # defaults: 32x32, 1 channel, test_fraction 0.25, seed 0
    assert isinstance(b, DataBundle) and b.name == "digits"
    assert len(b.train) + len(b.test) == 1797
    assert (b.channels, b.image_size, b.num_classes) == (1, (32, 32), 10)
    assert b.classes == [str(i) for i in range(10)]
    x_tr, y_tr = to_tensors(b.train)
    x_te, y_te = to_tensors(b.test)
    assert x_tr.dtype == torch.float32 and x_tr.shape[1:] == (1, 32, 32)
    assert float(torch.cat([x_tr, x_te]).min()) >= 0 and float(torch.cat([x_tr, x_te]).max()) <= 1
    # exactly: the seed-0 stratified split of the scikit-learn images / 16, bilinearly upsampled
    tr, te = stratified_split(target.numpy(), 0.25, seed=0)
    expected = F.interpolate(images[te].unsqueeze(1) / 16, size=(32, 32), mode="bilinear",
                             align_corners=False, antialias=False).clamp(0, 1)
    assert torch.equal(x_te, expected) and torch.equal(y_te, target[te])
    assert torch.equal(y_tr, target[tr])
    # stratified: each class contributes round(0.25 * n_c) test samples
    per_class = torch.bincount(target, minlength=10)
    want = [round(0.25 * int(n)) for n in per_class]
    assert torch.bincount(y_te, minlength=10).tolist() == want


def test_digits_size8_is_the_original_scans(sk_digits):
    images, _ = sk_digits
    b = digits(size=8)
    x = torch.cat([to_tensors(b.train)[0], to_tensors(b.test)[0]])
    got = sorted(map(tuple, (x * 16).round().flatten(1).tolist()))
    assert got == sorted(map(tuple, images.flatten(1).tolist()))


def test_digits_deterministic_seeds_and_3_channels():
    a, b = digits(size=16, seed=1), digits(size=16, seed=1)
    assert torch.equal(to_tensors(a.test)[0], to_tensors(b.test)[0])
    c = digits(size=16, seed=2)
    assert not torch.equal(to_tensors(a.test)[1], to_tensors(c.test)[1])
    rgb = digits(size=16, channels=3)
    x = to_tensors(rgb.test)[0]
    assert rgb.channels == 3 and x.shape[1] == 3
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    assert torch.equal(x[:, :1], to_tensors(digits(size=16).test)[0])
    half = digits(size=16, test_fraction=0.5)
    assert abs(len(half.test) - 1797 / 2) < 10
    with pytest.raises(InputError, match="channels must be 1 or 3"):
        digits(channels=2)
    with pytest.raises(InputError, match="size must be an integer >= 8"):
        digits(size=4)
    with pytest.raises(InputError, match="test_fraction"):
        digits(test_fraction=1.0)


def test_registry_build_and_unknown():
    b = robustkit.DATASETS.build({"name": "digits", "size": 16})
    assert b.image_size == (16, 16) and len(b.train) + len(b.test) == 1797
    for name in ("digits", "cifar10", "image_folder", "npz"):
        assert name in robustkit.DATASETS
    with pytest.raises(UnknownNameError, match="unknown dataset 'mnist'") as info:
        robustkit.DATASETS.build("mnist")
    assert all(n in str(info.value) for n in ("cifar10", "digits", "image_folder", "npz"))
    with pytest.raises(ConfigError, match="Did you mean 'size'"):
        robustkit.DATASETS.build({"name": "digits", "sise": 16})


# ----------------------------------------------------------------------------- helpers
def test_stratified_split_properties():
    y = np.repeat(np.arange(3), [10, 20, 30])
    tr, te = stratified_split(y, 0.2, seed=0)
    assert tr.dtype == np.int64 and te.dtype == np.int64
    assert sorted(np.concatenate([tr, te]).tolist()) == list(range(60))  # disjoint and complete
    assert np.bincount(y[te]).tolist() == [2, 4, 6] and np.bincount(y[tr]).tolist() == [8, 16, 24]
    tr2, te2 = stratified_split(torch.from_numpy(y), 0.2, seed=0)
    assert np.array_equal(tr, tr2) and np.array_equal(te, te2)
    _, te3 = stratified_split(y, 0.2, seed=1)
    assert not np.array_equal(np.sort(te), np.sort(te3))
    # a tiny class still puts one sample on each side
    tr4, te4 = stratified_split([0, 0, 1, 1, 1, 1, 1, 1, 1, 1], 0.1, seed=0)
    assert sorted(np.asarray([0, 0, 1, 1, 1, 1, 1, 1, 1, 1])[te4].tolist()) == [0, 1]
    with pytest.raises(InputError, match=r"test_fraction must be a number in \(0, 1\)"):
        stratified_split(y, 1.5)
    with pytest.raises(InputError, match="non-empty 1-D"):
        stratified_split(np.zeros((2, 2), int), 0.2)
    with pytest.raises(InputError, match="leaves the test split empty"):
        stratified_split([0, 1, 2], 0.2)
    with pytest.raises(InputError, match="integer class indices"):
        stratified_split(np.array([0.5, 1.5]), 0.5)


def test_array_dataset_checks_and_subset():
    imgs = torch.rand(5, 1, 4, 6)
    ds = ArrayDataset(imgs, torch.tensor([0, 1, 2, 1, 0]))
    assert len(ds) == 5 and ds.num_classes == 3 and ds.classes == ["0", "1", "2"]
    assert (ds.channels, ds.image_size) == (1, (4, 6))
    x0, y0 = ds[0]
    assert isinstance(y0, int) and torch.equal(x0, imgs[0])
    sub = ds.subset([1, 3])
    assert isinstance(sub, ArrayDataset) and torch.equal(sub.labels, torch.tensor([1, 1]))
    assert sub.num_classes == 3 and torch.equal(sub.images, imgs[[1, 3]])
    assert torch.equal(ds.subset(torch.tensor([True, False, False, False, True])).labels, torch.tensor([0, 0]))
    assert len(ds.subset(np.array([4]))) == 1
    named = ArrayDataset(imgs, torch.tensor([0, 1, 0, 1, 0]), classes=["a", "b", "c"])
    assert named.num_classes == 3 and named.subset([0]).classes == ["a", "b", "c"]
    with pytest.raises(InputError, match="out of range"):
        ds.subset([7])
    with pytest.raises(InputError, match="at least one index"):
        ds.subset([])
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        ArrayDataset(torch.rand(2, 1, 4, 4) * 255, torch.tensor([0, 1]))
    with pytest.raises(InputError, match="2 labels but there are 3 images"):
        ArrayDataset(torch.rand(3, 1, 4, 4), torch.tensor([0, 1]))
    with pytest.raises(InputError, match="N x C x H x W"):
        ArrayDataset(torch.rand(3, 4, 4), torch.tensor([0, 1, 2]))
    with pytest.raises(InputError, match="integer class indices"):
        ArrayDataset(torch.rand(2, 1, 4, 4), torch.tensor([0.0, 1.0]))
    with pytest.raises(InputError, match="only 2 class names"):
        ArrayDataset(torch.rand(3, 1, 4, 4), torch.tensor([0, 1, 2]), classes=["a", "b"])


class _ListDataset(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def test_to_tensors_fast_paths_and_generic():
    x, y = torch.rand(10, 3, 2, 2), torch.arange(10) % 3
    ds = ArrayDataset(x, y)
    assert torch.equal(to_tensors(ds)[0], x) and torch.equal(to_tensors(ds, max_samples=4)[1], y[:4])
    sub = Subset(ds, [7, 2, 5])
    xs, ys = to_tensors(sub)
    assert torch.equal(xs, x[[7, 2, 5]]) and torch.equal(ys, y[[7, 2, 5]])
    nested = Subset(Subset(ds, [9, 8, 7, 6]), np.array([3, 0]))
    assert torch.equal(to_tensors(nested)[0], x[[6, 9]])
    gx, gy = to_tensors(_ListDataset(x, y), max_samples=7, batch_size=3)
    assert gx.dtype == torch.float32 and gy.dtype == torch.int64
    assert torch.equal(gx, x[:7]) and torch.equal(gy, y[:7])
    with pytest.raises(InputError, match="max_samples"):
        to_tensors(ds, max_samples=0)
    with pytest.raises(InputError, match="empty"):
        to_tensors(_ListDataset(x[:0], y[:0]))


# ----------------------------------------------------------------------------- CIFAR-10
CIFAR_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]


def write_fake_cifar(root, n_per_batch=4, seed=0, protocol=2):
    """The genuine layout: pickled dicts with bytes keys, uint8 N x 3072 data, list labels."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n_per_batch).tolist()
        with open(folder / name, "wb") as fh:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [f"{i}.png".encode() for i in range(n_per_batch)]}, fh, protocol=protocol)
        batches[name] = (data, labels)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": CIFAR_NAMES, b"num_cases_per_batch": n_per_batch, b"num_vis": 3072}, fh,
                    protocol=protocol)
    return folder, batches


def _as_images(data):
    return torch.from_numpy(data.reshape(-1, 3, 32, 32)).float() / 255


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_reads_genuine_format_exactly(tmp_path, protocol):
    folder, batches = write_fake_cifar(tmp_path, protocol=protocol)
    for root in (tmp_path, folder):  # the parent or the folder itself
        b = cifar10(str(root))
        assert len(b.train) == 20 and len(b.test) == 4 and b.name == "cifar10"
        assert b.classes == [c.decode() for c in CIFAR_NAMES]
        assert (b.num_classes, b.channels, b.image_size) == (10, 3, (32, 32))
    x, y = to_tensors(b.train)
    expected = torch.cat([_as_images(batches[f"data_batch_{i}"][0]) for i in range(1, 6)])
    assert torch.equal(x, expected)  # pixel p -> p / 255, channel-major rows of 1024
    assert x[0, 1, 2, 3] == batches["data_batch_1"][0][0, 1024 + 2 * 32 + 3] / 255.0
    assert y.tolist() == sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    xt, yt = to_tensors(b.test)
    assert torch.equal(xt, _as_images(batches["test_batch"][0])) and yt.tolist() == batches["test_batch"][1]


def test_cifar10_limits_take_a_prefix(tmp_path):
    _, batches = write_fake_cifar(tmp_path)
    lim = cifar10(str(tmp_path), train_limit=6, test_limit=2)
    assert len(lim.train) == 6 and len(lim.test) == 2
    x, y = to_tensors(lim.train)
    expected = torch.cat([_as_images(batches["data_batch_1"][0]), _as_images(batches["data_batch_2"][0][:2])])
    assert torch.equal(x, expected) and y.tolist() == batches["data_batch_1"][1] + batches["data_batch_2"][1][:2]
    assert len(cifar10(str(tmp_path), train_limit=1000).train) == 20
    with pytest.raises(InputError, match="train_limit must be an integer >= 1"):
        cifar10(str(tmp_path), train_limit=0)


def test_cifar10_missing_files_clear_error(tmp_path):
    with pytest.raises(DataNotFoundError, match=r"lacks data_batch_1.*test_batch, batches.meta") as info:
        cifar10(str(tmp_path))
    msg = str(info.value)
    assert "cifar-10-batches-py" in msg and "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in msg
    assert str(tmp_path) in msg and "download=True" in msg
    folder, _ = write_fake_cifar(tmp_path / "x")
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataNotFoundError, match="lacks data_batch_3\\. Expected"):
        cifar10(str(folder))
    assert isinstance(info.value, FileNotFoundError)  # generic handlers still work


def test_cifar10_download(tmp_path, monkeypatch):
    import torchvision

    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(DataNotFoundError, match="could not be downloaded.*network unreachable.*cifar-10-python"):
        cifar10(str(tmp_path), download=True)

    calls = []

    def fake_download(root, train=True, download=False):  # what torchvision does when online
        calls.append(root)
        write_fake_cifar(tmp_path / "dl")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake_download)
    b = cifar10(str(tmp_path / "dl"), download=True)
    assert len(b.train) == 20 and calls == [str(tmp_path / "dl")]
    cifar10(str(tmp_path / "dl"), download=True)  # present now: no second download
    assert len(calls) == 1


def test_cifar10_corrupt_files(tmp_path):
    folder, _ = write_fake_cifar(tmp_path)
    (folder / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(InputError, match="test_batch is not a CIFAR-10 python batch"):
        cifar10(str(tmp_path))
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, fh)
    with pytest.raises(InputError, match="N x 3072"):
        cifar10(str(tmp_path))
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1, 2]}, fh)
    with pytest.raises(InputError, match="and 3 labels"):
        cifar10(str(tmp_path))
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump([1, 2, 3], fh)
    with pytest.raises(InputError, match="expected a dict"):
        cifar10(str(tmp_path))
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 12]}, fh)
    with pytest.raises(InputError, match="labels must be in 0..9"):
        cifar10(str(tmp_path))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a"]}))
    with pytest.raises(InputError, match="not a CIFAR-10 meta file"):
        cifar10(str(tmp_path))


class _Evil:
    def __reduce__(self):
        return (builtins.print, ("pwned",))


def test_cifar10_pickle_cannot_run_code(tmp_path, capsys):
    folder, _ = write_fake_cifar(tmp_path)
    with open(folder / "data_batch_1", "wb") as fh:
        pickle.dump({b"data": _Evil(), b"labels": [0]}, fh)
    with pytest.raises(InputError, match="refusing to load global builtins.print"):
        cifar10(str(tmp_path))
    assert "pwned" not in capsys.readouterr().out


# ----------------------------------------------------------------------------- ImageFolder
def write_folder(root, classes=("cat", "dog"), n=6, size=(10, 8), mode="RGB", seed=0):
    """PNG files root/<class>/<i>.png of size (width, height); returns the uint8 arrays."""
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


def _expected(a):
    t = torch.from_numpy(a)
    return (t.permute(2, 0, 1) if t.dim() == 3 else t.unsqueeze(0)).float() / 255


def test_image_folder_split_values_and_determinism(tmp_path):
    root = tmp_path / "imgs"
    arrays = write_folder(root, n=5)
    (root / ".ipynb_checkpoints").mkdir()  # hidden folders are not classes
    b = image_folder(str(root), test_fraction=0.4, seed=0)
    assert b.classes == ["cat", "dog"] and b.num_classes == 2 and b.name == "imgs"
    assert b.channels == 3 and b.image_size == (8, 10)  # (height, width)
    assert len(b.train) == 6 and len(b.test) == 4
    full = b.train.dataset
    for sub in (b.train, b.test):  # exact round trip p -> p / 255 for every file
        for i in sub.indices:
            path, label = full.samples[i]
            x, y = full[i]
            c = full.classes[label]
            assert x.dtype == torch.float32 and torch.equal(x, _expected(arrays[(c, int(path[-5]))]))
    # stratified and reproducible from the seed
    y_te = [full.targets[i] for i in b.test.indices]
    assert sorted(y_te) == [0, 0, 1, 1]
    again = image_folder(str(root), test_fraction=0.4, seed=0)
    assert again.test.indices == b.test.indices and again.train.indices == b.train.indices
    other = image_folder(str(root), test_fraction=0.4, seed=3)
    assert sorted(other.test.indices) != sorted(b.test.indices)
    xs, ys = to_tensors(b.test, max_samples=3)
    assert xs.shape == (3, 3, 8, 10) and ys.dtype == torch.int64
    # lazily built dataset class pickles (DataLoader workers)
    clone = pickle.loads(pickle.dumps(b.train))
    assert torch.equal(clone[0][0], b.train[0][0])


def test_image_folder_train_test_layouts_resize_gray(tmp_path):
    write_folder(tmp_path / "d" / "train", n=3)
    write_folder(tmp_path / "d" / "test", n=2, seed=1)
    b = image_folder(str(tmp_path / "d"), size=16, channels=1)
    assert len(b.train) == 6 and len(b.test) == 4 and b.channels == 1 and b.image_size == (16, 16)
    x, _ = to_tensors(b.test)
    assert x.shape == (4, 1, 16, 16) and float(x.min()) >= 0 and float(x.max()) <= 1
    # val/ is accepted as the test folder; grayscale files stay exact with channels=1
    gray = write_folder(tmp_path / "v" / "train", classes=("a", "b"), n=2, mode="L")
    write_folder(tmp_path / "v" / "val", classes=("a", "b"), n=1, mode="L", seed=2)
    v = image_folder(str(tmp_path / "v"), channels=1)
    assert len(v.train) == 4 and len(v.test) == 2 and v.channels == 1
    idx = v.train.samples.index((str(tmp_path / "v" / "train" / "b" / "1.png"), 1))
    assert torch.equal(v.train[idx][0], _expected(gray[("b", 1)]))
    # test_root
    write_folder(tmp_path / "tr", n=2)
    write_folder(tmp_path / "te", n=1, seed=3)
    t = image_folder(str(tmp_path / "tr"), test_root=str(tmp_path / "te"))
    assert len(t.train) == 4 and len(t.test) == 2
    # only train/: split it (train is not a class)
    write_folder(tmp_path / "o" / "train", n=5)
    o = image_folder(str(tmp_path / "o"), test_fraction=0.2)
    assert o.classes == ["cat", "dog"] and len(o.train) == 8 and len(o.test) == 2


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataNotFoundError, match="image folder not found"):
        image_folder(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFoundError, match="no class sub-folders"):
        image_folder(str(tmp_path / "empty"))
    (tmp_path / "noimg" / "a").mkdir(parents=True)
    (tmp_path / "noimg" / "a" / "notes.txt").write_text("x")
    with pytest.raises(DataNotFoundError, match="no images in"):
        image_folder(str(tmp_path / "noimg"))
    write_folder(tmp_path / "mixed", classes=("a",), n=2, size=(8, 8))
    write_folder(tmp_path / "mixed", classes=("b",), n=2, size=(9, 7))
    with pytest.raises(InputError, match=r"differ in size \(.*a/0\.png: 8x8, .*b/0\.png: 9x7\); pass size="):
        image_folder(str(tmp_path / "mixed"))
    assert image_folder(str(tmp_path / "mixed"), size=8, test_fraction=0.5).image_size == (8, 8)
    write_folder(tmp_path / "cls" / "train", classes=("a", "b"), n=2)
    write_folder(tmp_path / "cls" / "test", classes=("a", "c"), n=2)
    with pytest.raises(InputError, match=r"different classes: \['a', 'b'\] vs \['a', 'c'\]"):
        image_folder(str(tmp_path / "cls"))
    write_folder(tmp_path / "sz" / "train", n=1, size=(8, 8))
    write_folder(tmp_path / "sz" / "test", n=1, size=(6, 6))
    with pytest.raises(InputError, match="train images are 3x8x8 but test images are 3x6x6"):
        image_folder(str(tmp_path / "sz"))
    with pytest.raises(InputError, match="channels must be 1"):
        image_folder(str(tmp_path / "mixed"), channels=4)
    with pytest.raises(DataNotFoundError, match="image folder not found"):
        image_folder(str(tmp_path / "mixed"), size=8, test_root=str(tmp_path / "nope"))


# ----------------------------------------------------------------------------- npz
def test_npz_uint8_channels_last_exact_and_split(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(20, 8, 8, 3), dtype=np.uint8)
    y = np.repeat(np.arange(2), 10)
    np.savez(tmp_path / "a.npz", x=x, y=y, classes=np.array(["no", "yes"]))
    b = load_npz(tmp_path / "a.npz", test_fraction=0.2, seed=0)
    assert b.channels == 3 and b.image_size == (8, 8) and b.classes == ["no", "yes"] and b.name == "a"
    assert len(b.train) == 16 and len(b.test) == 4
    tr, te = stratified_split(y, 0.2, seed=0)
    nchw = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(to_tensors(b.train)[0], nchw[tr]) and torch.equal(to_tensors(b.test)[0], nchw[te])
    assert to_tensors(b.test)[1].tolist() == y[te].tolist() and sorted(y[te].tolist()) == [0, 0, 1, 1]
    b2 = load_npz(tmp_path / "a.npz", test_fraction=0.2, seed=5)
    assert not torch.equal(to_tensors(b2.test)[0], to_tensors(b.test)[0])


def test_npz_with_x_y_is_used_as_given(tmp_path):
    """Issue #12: an npz with x, y was silently split 80/20 (203 of 1,017 images, in another order)."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(1017, 4, 4), dtype=np.uint8)
    y = rng.integers(0, 10, size=1017)
    np.savez(tmp_path / "all.npz", x=x, y=y)
    b = load_npz(tmp_path / "all.npz")
    xt, yt = to_tensors(b.test)
    assert len(b.test) == 1017 and yt.tolist() == y.tolist()  # every image, in file order
    assert torch.equal(xt, torch.from_numpy(x).float().unsqueeze(1) / 255)
    assert torch.equal(to_tensors(b.test, max_samples=5)[1], torch.from_numpy(y[:5]))  # n_samples: the file's first n
    assert b.train is b.test and b.test_is_train and b.num_classes == 10
    assert not b.with_train(b.train.subset(range(10))).test_is_train
    built = robustkit.DATASETS.build({"name": "npz", "path": str(tmp_path / "all.npz")})
    assert len(built.test) == 1017
    # a split only when asked for: stratified, shuffled order, disjoint, covering the file
    s = load_npz(tmp_path / "all.npz", test_fraction=0.2)
    assert not s.test_is_train and len(s.train) + len(s.test) == 1017
    tr, te = stratified_split(y, 0.2, seed=0)
    assert to_tensors(s.test)[1].tolist() == y[te].tolist() and not np.all(np.diff(te) > 0)  # shuffled, as documented
    assert sorted(np.concatenate([tr, te]).tolist()) == list(range(1017))
    with pytest.raises(ConfigError, match="test_fraction must be None"):
        load_npz(tmp_path / "all.npz", test_fraction=1.5)
    np.savez(tmp_path / "split.npz", x_train=x[:4], y_train=y[:4], x_test=x[4:8], y_test=y[4:8])
    with pytest.raises(ConfigError, match="already holds train and test splits"):
        load_npz(tmp_path / "split.npz", test_fraction=0.2)


def test_npz_float_nchw_train_test_keys(tmp_path):
    x = np.random.default_rng(1).random((6, 1, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "b.npz", x_train=x[:4], y_train=[0, 1, 0, 1], x_test=x[4:], y_test=[1, 0])
    b = load_npz(tmp_path / "b.npz")
    assert torch.equal(to_tensors(b.test)[0], torch.from_numpy(x[4:]))
    assert torch.equal(to_tensors(b.train)[1], torch.tensor([0, 1, 0, 1]))
    assert b.classes == ["0", "1"]
    built = robustkit.DATASETS.build({"name": "npz", "path": str(tmp_path / "b.npz")})
    assert built.channels == 1 and len(built.train) == 4


@pytest.mark.parametrize(
    "shape,channels,size",
    [
        ((8, 5, 7), 1, (5, 7)),  # grayscale N x H x W
        ((8, 5, 7, 1), 1, (5, 7)),  # channels-last, 1 channel
        ((8, 4, 4, 3), 3, (4, 4)),  # channels-last with H = 4 (not RGBA channels-first)
        ((8, 3, 6, 5), 3, (6, 5)),  # channels-first
        ((8, 6, 6, 4), 4, (6, 6)),  # RGBA channels-last
    ],
)
def test_npz_layouts(tmp_path, shape, channels, size):
    x = np.random.default_rng(2).integers(0, 256, size=shape, dtype=np.uint8)
    np.savez(tmp_path / "l.npz", x_train=x, y_train=np.arange(8) % 2, x_test=x[:2], y_test=np.array([0.0, 1.0]))
    b = load_npz(tmp_path / "l.npz")
    assert (b.channels, b.image_size) == (channels, size)
    t = torch.from_numpy(x)
    t = t.unsqueeze(1) if t.dim() == 3 else (t if shape[1] in (1, 3) else t.permute(0, 3, 1, 2))
    assert torch.equal(to_tensors(b.train)[0], t.float() / 255)


def test_save_npz_atomic_and_reloadable(tmp_path):
    x = torch.randint(0, 256, (10, 3, 4, 4)).float() / 255
    y = torch.arange(10) % 2
    p = save_npz(tmp_path / "out.npz", x, y, classes=["a", "b"], original_labels=y.numpy())
    assert p == tmp_path / "out.npz" and [f.name for f in tmp_path.iterdir()] == ["out.npz"]
    with np.load(p) as f:
        assert f["x"].dtype == np.uint8  # exact multiples of 1/255 stored losslessly as uint8
        assert f["original_labels"].tolist() == y.tolist() and f["classes"].tolist() == ["a", "b"]
    b = load_npz(p, test_fraction=0.2)
    assert b.classes == ["a", "b"]
    tr, te = stratified_split(y.numpy(), 0.2, seed=0)
    assert torch.equal(to_tensors(b.train)[0], x[tr]) and torch.equal(to_tensors(b.test)[0], x[te])
    # arbitrary floats stay float32 and round-trip exactly
    xf = torch.rand(4, 1, 2, 2)
    save_npz(tmp_path / "f.npz", xf, torch.tensor([0, 1, 0, 1]))
    with np.load(tmp_path / "f.npz") as f:
        assert f["x"].dtype == np.float32 and np.array_equal(f["x"], xf.numpy())
    # like np.savez, a name without .npz gets it; load_npz finds it under either name
    q = save_npz(tmp_path / "plain", x, y)
    assert q == tmp_path / "plain.npz" and q.is_file() and not (tmp_path / "plain").exists()
    assert len(load_npz(tmp_path / "plain").train) == 10
    # numpy input in channels-last uint8 is stored channels-first
    save_npz(tmp_path / "hwc.npz", (x.permute(0, 2, 3, 1) * 255).round().numpy().astype(np.uint8), y.numpy())
    with np.load(tmp_path / "hwc.npz") as f:
        assert f["x"].shape == (10, 3, 4, 4) and torch.equal(torch.from_numpy(f["x"]).float() / 255, x)


def test_save_npz_failure_keeps_old_file(tmp_path, monkeypatch):
    x, y = torch.zeros(2, 1, 2, 2), torch.tensor([0, 1])
    p = save_npz(tmp_path / "keep.npz", x, y)
    before = p.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez_compressed", boom)
    with pytest.raises(OSError, match="disk full"):
        save_npz(p, torch.ones(2, 1, 2, 2), y)
    assert p.read_bytes() == before and [f.name for f in tmp_path.iterdir()] == ["keep.npz"]


def test_save_npz_errors(tmp_path):
    x, y = torch.zeros(3, 1, 2, 2), torch.tensor([0, 1, 1])
    with pytest.raises(InputError, match="2 labels but there are 3 images"):
        save_npz(tmp_path / "e.npz", x, y[:2])
    with pytest.raises(InputError, match=r"values in \[0, 1\]"):
        save_npz(tmp_path / "e.npz", x + 2, y)
    with pytest.raises(InputError, match="dtype object"):
        save_npz(tmp_path / "e.npz", x, y, meta=np.array([{"a": 1}], dtype=object))
    with pytest.raises(InputError, match="only 1 class names"):
        save_npz(tmp_path / "e.npz", x, y, classes=["a"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "payload,match",
    [
        ({"a": np.zeros(3)}, r"x_train, y_train, x_test, y_test or x, y; found keys \['a'\]"),
        ({"x_train": np.zeros((2, 1, 2, 2)), "y_train": [0, 1]}, "has x_train, y_train but lacks x_test, y_test"),
        ({"x": np.full((2, 1, 2, 2), 2.0), "y": [0, 1]}, r"must be in \[0, 1\], got min 2 max 2"),
        ({"x": np.full((2, 1, 2, 2), -0.5), "y": [0, 1]}, r"must be in \[0, 1\]"),
        ({"x": np.full((2, 1, 2, 2), np.nan), "y": [0, 1]}, "NaN"),
        ({"x": np.zeros((2, 1, 2, 2), np.float32), "y": [0, 1, 1]}, "2 images but 3 labels in y"),
        ({"x_train": np.zeros((2, 1, 2, 2)), "y_train": [0], "x_test": np.zeros((1, 1, 2, 2)), "y_test": [0]},
         "2 images but 1 labels in y_train"),
        ({"x": np.zeros((2, 2), np.float32), "y": [0, 1]}, "3 or 4 dimensions"),
        ({"x": np.zeros((2, 5, 6, 7), np.float32), "y": [0, 1]}, "cannot tell which axis"),
        ({"x": np.zeros((2, 1, 2, 2), np.int64), "y": [0, 1]}, "uint8.*astype"),
        ({"x": np.zeros((2, 1, 2, 2), np.float32), "y": np.eye(2)}, "one-hot"),
        ({"x": np.zeros((2, 1, 2, 2), np.float32), "y": [0.5, 1]}, "integer class indices"),
        ({"x": np.zeros((2, 1, 2, 2), np.float32), "y": [0, -1]}, "negative class index"),
        ({"x": np.zeros((4, 1, 2, 2), np.float32), "y": [0, 0, 1, 1], "classes": ["a"]}, "only 1 class names"),
    ],
)
def test_npz_errors(tmp_path, payload, match):
    np.savez(tmp_path / "bad.npz", **payload)
    with pytest.raises(InputError, match=match):
        load_npz(tmp_path / "bad.npz", test_fraction=0.5)


def test_npz_missing_and_garbage(tmp_path):
    with pytest.raises(DataNotFoundError, match="npz file not found"):
        load_npz(tmp_path / "none.npz")
    with pytest.raises(DataNotFoundError):
        robustkit.DATASETS.build({"name": "npz", "path": str(tmp_path / "none.npz")})
    (tmp_path / "g.npz").write_bytes(b"garbage")
    with pytest.raises(InputError, match="not a readable .npz file"):
        load_npz(tmp_path / "g.npz")
    (tmp_path / "t.npz").write_bytes(b"PK\x03\x04truncated")
    with pytest.raises(InputError, match="not a readable .npz file"):
        load_npz(tmp_path / "t.npz")
    np.save(tmp_path / "one.npy", np.zeros((2, 1, 2, 2)))
    with pytest.raises(InputError, match="single .npy array"):
        load_npz(tmp_path / "one.npy")
