"""Repair a model and measure it before and after: the flow the ``repair`` step, notebooks and
benchmarks share (ACC / ASR / RA before and after, DER)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from ..backdoor.metrics import BackdoorMetrics, backdoor_metrics, defense_effectiveness_rating
from ..base import BackdoorAttack, ModelRepair, RepairResult
from ..registry import REPAIRS


@dataclass
class RepairOutcome:
    """A repair's result with the backdoor metrics before and after (None when no trigger is known)."""

    name: str
    result: RepairResult
    before: BackdoorMetrics | None = None
    after: BackdoorMetrics | None = None
    der: float | None = None

    def table(self) -> list[dict[str, Any]]:
        """Before / after rows (ACC, ASR, RA, DER, and whether the repair collapsed the model) for a report."""
        if self.before is None or self.after is None:
            return []
        b, a = self.before, self.after
        return [{"model": "before", "acc": b.acc, "asr": b.asr, "ra": b.ra},
                {"model": f"after {self.name}", "acc": a.acc, "asr": a.asr, "ra": a.ra, "der": self.der,
                 "collapsed": self.result.collapsed}]

    @property
    def warnings(self) -> list[str]:
        """Loud report lines: a collapsed repair (held-out clean accuracy fell past its bound)."""
        if not self.result.collapsed:
            return []
        d = self.result.details
        before, after = d.get("holdout_acc_before"), d.get("holdout_acc_after")
        numbers = (f" from {before:.1%} to {after:.1%} on {d.get('holdout_samples')} held-out clean images"
                   if before is not None and after is not None else "")
        return [f"WARNING: {self.name} collapsed the model: clean accuracy fell{numbers}, more than "
                f"max_acc_drop={d.get('max_acc_drop')}; do not use the repaired model"]


def repair_and_measure(
    model: nn.Module,
    defense: ModelRepair | Any,
    clean_data: Dataset,
    test_data: Dataset,
    backdoor: BackdoorAttack | None = None,
    num_classes: int | None = None,
    *,
    progress: bool = True,
) -> RepairOutcome:
    """Repair ``model`` with ``defense`` (a :class:`ModelRepair` or a registered spec) on ``clean_data``.

    ``backdoor`` (the attacker's trigger) is only used to *measure* ACC / ASR / RA on
    ``test_data`` before and after, and the DER; the defense never sees it.
    """
    rep = defense if isinstance(defense, ModelRepair) else REPAIRS.build(defense, "defense")
    name = getattr(type(rep), "registry_name", type(rep).__name__)
    before = backdoor_metrics(model, backdoor, test_data, num_classes) if backdoor is not None else None
    result = rep.repair(model, clean_data, test_data=test_data, backdoor=backdoor, num_classes=num_classes,
                        progress=progress)
    if before is None:
        return RepairOutcome(name, result)
    after = backdoor_metrics(result.model, backdoor, test_data, num_classes)
    return RepairOutcome(name, result, before, after, defense_effectiveness_rating(before, after))
