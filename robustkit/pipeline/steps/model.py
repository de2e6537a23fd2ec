"""``reset_model``, ``save_model``, ``load_model``: the run's model and its checkpoints."""

from __future__ import annotations

import torch

from ...errors import ConfigError
from ...models.checkpoints import load_checkpoint, save_checkpoint, split_model_spec
from ...registry import STEPS
from ..context import Context
from ..runner import build_model


@STEPS.register("reset_model")
def reset_model(ctx: Context, /, seed: int | None = None) -> None:
    """Replace the run's model by a freshly built one from the config's ``model`` spec (e.g. to retrain after
    ``filter``); with ``model.checkpoint`` that means the checkpoint's weights again, else a new initialization."""
    if "model" not in ctx.config:
        raise ConfigError("needs a top-level 'model' to rebuild", "reset_model")
    torch.manual_seed(ctx.seed if seed is None else seed)
    ctx.model = build_model(ctx.config["model"], ctx.data).to(ctx.device)
    ctx.log("  model re-initialized")


@STEPS.register("save_model")
def save_model(ctx: Context, /, path: str = "model.pt") -> None:
    """Save the run's model (relative paths are inside the output folder), atomically."""
    model = ctx.require_model("save_model")
    target = ctx.out_path(path)
    name, kwargs = None, {}
    if "model" in ctx.config:  # the architecture's kwargs only: checkpoint / strict are how it was loaded
        name, kwargs, _ = split_model_spec(ctx.config["model"])
    if ctx.is_main:
        save_checkpoint(model, target, name=name, kwargs=getattr(model, "config", None) or kwargs)
    ctx.log(f"  saved model to {target}")


@STEPS.register("load_model")
def load_model(ctx: Context, /, path: str) -> None:
    """Replace the run's model by a robustkit checkpoint."""
    ctx.model = load_checkpoint(path, map_location=ctx.device).to(ctx.device)
    ctx.log(f"  loaded model from {path}")
