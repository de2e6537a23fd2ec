"""``train``: train the run's model - plainly, or adversarially (PGD-AT / TRADES) with the
training-time defense in the loop; after ``poison``: with per-epoch ASR / RA."""

from __future__ import annotations

from typing import Any

import torch

from ...data.augment import check_augment, check_padding
from ...errors import ConfigError, InputError
from ...eval.plots import training_curves
from ...models.checkpoints import load_weights
from ...preprocessing import build_preprocessor
from ...registry import STEPS
from ...training import (
    RobustAccuracy,
    adversarial_step,
    check_adversarial,
    check_monitor,
)
from ...training import train as train_model
from ..context import Context


def _preprocess(specs: list[Any] | None, path: str) -> torch.nn.Sequential:
    if specs is not None and not isinstance(specs, (list, tuple)):
        raise ConfigError(f"expected a list of preprocessors, e.g. [noise_bilateral], got {specs!r}", path)
    return torch.nn.Sequential(*[build_preprocessor(s, f"{path}[{i}]") for i, s in enumerate(specs or [])])


def _warm_start(spec: Any, path: str) -> dict[str, Any] | None:
    if spec is None:
        return None
    if isinstance(spec, str):
        spec = {"checkpoint": spec}
    if not isinstance(spec, dict) or "checkpoint" not in spec or set(spec) - {"checkpoint", "strict"}:
        raise ConfigError(f"expected a weights path or {{checkpoint: PATH, strict: true}}, got {spec!r}", path)
    if not isinstance(spec["checkpoint"], str) or not spec["checkpoint"].strip():
        raise ConfigError(f"expected the path of a weights file, got {spec['checkpoint']!r}", f"{path}.checkpoint")
    strict = spec.get("strict", True)
    if not isinstance(strict, bool):
        raise ConfigError(f"expected true or false, got {strict!r}", f"{path}.strict")
    return {"checkpoint": spec["checkpoint"], "strict": strict}


@STEPS.register("train")
def train(ctx: Context, /, epochs: int = 10, lr: float = 0.05, batch_size: int = 64, optimizer: str = "sgd",
          momentum: float = 0.9, weight_decay: float = 5e-4, schedule: str = "cosine", label_smoothing: float = 0.0,
          warmup_epochs: float = 0.0, preprocessors: list | None = None, checkpoint_every: int = 0,
          adversarial: dict | str | None = None, monitor: dict | bool | None = None,
          warm_start: dict | str | None = None, augment: str | None = None,
          crop_padding: int | None = None) -> None:
    """Train the run's model on the training split (``preprocessors``: train-time defense).

    ``adversarial: {method: pgd | trades, eps: 8/255, steps: 10, alpha, beta: 6, norm, eot_samples,
    attack_mode, random_start}`` trains adversarially (PGD-AT, Madry et al.; TRADES, Zhang et al.)
    with ``preprocessors`` in the loop: the attack and the loss see ``model(preprocess(x))`` with
    gradients through the preprocessor, in its train-time schedule (a bilateral filter's
    ``train_iterations``); a randomized preprocessor gets an EOT attack. Without
    ``adversarial`` the preprocessors are applied without gradient (plain training on
    preprocessed images). ``monitor`` (default: on when adversarial) records clean and PGD
    accuracy on a fixed test subset before training and after every epoch (``clean_acc``,
    ``pgd_acc``; ``{n_samples: 256, steps: 10, every: 1, ...}``), with the preprocessors in
    their test-time schedule. ``warm_start: PATH`` (or ``{checkpoint: PATH, strict: true}``) first
    loads weights (a bare state dict or a robustkit checkpoint) into the model, e.g. to
    fine-tune a pretrained model with the defense in front. ``augment: crop`` (or ``crop_flip``, for
    natural images such as CIFAR-10) trains on random crops of the zero-padded images (padding
    ``crop_padding``, default H/8: 4 pixels at 32x32), flipped left-right with ``crop_flip``; the
    preprocessors and the adversarial step see the augmented batch.

    After a ``poison`` step the training split is the poisoned one and every epoch also
    records the backdoor's ASR and RA on the test split. ``checkpoint_every`` > 0 writes
    ``checkpoints/epoch_XXX.pt`` every that many epochs (and at the end) plus ``last.pt``.
    Under torchrun every process trains its slice of each global batch (DistributedDataParallel).
    """
    model, data = ctx.require_model("train"), ctx.require_data("train")
    adv = check_adversarial(adversarial, "train.adversarial")
    mon = check_monitor(monitor, adv, "train.monitor")
    warm = _warm_start(warm_start, "train.warm_start")
    pre = _preprocess(preprocessors, "train.preprocessors").to(ctx.device)
    _augment(augment, crop_padding, "train")
    pre_or_none = pre if len(pre) else None
    if warm is not None:
        load_weights(model, warm["checkpoint"], strict=warm["strict"], map_location=ctx.device)
        ctx.log(f"  warm start from {warm['checkpoint']}")
    step, extra = None, {}
    if adv is not None:
        step = adversarial_step(adv, pre_or_none, "train.adversarial", label_smoothing=label_smoothing)
        desc = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in step.describe().items()
                         if k not in ("step", "label_smoothing"))
        ctx.log(f"  adversarial training: {type(step).__name__} ({desc})")
        ctx.report.notes.append(f"adversarial training: {type(step).__name__} ({desc})")
    else:
        extra = {"preprocess": pre_or_none, "label_smoothing": label_smoothing}
    callbacks = []
    if mon is not None:
        callbacks.append(RobustAccuracy(data.test, preprocess=pre_or_none, epochs=epochs, seed=ctx.seed, **mon))
    result = train_model(
        model, data.train, data.test, backdoor=ctx.backdoor, num_classes=data.num_classes,
        checkpoint_dir=ctx.out_path("checkpoints") if checkpoint_every > 0 and ctx.is_main else None,
        checkpoint_every=checkpoint_every, model_name=ctx.config["model"]["name"] if "model" in ctx.config else None,
        epochs=epochs, lr=lr, batch_size=batch_size, optimizer=optimizer, momentum=momentum, weight_decay=weight_decay,
        schedule=schedule, warmup_epochs=warmup_epochs, seed=ctx.seed, progress=ctx.show_progress,
        step=step, callbacks=callbacks, augment=augment, crop_padding=crop_padding, **extra,
    )
    last = result.history[-1]
    ctx.report.add_table("Training", [dict(h) for h in result.history])
    ctx.report.metrics.update(train_accuracy=last["train_acc"], test_accuracy=last["val_acc"])
    msg = f"train acc {last['train_acc']:.3f}, test acc {last['val_acc']:.3f}"
    if "pgd_acc" in last:
        ctx.report.metrics.update(monitor_clean_accuracy=last["clean_acc"], monitor_pgd_accuracy=last["pgd_acc"])
        msg += f", PGD acc {last['pgd_acc']:.3f} (monitor: {callbacks[0].describe()['n_samples']} test images)"
    if "asr" in last:
        ctx.report.metrics.update(asr=last["asr"], ra=last["ra"])
        msg += f", ASR {last['asr']:.3f}"
    if ctx.is_main:
        name = ctx.config["model"]["name"] if "model" in ctx.config else type(model).__name__
        fig = training_curves(result.history, ctx.out_path("training.png"), title=f"Training {name}")
        ctx.report.figures.append(fig.name)
    seconds = sum(h.get("seconds", 0.0) for h in result.history)
    ctx.log(f"  trained {epochs} epochs in {seconds:.1f} s: {msg}")


def _augment(augment: Any, crop_padding: Any, path: str) -> None:
    """The augmentation name and padding, checked (a :class:`ConfigError` naming the key)."""
    for key, check, value in (("augment", check_augment, augment), ("crop_padding", check_padding, crop_padding)):
        try:
            check(value)
        except InputError as e:
            raise ConfigError(str(e), f"{path}.{key}") from None


def _validate(params: dict[str, Any], path: str) -> None:
    """Config-check time: preprocessors, the adversarial and monitor settings, the warm-start file."""
    _preprocess(params.get("preprocessors"), f"{path}.preprocessors")
    _augment(params.get("augment"), params.get("crop_padding"), path)
    adv = check_adversarial(params.get("adversarial"), f"{path}.adversarial")
    check_monitor(params.get("monitor"), adv, f"{path}.monitor")
    warm = _warm_start(params.get("warm_start"), f"{path}.warm_start")
    if warm is not None:
        from pathlib import Path

        if not Path(warm["checkpoint"]).expanduser().is_file():
            raise ConfigError(f"checkpoint not found: {Path(warm['checkpoint']).expanduser().resolve()}",
                              f"{path}.warm_start.checkpoint")


train.validate = _validate  # type: ignore[attr-defined]
