"""Config (YAML file or dict) -> built components -> steps -> :class:`Report`.

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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import yaml
from torch import nn

from .errors import ConfigError, DataNotFoundError
from .eval.report import Report
from .registry import DATASETS, MODELS, STEPS
from .utils import resolve_device, seed_everything

TOP_LEVEL_KEYS: dict[str, str] = {
    "name": "run name, used as the report title",
    "description": "free text copied into the report",
    "seed": "integer seed for data splits, initialization, noise and attacks (default 0)",
    "device": "auto (CUDA when present), cpu, cuda or cuda:N",
    "output_dir": "folder for report.json, report.md, plots and checkpoints",
    "data": "dataset spec: {name: digits|cifar10|image_folder|npz, ...}",
    "model": "model spec: {name: small_cnn|preact_resnet18|small_vit|..., ...}",
    "steps": "list of steps, each {step_name: {params}} run in order",
}


@dataclass
class Context:
    """State shared by the steps of one run."""

    config: dict[str, Any]
    device: torch.device
    seed: int
    out_dir: Path
    report: Report
    progress: bool = True
    data: Any = None
    model: nn.Module | None = None
    artifacts: dict[str, Any] = field(default_factory=dict)
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Only rank 0 writes files and prints (all ranks compute)."""
        return self.rank == 0

    @property
    def shard(self) -> tuple[int, int] | None:
        return (self.rank, self.world_size) if self.world_size > 1 else None

    def log(self, msg: str) -> None:
        if self.is_main:
            print(msg, flush=True)

    def require_model(self, step: str) -> nn.Module:
        if self.model is None:
            raise ConfigError(f"step {step!r} needs a model: add a 'model' section or a load_model step before it", "steps")
        return self.model

    def require_data(self, step: str) -> Any:
        if self.data is None:
            raise ConfigError(f"step {step!r} needs data: add a 'data' section", "data")
        return self.data


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
        value = yaml.safe_load(raw)
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
            import difflib

            close = difflib.get_close_matches(str(key), TOP_LEVEL_KEYS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown top-level key.{hint} Accepted: {', '.join(TOP_LEVEL_KEYS)}", str(key))
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
    if "model" in cfg:
        name, params = MODELS.split_spec(cfg["model"], "model")
        cfg["model"] = {"name": name, **MODELS.check_kwargs(name, params, "model")}
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


def model_kwargs_from_data(name: str, params: dict[str, Any], data: Any) -> dict[str, Any]:
    """Fill ``in_channels`` / ``num_classes`` / ``image_size`` from the data set when the model takes them."""
    accepted = MODELS.parameters(name)
    derived = {}
    if data is not None:
        derived = {"in_channels": data.channels, "num_classes": data.num_classes, "image_size": data.image_size[0]}
    return {k: v for k, v in derived.items() if k in accepted and k not in params}


def build_model(spec: Mapping[str, Any], data: Any = None, path: str = "model") -> nn.Module:
    name, params = MODELS.split_spec(spec, path)
    extra = model_kwargs_from_data(name, params, data)
    return MODELS.build({"name": name, **params}, path, **extra)


def run(
    config: str | Path | Mapping[str, Any],
    out_dir: str | Path | None = None,
    overrides: Sequence[str] = (),
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> Report:
    """Run a pipeline config end to end and write its report; return the :class:`Report`."""
    raw = load_config(config) if not isinstance(config, Mapping) else dict(config)
    cfg = validate_config(apply_overrides(raw, overrides))
    out = Path(out_dir or cfg.get("output_dir") or Path("runs") / str(cfg["name"]).replace(" ", "_"))
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg["seed"])
    device = resolve_device(cfg["device"])
    report = Report(name=str(cfg["name"]), config=cfg)
    if cfg.get("description"):
        report.notes.append(str(cfg["description"]))
    rank, world = distributed_rank()
    ctx = Context(config=cfg, device=device, seed=cfg["seed"], out_dir=out, report=report, progress=progress,
                  rank=rank, world_size=world)
    say = (log or (lambda _msg: None)) if rank == 0 else (lambda _msg: None)
    if world > 1:
        say(f"distributed: {world} processes; evaluation batches are sharded across them")
    t0 = time.perf_counter()
    if "data" in cfg:
        ctx.data = DATASETS.build(cfg["data"], "data")
        say(f"data: {cfg['data']['name']} - {len(ctx.data.train)} train / {len(ctx.data.test)} test images, "
            f"{ctx.data.channels}x{ctx.data.image_size[0]}x{ctx.data.image_size[1]}, {ctx.data.num_classes} classes")
    if "model" in cfg:
        ctx.model = build_model(cfg["model"], ctx.data).to(device)
        n_params = sum(p.numel() for p in ctx.model.parameters())
        say(f"model: {cfg['model']['name']} ({n_params / 1e6:.2f} M parameters) on {device}")
    for i, step in enumerate(cfg["steps"]):
        (name, params), = step.items()
        say(f"step {i + 1}/{len(cfg['steps'])}: {name}")
        STEPS.get(name)(ctx, **params)
    report.seconds = time.perf_counter() - t0
    if rank == 0:
        paths = report.write(out)
        say(f"report written to {paths['markdown']} and {paths['json']}")
    return report


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) of an initialized ``torch.distributed`` group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
