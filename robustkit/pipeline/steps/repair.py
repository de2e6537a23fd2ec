"""``repair``: repair the run's (backdoored) model and measure it before and after."""

from __future__ import annotations

from typing import Any

from ...eval.plots import repair_curves
from ...errors import ConfigError
from ...registry import BACKDOORS, REPAIRS, STEPS
from ...repair.measure import repair_and_measure
from ..context import Context


@STEPS.register("repair")
def repair(ctx: Context, /, defense: Any = "ft_sam", attack: Any = None) -> None:
    """Repair the run's (backdoored) model with a ``defense`` (``finetune``, ``ft_sam``, ``skip_suppression``).

    The defense gets the clean training split (before any ``poison`` step) and uses its own
    ``clean_ratio`` of it. When a trigger is known (a ``poison`` step, or ``attack``; used only
    to *measure*, never given to the defense) the report holds ACC / ASR / RA before and after,
    the DER, and ``repair.png`` with ACC and ASR over the repair epochs. The repaired model
    replaces the run's model (add a ``save_model`` step to keep it).
    """
    model, data = ctx.require_model("repair"), ctx.require_data("repair")
    clean = ctx.clean_train if ctx.clean_train is not None else data.train
    if clean is data.train and hasattr(data.train, "poisoned_indices"):
        raise ConfigError("the training split is poisoned and no clean copy is known; run 'poison' in this config", "repair")
    atk = BACKDOORS.build(attack, "repair.attack") if attack is not None else ctx.backdoor
    rep = REPAIRS.build(defense, "repair.defense")
    ctx.log(f"  repairing with {rep!r}")
    out = repair_and_measure(model, rep, clean, data.test, atk, data.num_classes, progress=ctx.show_progress)
    ctx.model = out.result.model
    ctx.report.add_table(f"Repair history ({out.name})", [dict(h) for h in out.result.history])
    if out.before is not None and out.after is not None:
        b, a = out.before, out.after
        ctx.report.add_table("Repair", out.table(), note="DER = [max(0, dASR) - max(0, dACC) + 1] / 2 (BackdoorBench).")
        ctx.report.metrics.update(acc_before=b.acc, asr_before=b.asr, ra_before=b.ra, acc=a.acc, asr=a.asr, ra=a.ra,
                                  der=out.der)
        ctx.log(f"  ACC {b.acc:.3f} -> {a.acc:.3f}  ASR {b.asr:.3f} -> {a.asr:.3f}  DER {out.der:.3f}")
    else:
        ctx.report.notes.append("repair: no trigger known, so ASR / RA / DER were not measured")
    ctx.report.metrics["collapsed"] = out.result.collapsed
    for line in out.warnings:
        ctx.report.notes.append(line)
        ctx.log(f"  {line}")
    details = out.result.details
    if details.summary():
        ctx.report.add_table(f"Repair details ({out.name})", [details.summary()])
    if ctx.is_main:
        if any("acc" in h for h in out.result.history):
            ctx.report.figures.append(repair_curves({out.name: out.result.history}, ctx.out_path("repair.png")).name)
        ctx.report.figures.extend(details.figures(ctx.out_dir))


def _validate(params: dict[str, Any], path: str) -> None:
    REPAIRS.build(params.get("defense", "ft_sam"), f"{path}.defense")
    if params.get("attack") is not None:
        BACKDOORS.build(params["attack"], f"{path}.attack")


repair.validate = _validate  # type: ignore[attr-defined]
