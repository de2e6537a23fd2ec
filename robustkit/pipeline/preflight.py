"""What ``--dry-run`` checks beyond the config's shape: everything knowable before running.

:func:`validate_config` already checks names, keys, types and nested specs. :func:`preflight`
then builds what is cheap to build: the device, the data set (files found, class count), the
model (and its checkpoint) against that class count, every ``poison`` target against it, and
every ``load_model`` checkpoint. It trains and attacks nothing.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError, InputError
from ..inference import output_classes
from ..models.checkpoints import load_checkpoint
from ..registry import BACKDOORS, DATASETS
from ..utils import resolve_device
from ..validation import check_num_classes, check_target_class
from .runner import build_model


def preflight(cfg: dict[str, Any]) -> list[str]:
    """Check a validated config against the machine and its data; return what was checked."""
    done = [f"device {resolve_device(cfg['device'])} is available"]
    data = DATASETS.build(cfg["data"], "data") if "data" in cfg else None
    if data is not None:
        done.append(f"data {cfg['data']['name']}: {len(data.train)} train / {len(data.test)} test, "
                     f"{data.num_classes} classes")
    models = []
    if "model" in cfg:
        models.append(("model", build_model(cfg["model"], data)))
        done.append(f"model {cfg['model']['name']} builds")
    for i, step in enumerate(cfg.get("steps", [])):
        (name, params), = step.items()
        path = f"steps[{i}].{name}"
        if name == "poison" and data is not None:
            atk = BACKDOORS.build(params.get("attack", "badnets"), f"{path}.attack")
            try:
                check_target_class(atk.target, data.num_classes)
            except InputError as exc:
                raise ConfigError(str(exc), f"{path}.attack.target") from None
            done.append(f"{path}: target {atk.target} is one of the {data.num_classes} classes")
        if name == "load_model":
            try:
                models.append((f"{path}.path", load_checkpoint(params["path"])))
            except InputError as exc:
                raise ConfigError(str(exc), f"{path}.path") from None
            done.append(f"{path}: checkpoint {params['path']} loads")
    if data is not None and len(data.test):
        x, _ = data.test[0]
        for where, model in models:
            try:
                check_num_classes(output_classes(model, x.unsqueeze(0)), data.num_classes, model=where,
                                  data=f"data {cfg['data']['name']!r}")
            except InputError as exc:
                raise ConfigError(str(exc), where) from None
        if models:
            done.append(f"every model outputs {data.num_classes} classes")
    return done
