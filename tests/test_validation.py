import math

import pytest
import torch

from robustkit.errors import InputError
from robustkit.validation import check_images, check_labels, check_positive, check_same_device


def test_accepts_valid_images():
    x = torch.rand(2, 3, 8, 8)
    assert check_images(x) is x
    check_images(x.double())


@pytest.mark.parametrize(
    "x,match",
    [
        (torch.rand(3, 8, 8), "N x C x H x W.*add a batch dimension"),
        (torch.rand(8, 8), "N x C x H x W"),
        ((torch.rand(1, 3, 4, 4) * 255).to(torch.uint8), "floating-point.*x.float\\(\\) / 255"),
        (torch.rand(1, 3, 4, 4) * 255, "values in \\[0, 1\\].*max"),
        (torch.rand(1, 3, 4, 4) - 0.5, "values in \\[0, 1\\].*min"),
        (torch.full((1, 1, 2, 2), math.nan), "NaN"),
        (torch.tensor([[[[0.5, math.inf]]]]), "NaN or infinite"),
        (torch.empty(0, 3, 4, 4), "empty"),
        (torch.rand(1, 2, 4, 4), None),
        ("not a tensor", "torch.Tensor"),
    ],
)
def test_rejects_bad_images(x, match):
    if match is None:  # the channel check
        with pytest.raises(InputError, match="must have 3 channels, got 2"):
            check_images(x, channels=3)
        return
    with pytest.raises(InputError, match=match):
        check_images(x)


def test_nan_in_middle_detected():
    x = torch.rand(2, 1, 4, 4)
    x[1, 0, 2, 2] = math.nan
    with pytest.raises(InputError, match="NaN"):
        check_images(x)


def test_range_check_can_be_skipped():
    check_images(torch.rand(1, 1, 2, 2) * 5, check_range=False)


def test_labels():
    check_labels(torch.tensor([0, 1, 2]), 3, num_classes=3)
    with pytest.raises(InputError, match="1-D"):
        check_labels(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(InputError, match="integer"):
        check_labels(torch.zeros(3))
    with pytest.raises(InputError, match="3 labels but there are 4 images"):
        check_labels(torch.zeros(3, dtype=torch.long), 4)
    with pytest.raises(InputError, match="negative"):
        check_labels(torch.tensor([-1, 0]))
    with pytest.raises(InputError, match="class index 5 but the model has 3 classes"):
        check_labels(torch.tensor([5]), num_classes=3)


def test_device_and_positive():
    check_same_device(torch.zeros(1), torch.zeros(1))
    if torch.cuda.is_available():
        with pytest.raises(InputError, match="one device"):
            check_same_device(torch.zeros(1), torch.zeros(1, device="cuda"))
    assert check_positive(2, "s") == 2.0
    assert check_positive(0, "s", allow_zero=True) == 0.0
    for bad in (0, -1, math.nan, math.inf, "x"):
        with pytest.raises(InputError):
            check_positive(bad, "s")


def test_labels_int64_only_unless_converted():
    """Issue #12: int32 labels passed check_labels and crashed later inside cross_entropy."""
    with pytest.raises(InputError, match=r"int64.*torch.int32.*y.long\(\)"):
        check_labels(torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(InputError, match="uint8"):
        check_labels(torch.tensor([0, 1], dtype=torch.uint8))
    out = check_labels(torch.tensor([0, 1], dtype=torch.int32), convert=True)
    assert out.dtype == torch.int64 and out.tolist() == [0, 1]
    with pytest.raises(InputError, match="integer"):
        check_labels(torch.tensor([0.0, 1.0]), convert=True)


def test_data_layer_yields_int64_labels():
    from robustkit.data import ArrayDataset, to_tensors
    from torch.utils.data import TensorDataset

    x = torch.rand(4, 1, 2, 2)
    ds = ArrayDataset(x, torch.tensor([0, 1, 0, 1], dtype=torch.int32))
    assert ds.labels.dtype == torch.int64
    xt, yt = to_tensors(TensorDataset(x, torch.tensor([0, 1, 2, 1], dtype=torch.int32)))
    assert yt.dtype == torch.int64 and yt.tolist() == [0, 1, 2, 1]
    # a generic dataset's labels and images are checked, not truncated or passed on silently
    with pytest.raises(InputError, match="integer class indices"):
        to_tensors(TensorDataset(x, torch.tensor([0.5, 1.0, 0.0, 1.0])))
    with pytest.raises(InputError, match=r"values in \[0, 1\]"):
        to_tensors(TensorDataset(x * 255, torch.tensor([0, 1, 0, 1])))
    # int32 labels from the data layer train without a dtype crash
    import torch.nn.functional as F

    F.cross_entropy(torch.zeros(4, 3), yt)


def test_check_num_classes_and_target():
    from robustkit.validation import check_num_classes, check_target_class

    assert check_num_classes(10, 10) == 10
    with pytest.raises(InputError, match="model.pt outputs 3 classes but the test set has 10 classes"):
        check_num_classes(3, 10, model="model.pt", data="the test set")
    with pytest.raises(InputError, match="model_classes must be an integer"):
        check_num_classes(0, 10)
    assert check_target_class(2, 3) == 2
    with pytest.raises(InputError, match=r"target 99 is not a class of a data set with 3 classes \(0..2\)"):
        check_target_class(99, 3)


class _Linear(torch.nn.Module):
    def __init__(self, k=3):
        super().__init__()
        self.fc = torch.nn.Linear(4, k)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_accuracy_validates_its_data():
    """Issue #12: accuracy(model, Dataset) checked nothing (0..255, NaN, empty -> 0.0)."""
    from torch.utils.data import Subset, TensorDataset

    from robustkit.data import ArrayDataset
    from robustkit.inference import accuracy

    m = _Linear()
    x, y = torch.rand(6, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1, 2])
    ds = ArrayDataset(x, y)
    acc = accuracy(m, ds)
    assert 0 <= acc <= 1 and acc == accuracy(m, (x, y)) == accuracy(m, (x, y.int()))
    with pytest.raises(InputError, match=r"values in \[0, 1\]"):
        accuracy(m, TensorDataset(x * 255, y))
    with pytest.raises(InputError, match="NaN"):
        accuracy(m, TensorDataset(torch.full_like(x, float("nan")), y))
    with pytest.raises(InputError, match="empty"):
        accuracy(m, Subset(ds, []))
    with pytest.raises(InputError, match="integer"):
        accuracy(m, TensorDataset(x, y.float()))
    with pytest.raises(InputError, match=r"values in \[0, 1\]"):
        accuracy(m, (x * 255, y))
    with pytest.raises(InputError, match="6 labels but there are 5 images"):
        accuracy(m, (x[:5], y))
    # a label the model cannot output: a 3-class checkpoint on 10-class data
    with pytest.raises(InputError, match="class index 9 but the model outputs only 3 classes"):
        accuracy(m, ArrayDataset(x, torch.tensor([0, 1, 2, 9, 1, 2])))
    with pytest.raises(InputError, match="batch_size"):
        accuracy(m, ds, batch_size=0)


def test_output_classes_feeds_check_num_classes():
    from robustkit.inference import output_classes
    from robustkit.validation import check_num_classes

    m = torch.nn.Sequential(_Linear(3), torch.nn.BatchNorm1d(3)).train()
    x = torch.rand(4, 1, 2, 2)
    assert output_classes(m, x) == 3
    assert m.training and m[1].training and int(m[1].num_batches_tracked) == 0  # modes restored, nothing updated
    with pytest.raises(InputError, match="ckpt.pt outputs 3 classes but digits has 10 classes"):
        check_num_classes(output_classes(m, x), 10, model="ckpt.pt", data="digits")
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        output_classes(m, x * 255)


def test_shared_check_helpers_raise_the_layers_error():
    from robustkit.errors import ConfigError, InputError
    from robustkit.validation import check_choice, check_int, check_range

    assert check_int(3, "steps", minimum=1) == 3
    for bad in (0, 1.5, True, "3"):
        with pytest.raises(InputError, match="steps must be an integer >= 1"):
            check_int(bad, "steps", minimum=1)
    with pytest.raises(ConfigError, match=r"k must be an integer in \[1, 4\]"):
        check_int(5, "k", minimum=1, maximum=4, error=ConfigError)
    assert check_range(0.5, "rate", 0, 1) == 0.5
    for bad in (-0.1, 1.1, float("nan"), "x", False):
        with pytest.raises(InputError, match=r"rate must be a number in \[0, 1\]"):
            check_range(bad, "rate", 0, 1)
    with pytest.raises(InputError, match=r"\(0, 1\]"):
        check_range(0.0, "ratio", 0, 1, low_open=True)
    assert check_choice("l2", "norm", ("linf", "l2")) == "l2"
    with pytest.raises(ConfigError, match="norm must be one of 'linf', 'l2'"):
        check_choice("l1", "norm", ("linf", "l2"), error=ConfigError)
