"""Checkpoints (atomic save, strict load) and torchvision architectures with normalization inside.

A robustkit checkpoint is a plain ``torch.save`` dict::

    {"name": "small_cnn", "kwargs": {...}, "state_dict": {...}, "meta": {...}, "robustkit_version": "0.1.0"}

``name`` and ``kwargs`` rebuild the architecture from the model registry, so loading needs
no code from the run that trained it; a model repaired by skip-connection suppression
also stores ``skip_scaling`` (``{skip name: gamma}``), re-applied as hooks on load; the file is read with ``weights_only=True`` (no
arbitrary unpickling), which is why ``kwargs`` and ``meta`` must be plain data.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import ConfigError, DataNotFoundError, InputError
from ..io import atomic_torch_save
from ..registry import MODELS
from .introspect import scale_skips
from .normalization import Normalize

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CHECKPOINT_KEYS = ("name", "kwargs", "state_dict")



def safe_torch_load(path: Path, map_location: Any = "cpu", what: str = "torch checkpoint") -> Any:
    """``torch.load(weights_only=True)`` with one clear error for an unreadable file.

    torch's own message for a file holding pickled objects advises ``weights_only=False``
    (arbitrary code execution); robustkit never does that, so the error says what to do instead.
    """
    import zipfile

    with open(path, "rb") as fh:
        head = fh.read(2)
    torch_like = zipfile.is_zipfile(path) or head[:1] == b"\x80"  # torch's zip format, or a legacy pickle
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # pickle errors, zip errors, truncated files, disallowed classes
        text = str(exc)
        if torch_like and ("Weights only load failed" in text or "weights_only" in text):
            raise InputError(f"{path} holds Python objects beyond tensors and plain data, which robustkit does not "
                             f"unpickle (it reads files with weights_only=True); save the weights with "
                             f"torch.save(model.state_dict(), path)") from None
        raise InputError(f"{path} is not a readable {what}: the file is corrupt, truncated or of another format "
                         f"({type(exc).__name__})") from None

def _registry_name(model: nn.Module) -> str | None:
    """The name the model's own class (not a parent) or instance was registered under."""
    name = model.__dict__.get("registry_name") or type(model).__dict__.get("registry_name")
    return name if isinstance(name, str) else None


def _plain(value: Any, where: str) -> Any:
    """``value`` as data ``torch.load(weights_only=True)`` can read back (numbers, str, lists, dicts, tensors)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if hasattr(value, "item") and hasattr(value, "dtype") and getattr(value, "ndim", 1) == 0:  # numpy scalar
        return value.item()
    if hasattr(value, "tolist") and hasattr(value, "dtype"):  # numpy array
        return value.tolist()
    raise InputError(
        f"checkpoint {where} must be plain data (numbers, strings, lists, dicts, tensors), got {type(value).__name__}"
    )


def save_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    name: str | None = None,
    kwargs: Mapping[str, Any] | None = None,
    **meta: Any,
) -> Path:
    """Write ``{name, kwargs, state_dict, meta, robustkit_version}`` atomically to ``path``.

    ``name`` (the :data:`~robustkit.registry.MODELS` name) and ``kwargs`` (its constructor
    arguments) default to the model's registered name and its ``config`` attribute, which
    every robustkit model keeps. Extra keyword arguments (epoch, accuracy, ...) are stored
    under ``meta``. Returns the path written.
    """
    import robustkit

    name = name or _registry_name(model)
    if name is None:
        raise InputError(
            f"cannot tell which registered model this is ({type(model).__name__}); pass name= (one of {', '.join(MODELS.names())})"
        )
    if name not in MODELS:
        raise InputError(f"{name!r} is not a registered model; known: {', '.join(MODELS.names())}")
    if kwargs is None:
        kwargs = getattr(model, "config", None) or {}
    if not isinstance(kwargs, Mapping):
        raise InputError(f"kwargs must be a mapping of constructor arguments, got {type(kwargs).__name__}")
    blob = {
        "name": name,
        "kwargs": _plain(dict(kwargs), "kwargs"),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": _plain(meta, "meta"),
        "robustkit_version": robustkit.__version__,
    }
    if getattr(model, "skip_scaling", None):  # skip connections scaled by skip suppression (forward hooks)
        blob["skip_scaling"] = _plain(dict(model.skip_scaling), "skip_scaling")
    return atomic_torch_save(blob, path)


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The raw checkpoint dict, after checking the file exists and has the robustkit keys."""
    p = Path(path)
    if not p.is_file():
        hint = " (it is a folder)" if p.is_dir() else ""
        raise DataNotFoundError(f"checkpoint not found: {p}{hint}")
    blob = safe_torch_load(p, map_location)
    if not isinstance(blob, dict) or not set(CHECKPOINT_KEYS) <= set(blob):
        found = sorted(map(str, blob))[:10] if isinstance(blob, dict) else f"a {type(blob).__name__}"
        hint = ""
        if isinstance(blob, dict) and blob and all(isinstance(v, torch.Tensor) for v in blob.values()):
            hint = " - it looks like a bare state dict: build the model and call model.load_state_dict(...)"
        raise InputError(
            f"{p} is not a robustkit checkpoint (expected keys {', '.join(CHECKPOINT_KEYS)}; found {found}){hint}"
        )
    return blob


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved by :func:`save_checkpoint`; strict state-dict load, eval mode.

    Errors: :class:`~robustkit.errors.DataNotFoundError` for a missing file,
    :class:`~robustkit.errors.InputError` for a file that is not a robustkit checkpoint
    (naming the keys it has) or whose weights do not fit the architecture (listing
    missing / unexpected / mis-shaped parameters).
    """
    p = Path(path)
    blob = read_checkpoint(p, map_location)
    name, kwargs, state = blob["name"], blob["kwargs"], blob["state_dict"]
    if not isinstance(kwargs, dict) or not isinstance(state, dict):
        raise InputError(f"{p} is a corrupt robustkit checkpoint: kwargs and state_dict must be dicts")
    try:
        model = MODELS.build({"name": name, **kwargs}, "checkpoint")
    except ConfigError as exc:
        raise InputError(f"{p}: cannot rebuild model {name!r}: {exc}") from exc
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}" + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}" + (f" (+{len(unexpected) - 5} more)" if len(unexpected) > 5 else ""))
        if shapes:
            parts.append(f"shape mismatch (checkpoint vs model) {shapes[:5]}")
        raise InputError(f"{p} does not match model {name!r} built from its kwargs: {'; '.join(parts)}")
    model.load_state_dict(state, strict=True)
    if blob.get("skip_scaling"):
        scale_skips(model, blob["skip_scaling"])
    if isinstance(map_location, (str, torch.device)):
        model = model.to(map_location)
    return model.eval()


def torchvision_model(
    name: str, num_classes: int | None = None, weights_path: str | None = None, in_channels: int = 3
) -> nn.Module:
    """A torchvision architecture by name (e.g. ``resnet18``) as ``nn.Sequential(Normalize, net)``.

    ImageNet normalization is the first layer, so the model takes [0, 1] images. Weights are
    only read from the local file ``weights_path`` (a state dict of the bare torchvision
    model, optionally under a ``"state_dict"`` / ``"model"`` key or with a ``module.``
    prefix); nothing is ever downloaded. The returned module remembers ``config`` so
    :func:`save_checkpoint` works on it.
    """
    import torchvision

    if in_channels != 3:
        raise ConfigError(
            f"torchvision models take 3-channel images, got in_channels={in_channels}"
            " (load grayscale data with channels=3)", "in_channels"
        )
    try:
        builder = torchvision.models.get_model_builder(name)
    except ValueError:
        known = ", ".join(sorted(torchvision.models.list_models(module=torchvision.models))[:20])
        raise ConfigError(f"unknown torchvision model {name!r}; e.g. {known}, ...", "arch") from None
    kwargs: dict[str, Any] = {"weights": None}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    net = builder(**kwargs)
    if weights_path is not None:
        _load_torchvision_weights(net, Path(weights_path), name)
    model = nn.Sequential(Normalize(IMAGENET_MEAN, IMAGENET_STD), net)
    model.registry_name = "torchvision"  # type: ignore[assignment]
    model.config = {"arch": name, "num_classes": num_classes}  # type: ignore[assignment]
    return model


@MODELS.register("torchvision")
def torchvision_from_config(
    arch: str, num_classes: int | None = None, weights_path: str | None = None, in_channels: int = 3
) -> nn.Module:
    """Registry entry for :func:`torchvision_model`: ``{name: torchvision, arch: resnet18, ...}``.

    The architecture is ``arch`` here because ``name`` is the registry key of every spec.
    """
    return torchvision_model(arch, num_classes=num_classes, weights_path=weights_path, in_channels=in_channels)


def _load_torchvision_weights(net: nn.Module, wp: Path, name: str) -> None:
    if not wp.is_file():
        raise DataNotFoundError(f"weights file not found: {wp} (robustkit never downloads weights)")
    state = safe_torch_load(wp, "cpu", "torch weights file")
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict):
        raise InputError(f"{wp} must hold a state dict, got {type(state).__name__}")
    if state and all(str(k).startswith("module.") for k in state):
        state = {str(k)[len("module."):]: v for k, v in state.items()}
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        msg = " ".join(str(exc).split())
        raise InputError(f"{wp} does not fit torchvision {name!r}: {msg[:500]}") from None



# --------------------------------------------------------------------------- bare state dicts
MODEL_LOAD_KEYS = {
    "checkpoint": "path of the weights: a bare state dict (torch.save(model.state_dict())) or a robustkit checkpoint",
    "strict": "require every parameter to match (default true); false loads what fits and lists the rest",
}


def _unwrap_state(blob: Any, p: Path) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded file: bare, a robustkit checkpoint, or under ``state_dict`` / ``model``."""
    if isinstance(blob, dict) and set(CHECKPOINT_KEYS) <= set(blob) and isinstance(blob.get("state_dict"), dict):
        blob = blob["state_dict"]
    elif isinstance(blob, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(blob.get(key), dict):
                blob = blob[key]
                break
    if not isinstance(blob, dict) or not blob or not all(isinstance(v, torch.Tensor) for v in blob.values()):
        kind = f"a dict with keys {sorted(map(str, blob))[:8]}" if isinstance(blob, dict) else f"a {type(blob).__name__}"
        raise InputError(f"{p} does not hold a state dict (name -> tensor): found {kind}")
    state = {str(k): v for k, v in blob.items()}
    for prefix in ("module.", "_orig_mod."):  # DataParallel / DDP, torch.compile
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _classifier_hint(model: nn.Module, state: Mapping[str, torch.Tensor], shapes: list[str]) -> str:
    """' - the checkpoint has K classes, the model N' when the mismatch is the output layer."""
    from .introspect import get_classifier

    try:
        head = get_classifier(model)
    except Exception:
        return ""
    name = next((n for n, m in model.named_modules() if m is head), None)
    if name is None or not isinstance(head, nn.Linear):
        return ""
    w = state.get(f"{name}.weight")
    if isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[0] != head.out_features:
        return (f" - the checkpoint has {w.shape[0]} classes, the model {head.out_features}: set num_classes: {w.shape[0]} "
                "in the model spec (or use data with that many classes)")
    return ""


def load_weights(model: nn.Module, path: str | os.PathLike, strict: bool = True,
                 map_location: str | torch.device = "cpu") -> dict[str, list[str]]:
    """Load the weights in ``path`` into ``model`` (in place); return ``{missing, unexpected, mismatched}``.

    ``path`` holds a bare state dict (what ``torch.save(model.state_dict(), path)`` writes, e.g.
    pyautoattack's ``model_test.pt``), optionally under a ``state_dict`` / ``model`` key or with a
    ``module.`` prefix, or a robustkit checkpoint (its ``state_dict`` is used; the architecture is
    the one given). The file is read with ``weights_only=True``.

    Errors (:class:`~robustkit.errors.DataNotFoundError` for a missing file,
    :class:`~robustkit.errors.InputError` otherwise) name the missing, unexpected and mis-shaped
    parameters, and say so when the output layer has another number of classes. With
    ``strict=False`` missing and unexpected names are allowed (returned), mis-shaped tensors never.
    """
    p = Path(path)
    if not p.is_file():
        hint = " (it is a folder)" if p.is_dir() else ""
        raise DataNotFoundError(f"checkpoint not found: {p}{hint}")
    blob = safe_torch_load(p, map_location)
    state = _unwrap_state(blob, p)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    arch = type(model).__name__
    if shapes or (strict and (missing or unexpected)):
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}" + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}" + (f" (+{len(unexpected) - 5} more)" if len(unexpected) > 5 else ""))
        if shapes:
            parts.append(f"shape mismatch (checkpoint vs model) {shapes[:5]}" + (f" (+{len(shapes) - 5} more)" if len(shapes) > 5 else ""))
        hint = _classifier_hint(model, state, shapes)
        if not hint and len(missing) == len(expected):
            hint = " - no parameter name matches: is this the right architecture?"
        raise InputError(f"{p} does not fit {arch}: {'; '.join(parts)}{hint}")
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    return {"missing": missing, "unexpected": unexpected, "mismatched": []}


def split_model_spec(spec: Any, path: str = "model") -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``{name, checkpoint?, strict?, **kwargs}`` -> ``(name, kwargs, {checkpoint, strict})`` with the load options checked.

    The architecture's own keyword arguments are left for the registry to check.
    """
    name, params = MODELS.split_spec(spec, path)
    load = {k: params.pop(k) for k in list(params) if k in MODEL_LOAD_KEYS}
    if "strict" in load and "checkpoint" not in load:
        raise ConfigError("strict only applies with a checkpoint", f"{path}.strict")
    if "checkpoint" in load:
        ck = load["checkpoint"]
        if not isinstance(ck, (str, os.PathLike)) or not str(ck).strip():
            raise ConfigError(f"expected the path of a weights file, got {ck!r}", f"{path}.checkpoint")
        load["checkpoint"] = os.fspath(ck)
        strict = load.setdefault("strict", True)
        if not isinstance(strict, bool):
            raise ConfigError(f"expected true or false, got {strict!r}", f"{path}.strict")
    return name, params, load


def check_model_spec(spec: Any, path: str = "model") -> dict[str, Any]:
    """Validate a config's ``model`` spec, load options included; return it normalized.

    The checkpoint file must exist (checked here, before anything runs); whether its weights
    fit is checked when the model is built.
    """
    name, params, load = split_model_spec(spec, path)
    params = MODELS.check_kwargs(name, params, path)
    if "checkpoint" in load and not Path(load["checkpoint"]).expanduser().is_file():
        p = Path(load["checkpoint"]).expanduser()
        raise ConfigError(f"checkpoint not found: {p.resolve()}{' (it is a folder)' if p.is_dir() else ''}",
                          f"{path}.checkpoint")
    return {"name": name, **params, **load}
