"""``poison`` (implant a backdoor in the training split) and ``backdoor_eval`` (ACC / ASR / RA)."""

from __future__ import annotations

from typing import Any

from ...backdoor.metrics import backdoor_metrics
from ...errors import ConfigError
from ...registry import BACKDOORS, STEPS
from ...validation import check_range
from ..context import Context


@STEPS.register("poison")
def poison(ctx: Context, /, attack: Any = "badnets", rate: float = 0.1, seed: int | None = None,
           save: str | None = None) -> None:
    """Implant a backdoor in the training split (``attack``: a backdoor spec, e.g. ``{name: badnets}``).

    The poisoned indices are recorded; ``save`` writes the poisoned set (``.npz`` or a folder)
    with its manifest, relative to the output folder.
    """
    data = ctx.require_data("poison")
    atk = BACKDOORS.build(attack, "poison.attack")
    poisoned = atk.poison(data.train, rate=rate, seed=ctx.seed if seed is None else seed, num_classes=data.num_classes)
    ctx.clean_train = data.train if ctx.clean_train is None else ctx.clean_train
    ctx.data, ctx.backdoor = data.with_train(poisoned), atk
    name = BACKDOORS.split_spec(attack)[0]
    row = {"attack": name, "rate": rate, "poisoned": len(poisoned.poisoned_indices),
           "noise_samples": len(poisoned.noise_indices), "train_size": len(poisoned), "target": atk.target}
    if save:
        target = ctx.out_path(save)
        if ctx.is_main:
            poisoned.save(target)
        row["saved_to"] = str(target)
    ctx.report.add_table("Poisoning", [row])
    ctx.log(f"  poisoned {row['poisoned']} of {row['train_size']} training images with {name} (target {atk.target})")


def _validate_poison(params: dict[str, Any], path: str) -> None:
    BACKDOORS.build(params.get("attack", "badnets"), f"{path}.attack")
    check_range(params.get("rate", 0.1), f"{path}.rate (the poisoned fraction)", 0.0, 1.0, error=ConfigError)


poison.validate = _validate_poison  # type: ignore[attr-defined]


@STEPS.register("backdoor_eval")
def backdoor_eval(ctx: Context, /, attack: Any = None) -> None:
    """ACC, ASR and RA of the model on the test split (trigger from the ``poison`` step, or ``attack``)."""
    model, data = ctx.require_model("backdoor_eval"), ctx.require_data("backdoor_eval")
    atk = BACKDOORS.build(attack, "backdoor_eval.attack") if attack is not None else ctx.backdoor
    if atk is None:
        raise ConfigError("needs a trigger: run a 'poison' step first or give 'attack'", "backdoor_eval")
    m = backdoor_metrics(model, atk, data.test, data.num_classes)
    ctx.report.add_table("Backdoor", [{"attack": type(atk).__name__, **m.to_dict()}],
                         note="ACC on clean test images; ASR and RA on triggered test images whose label is not the target.")
    ctx.report.metrics.update(acc=m.acc, asr=m.asr, ra=m.ra)
    ctx.log(f"  ACC {m.acc:.3f}  ASR {m.asr:.3f}  RA {m.ra:.3f}")
