"""Input checks shared by preprocessors, attacks, models and evaluators.

The one rule of the toolkit: images are float tensors ``N x C x H x W`` in ``[0, 1]``.
"""

from __future__ import annotations

import math

import torch

from .errors import InputError

# Values a hair outside [0, 1] come from float round-off (e.g. a resize); anything
# further out is a caller passing 0..255 data or normalized data.
RANGE_TOLERANCE = 1e-5


def check_images(
    x: object,
    name: str = "x",
    *,
    check_range: bool = True,
    channels: int | None = None,
) -> torch.Tensor:
    """Check that ``x`` is a float ``N x C x H x W`` tensor with finite values in [0, 1].

    Returns ``x`` unchanged so the call can be used inline. Raises :class:`InputError`
    with a message that says what was wrong and what was expected.
    """
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        hint = ""
        if x.dim() == 3:
            hint = " (a single image? add a batch dimension with x.unsqueeze(0))"
        raise InputError(
            f"{name} must have shape N x C x H x W, got {x.dim()} dims {tuple(x.shape)}{hint}"
        )
    if not x.is_floating_point():
        raise InputError(
            f"{name} must be a floating-point tensor with values in [0, 1], got dtype {x.dtype}"
            " (convert uint8 images with x.float() / 255)"
        )
    if x.numel() == 0:
        raise InputError(f"{name} is empty: shape {tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        raise InputError(f"{name} must have {channels} channels, got {x.shape[1]} (shape {tuple(x.shape)})")
    if check_range:
        with torch.no_grad():
            lo, hi = torch.aminmax(x.detach())
            lo_v, hi_v = float(lo), float(hi)
        if not (math.isfinite(lo_v) and math.isfinite(hi_v)):  # aminmax propagates NaN; inf shows as a bound
            raise InputError(f"{name} contains NaN or infinite values")
        if lo_v < -RANGE_TOLERANCE or hi_v > 1 + RANGE_TOLERANCE:
            raise InputError(
                f"{name} must have values in [0, 1], got min {lo_v:.4g} max {hi_v:.4g}"
                " (images are never normalized outside the model; divide 0..255 data by 255)"
            )
    return x


def check_labels(
    y: object,
    n: int | None = None,
    name: str = "y",
    num_classes: int | None = None,
    *,
    convert: bool = False,
) -> torch.Tensor:
    """Check that ``y`` is a 1-D int64 tensor of ``n`` class indices (below ``num_classes`` if given).

    Labels must be ``torch.int64`` (``torch.long``), the dtype ``cross_entropy`` and indexing
    need: another integer dtype (int32, uint8, ...) raises :class:`InputError` naming the fix
    (``y.long()``), so it never crashes later inside a loss. With ``convert=True`` another
    integer dtype is accepted and an int64 copy is returned instead (the data layer -
    :class:`~robustkit.data.ArrayDataset`, :func:`~robustkit.data.to_tensors`, the loaders -
    converts this way, so every dataset robustkit builds yields int64 labels). Float, bool and
    complex labels are always refused. Returns the (possibly converted) labels.
    """
    if not isinstance(y, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {type(y).__name__}")
    if y.dim() != 1:
        raise InputError(f"{name} must be 1-D (one class index per image), got shape {tuple(y.shape)}")
    if y.is_floating_point() or y.dtype == torch.bool or y.is_complex():
        raise InputError(f"{name} must hold integer class indices, got dtype {y.dtype}")
    if y.dtype != torch.int64:
        if not convert:
            raise InputError(f"{name} must be int64 (torch.long) class indices, got dtype {y.dtype}; convert with {name}.long()")
        y = y.long()
    if n is not None and y.shape[0] != n:
        raise InputError(f"{name} has {y.shape[0]} labels but there are {n} images")
    if y.numel() and int(y.min()) < 0:
        raise InputError(f"{name} has negative class index {int(y.min())}")
    if num_classes is not None and y.numel() and int(y.max()) >= num_classes:
        raise InputError(f"{name} has class index {int(y.max())} but the model has {num_classes} classes")
    return y


def check_num_classes(model_classes: int, data_classes: int, *, model: str = "the model", data: str = "the data") -> int:
    """Raise :class:`InputError` unless a model's output count equals the data's class count.

    ``model_classes`` is the number of logits the model outputs (e.g. ``model(x[:1]).shape[1]``
    or a checkpoint's recorded ``num_classes``); ``data_classes`` is the data set's declared
    ``num_classes``. A 3-class checkpoint on 10-class data would otherwise report an accuracy
    and then crash (or score labels it can never predict as errors). Returns the count.
    """
    for value, what in ((model_classes, "model_classes"), (data_classes, "data_classes")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{what} must be an integer >= 1, got {value!r}")
    if model_classes != data_classes:
        raise InputError(
            f"{model} outputs {model_classes} classes but {data} has {data_classes} classes; "
            "use a model (checkpoint) trained on this data set's classes"
        )
    return model_classes


def check_target_class(target: int, num_classes: int, name: str = "target") -> int:
    """Raise :class:`InputError` unless ``0 <= target < num_classes`` (a backdoor's attacker label)."""
    if isinstance(target, bool) or not isinstance(target, int) or target < 0:
        raise InputError(f"{name} must be a class index >= 0, got {target!r}")
    if target >= num_classes:
        raise InputError(f"{name} {target} is not a class of a data set with {num_classes} classes (0..{num_classes - 1})")
    return target


def check_same_device(*tensors: torch.Tensor, names: tuple[str, ...] | None = None) -> None:
    """Raise if the tensors do not all live on the same device."""
    devices = [t.device for t in tensors]
    if len(set(devices)) > 1:
        labels = names or tuple(f"arg{i}" for i in range(len(tensors)))
        desc = ", ".join(f"{n} on {d}" for n, d in zip(labels, devices))
        raise InputError(f"tensors must be on one device, got {desc}")


def check_positive(value: float, name: str, *, allow_zero: bool = False) -> float:
    """Check a scalar hyper-parameter is a finite positive (or non-negative) number."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise InputError(f"{name} must be finite and {bound}, got {value!r}")
    return v


def check_int(value: object, name: str, *, minimum: int | None = None, maximum: int | None = None,
              error: type[Exception] = InputError) -> int:
    """An integer (not a bool) within ``[minimum, maximum]``; ``error`` is the layer's error type
    (:class:`InputError` for library calls, :class:`~robustkit.errors.ConfigError` for configs)."""
    bounds = f" >= {minimum}" if maximum is None and minimum is not None else (
        f" in [{minimum}, {maximum}]" if minimum is not None else (f" <= {maximum}" if maximum is not None else ""))
    if isinstance(value, bool) or not isinstance(value, int):
        raise error(f"{name} must be an integer{bounds}, got {value!r}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise error(f"{name} must be an integer{bounds}, got {value!r}")
    return value


def check_range(value: object, name: str, low: float, high: float, *, low_open: bool = False,
                high_open: bool = False, error: type[Exception] = InputError) -> float:
    """A finite number in the interval ``[low, high]`` (ends open when asked)."""
    lb, hb = ("(" if low_open else "["), (")" if high_open else "]")
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise error(f"{name} must be a number in {lb}{low}, {high}{hb}, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(v) or v < low or v > high or (low_open and v == low) or (
            high_open and v == high):
        raise error(f"{name} must be a number in {lb}{low}, {high}{hb}, got {value!r}")
    return v


def check_choice(value: object, name: str, choices: "tuple | list", error: type[Exception] = InputError) -> object:
    """One of ``choices``; the error lists them."""
    if value not in choices:
        raise error(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value
