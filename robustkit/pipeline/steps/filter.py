"""``filter``: flag suspected poisoned training samples and keep the rest."""

from __future__ import annotations

from typing import Any

from ...filtering.run import run_filter
from ...registry import FILTERS, STEPS
from ..context import Context


@STEPS.register("filter")
def filter_data(ctx: Context, /, filter: Any = "attention_entropy", out: str = "filtered") -> None:  # noqa: A002
    """Flag suspected poisoned training samples with a ``FILTERS`` defense and keep the rest.

    The run's model (trained on the suspect data) scores the training split. ``out`` (inside
    the output folder) receives ``kept.npz``, ``flagged.json``, ``scores.png`` and a report; the
    training split is replaced by the kept samples, so a following ``reset_model`` + ``train``
    retrains on them. With ground truth (after ``poison``) TPR / FPR / precision / F1 / AUROC go
    to the run's report.
    """
    model, data = ctx.require_model("filter"), ctx.require_data("filter")
    name = FILTERS.split_spec(filter)[0]
    target = ctx.out_path(out)
    result, metrics = run_filter(model, data.train, FILTERS.build(filter, "filter.filter"), target, name=name)
    kept = result.clean_subset(data.train)
    row = {"filter": name, "samples": len(data.train), "flagged": int(result.flagged.sum()), "kept": len(kept)}
    row.update({k: metrics[k] for k in ("poisoned", "tpr", "fpr", "precision", "f1", "auroc") if k in metrics})
    ctx.report.add_table("Filtering", [row], note="TPR/FPR: share of poisoned / clean training samples flagged.")
    ctx.report.metrics.update({f"filter_{k}": metrics[k] for k in ("tpr", "fpr", "f1", "auroc") if k in metrics})
    ctx.report.figures.append(f"{target.name}/scores.png")
    ctx.data = data.with_train(kept)
    msg = f"  {name}: flagged {row['flagged']} of {row['samples']} training samples"
    if metrics:
        msg += f" (TPR {metrics['tpr']:.3f}, FPR {metrics['fpr']:.3f}, AUROC {metrics['auroc']:.3f})"
    ctx.log(msg)


filter_data.validate = lambda params, path: FILTERS.build(  # type: ignore[attr-defined]
    params.get("filter", "attention_entropy"), f"{path}.filter")
