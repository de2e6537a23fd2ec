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
