"""``train``: train the run's model (after ``poison``: with per-epoch ASR / RA)."""

from __future__ import annotations

from typing import Any

import torch

from ...eval.plots import training_curves
from ...preprocessing import build_preprocessor
from ...registry import STEPS
from ...training import train as train_model
from ..context import Context


def _preprocess(specs: list[Any] | None, path: str) -> torch.nn.Sequential:
    return torch.nn.Sequential(*[build_preprocessor(s, f"{path}[{i}]") for i, s in enumerate(specs or [])])


@STEPS.register("train")
def train(ctx: Context, /, epochs: int = 10, lr: float = 0.05, batch_size: int = 64, optimizer: str = "sgd",
          momentum: float = 0.9, weight_decay: float = 5e-4, schedule: str = "cosine", label_smoothing: float = 0.0,
          warmup_epochs: float = 0.0, preprocessors: list | None = None, checkpoint_every: int = 0) -> None:
    """Train the run's model on the training split (``preprocessors``: train-time defense).

    After a ``poison`` step the training split is the poisoned one and every epoch also
    records the backdoor's ASR and RA on the test split. ``checkpoint_every`` > 0 writes
    ``checkpoints/epoch_XXX.pt`` every that many epochs (and at the end) plus ``last.pt``.
    """
    model, data = ctx.require_model("train"), ctx.require_data("train")
    pre = _preprocess(preprocessors, "train.preprocessors").to(ctx.device)
    result = train_model(
        model, data.train, data.test, backdoor=ctx.backdoor,
        checkpoint_dir=ctx.out_path("checkpoints") if checkpoint_every > 0 and ctx.is_main else None,
        checkpoint_every=checkpoint_every, model_name=ctx.config["model"]["name"], epochs=epochs, lr=lr,
        batch_size=batch_size, optimizer=optimizer, momentum=momentum, weight_decay=weight_decay, schedule=schedule,
        label_smoothing=label_smoothing, warmup_epochs=warmup_epochs, preprocess=pre if len(pre) else None,
        seed=ctx.seed, progress=ctx.show_progress,
    )
    last = result.history[-1]
    ctx.report.add_table("Training", [dict(h) for h in result.history])
    ctx.report.metrics.update(train_accuracy=last["train_acc"], test_accuracy=last["val_acc"])
    msg = f"train acc {last['train_acc']:.3f}, test acc {last['val_acc']:.3f}"
    if "asr" in last:
        ctx.report.metrics.update(asr=last["asr"], ra=last["ra"])
        msg += f", ASR {last['asr']:.3f}"
    if ctx.is_main:
        fig = training_curves(result.history, ctx.out_path("training.png"), title=f"Training {ctx.config['model']['name']}")
        ctx.report.figures.append(fig.name)
    ctx.log(f"  trained {epochs} epochs in {sum(h['seconds'] for h in result.history):.1f} s: {msg}")


train.validate = lambda params, path: _preprocess(params.get("preprocessors"), f"{path}.preprocessors")  # type: ignore[attr-defined]
