"""Run a config: seed, build data and model, run the steps on one :class:`Context`, write the report."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from torch import nn

from ..errors import RobustkitError
from ..eval.report import Report
from ..models.checkpoints import load_weights, split_model_spec
from ..registry import DATASETS, MODELS, STEPS
from ..utils import resolve_device, seed_everything
from .config import apply_overrides, load_config, validate_config
from .context import Context


def model_kwargs_from_data(name: str, params: dict[str, Any], data: Any) -> dict[str, Any]:
    """Fill ``in_channels`` / ``num_classes`` / ``image_size`` from the data set when the model takes them."""
    accepted = MODELS.parameters(name)
    derived = {}
    if data is not None:
        derived = {"in_channels": data.channels, "num_classes": data.num_classes, "image_size": data.image_size[0]}
    return {k: v for k, v in derived.items() if k in accepted and k not in params}


def build_model(spec: Mapping[str, Any] | str, data: Any = None, path: str = "model") -> nn.Module:
    """The model a config's ``model`` spec names, with ``in_channels`` / ``num_classes`` /
    ``image_size`` filled from ``data`` when not given.

    ``checkpoint: PATH`` loads weights into the architecture built (a bare state dict, e.g.
    ``torch.save(model.state_dict())`` from any PyTorch code, or a robustkit checkpoint);
    ``strict`` (default true) requires every parameter to match. Errors name the file and the
    missing / unexpected / mis-shaped parameters (and the class count when the output layer
    differs). The model is returned in eval mode when weights were loaded.
    """
    name, params, load = split_model_spec(spec, path)
    extra = model_kwargs_from_data(name, params, data)
    model = MODELS.build({"name": name, **params}, path, **extra)
    if "checkpoint" in load:
        try:
            load_weights(model, load["checkpoint"], strict=load.get("strict", True))
        except RobustkitError as exc:
            raise type(exc)(f"{path}.checkpoint: {exc}") from None
        model.eval()
    return model


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
        loaded = f", weights from {cfg['model']['checkpoint']}" if cfg["model"].get("checkpoint") else ""
        say(f"model: {cfg['model']['name']} ({n_params / 1e6:.2f} M parameters) on {device}{loaded}")
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
