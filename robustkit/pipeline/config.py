"""Pipeline configs: load (YAML file or dict), apply ``--set`` overrides, import plug-ins, validate once.

A config names a data set, a model and a list of steps::

    name: demo
    seed: 0
    device: auto            # auto | cpu | cuda | cuda:1
    output_dir: runs/demo
    data:  {name: digits, size: 32}
    model: {name: small_cnn}
    steps:
      - train: {epochs: 8}
      - evaluate:
          defenses: [{label: undefended}, {label: noise+bilateral, preprocessors: [noise_bilateral]}]
          attacks: [{name: pgd, eps: 8/255}]

Every component and step is looked up in a registry (``robustkit list`` shows them).
:func:`validate_config` checks the whole config before anything runs and names the bad
key (``steps[1].evaluate.attacks[0].eps``) and why.
"""

from __future__ import annotations

import copy
import difflib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import yaml

from ..errors import ConfigError, DataNotFoundError
from ..models.checkpoints import check_model_spec
from ..registry import DATASETS, STEPS

TOP_LEVEL_KEYS: dict[str, str] = {
    "name": "run name, used as the report title",
    "description": "free text copied into the report",
    "seed": "integer seed for data splits, initialization, noise and attacks (default 0)",
    "device": "auto (CUDA when present), cpu, cuda or cuda:N",
    "output_dir": "folder for report.json, report.md, plots and checkpoints",
    "data": "dataset spec: {name: digits|cifar10|image_folder|npz, ...}",
    "model": "model spec: {name: small_cnn|preact_resnet18|small_vit|..., ...}",
    "steps": "list of steps, each {step_name: {params}} run in order",
    "imports": "plug-in modules to import first (dotted names or .py files) so their registered names can be used",
}


def import_plugins(modules: Any, path: str = "imports") -> list[str]:
    """Import plug-in modules (``my_pkg.my_module`` or a ``.py`` file) whose decorators register
    models, preprocessors, attacks, triggers, filters, repairs or steps. Returns the module names.
    """
    if modules is None:
        return []
    if isinstance(modules, str):
        modules = [modules]
    if not isinstance(modules, (list, tuple)):
        raise ConfigError(f"must be a list of module names, got {modules!r}", path)
    names = []
    for i, mod in enumerate(modules):
        where = f"{path}[{i}]"
        if not isinstance(mod, str) or not mod.strip():
            raise ConfigError(f"expected a module name such as my_pkg.plugins or a .py file, got {mod!r}", where)
        try:
            if mod.endswith(".py"):
                file = Path(mod).resolve()
                if not file.is_file():
                    raise ConfigError(f"plug-in file not found: {file}", where)
                name = f"robustkit_plugin_{file.stem}"
                if name not in sys.modules:
                    spec = importlib.util.spec_from_file_location(name, file)
                    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
                    sys.modules[name] = module
                    try:
                        spec.loader.exec_module(module)  # type: ignore[union-attr]
                    except BaseException:
                        del sys.modules[name]
                        raise
                names.append(name)
            else:
                importlib.import_module(mod)
                names.append(mod)
        except ConfigError:
            raise
        except ImportError as exc:
            raise ConfigError(f"cannot import plug-in module {mod!r}: {exc} (is it installed or on PYTHONPATH?)", where) from None
        except Exception as exc:  # an error inside the user's module: say where it came from
            raise ConfigError(f"plug-in module {mod!r} failed while importing: {type(exc).__name__}: {exc}", where) from exc
    return names


def load_config(source: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """Read a YAML file (or copy a mapping) and validate it."""
    if isinstance(source, Mapping):
        cfg = copy.deepcopy(dict(source))
    else:
        path = Path(source)
        if not path.is_file():
            raise DataNotFoundError(f"config file not found: {path}")
        try:
            cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
        if not isinstance(cfg, dict):
            raise ConfigError(f"{path} must hold a mapping at the top level, got {type(cfg).__name__}")
    return validate_config(cfg)


def apply_overrides(cfg: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key.sub.0.leaf=value`` overrides (values parsed as YAML) to a config copy."""
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"value {raw!r} is not valid YAML ({str(exc).splitlines()[0]}); quote strings "
                              "that contain ':' or braces", key.strip()) from None
        parts = key.strip().split(".")
        node: Any = cfg
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            where = ".".join(parts[: i + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"no list index {part!r} (list has {len(node)} items)", where)
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            else:
                raise ConfigError(f"cannot descend into {type(node).__name__}", where)
    return cfg


def _step_items(steps: Any) -> list[tuple[str, dict[str, Any], str]]:
    if not isinstance(steps, list):
        raise ConfigError(f"must be a list of steps, got {type(steps).__name__}", "steps")
    out = []
    for i, item in enumerate(steps):
        path = f"steps[{i}]"
        if isinstance(item, str):
            name, params = item, {}
        elif isinstance(item, Mapping) and len(item) == 1:
            name, params = next(iter(item.items()))
            params = {} if params is None else params
            if not isinstance(params, Mapping):
                raise ConfigError(f"parameters of step {name!r} must be a mapping, got {params!r}", path)
        else:
            raise ConfigError("each step must be a name or a one-key mapping {step_name: {params}}", path)
        out.append((name, dict(params), f"{path}.{name}"))
    return out


def validate_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Check keys, names and parameter types of a whole config; return a normalized copy."""
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"config must be a mapping, got {type(cfg).__name__}")
    cfg = copy.deepcopy(dict(cfg))
    for key in cfg:
        if key not in TOP_LEVEL_KEYS:
            close = difflib.get_close_matches(str(key), TOP_LEVEL_KEYS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown top-level key.{hint} Accepted: {', '.join(TOP_LEVEL_KEYS)}", str(key))
    if "imports" in cfg:  # first, so that the plug-ins' registered names validate below
        import_plugins(cfg["imports"], "imports")
        if isinstance(cfg["imports"], str):
            cfg["imports"] = [cfg["imports"]]
    cfg.setdefault("name", "robustkit run")
    cfg.setdefault("seed", 0)
    cfg.setdefault("device", "auto")
    if not isinstance(cfg["seed"], int) or isinstance(cfg["seed"], bool):
        raise ConfigError(f"expected an integer, got {cfg['seed']!r}", "seed")
    if not isinstance(cfg["device"], str):
        raise ConfigError(f"expected a string such as 'auto' or 'cpu', got {cfg['device']!r}", "device")
    if "data" in cfg:
        name, params = DATASETS.split_spec(cfg["data"], "data")
        cfg["data"] = {"name": name, **DATASETS.check_kwargs(name, params, "data")}
    if "model" in cfg:  # architecture kwargs, plus checkpoint / strict (the file must exist)
        cfg["model"] = check_model_spec(cfg["model"], "model")
    steps = []
    for name, params, path in _step_items(cfg.get("steps", [])):
        fn = STEPS.get(name, path.rsplit(".", 1)[0])
        params = STEPS.check_kwargs(name, params, path)
        validator: Callable[..., None] | None = getattr(fn, "validate", None)
        if validator is not None:
            validator(params, path)
        steps.append({name: params})
    cfg["steps"] = steps
    return cfg
