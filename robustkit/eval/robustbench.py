"""Results in RobustBench's model-info JSON format (one file per defense)."""

from __future__ import annotations

from typing import Any

from ..base import format_eps


def robustbench_entry(label: str, rows: list[dict[str, Any]], config: dict[str, Any], n: int) -> dict[str, Any]:
    """One defense's results in RobustBench's model-info format (accuracies as percent strings).

    ``autoattack_acc`` is the lowest robust accuracy among AutoAttack rows at the largest
    evaluated radius (empty when AutoAttack was not run); ``robustkit`` keeps every row.
    """
    mine = [{k: v for k, v in r.items() if k != "family"} for r in rows if r["defense"] == label]
    clean = next(r["accuracy"] for r in mine if r["attack"] == "clean")
    attacked = [r for r in mine if r["attack"] != "clean"]
    aa = [r for r in attacked if "AutoAttack" in r["attack"] or r["attack"].lower().startswith("autoattack")]
    eps = max((r["eps"] for r in attacked), default=None)
    norm = next((r["norm"] for r in attacked), "linf")
    aa_at_eps = [r["accuracy"] for r in aa if r["eps"] == eps]
    worst = min((r["accuracy"] for r in attacked if r["eps"] == eps and r["adaptive"] is not False), default=None)
    return {
        "link": "", "name": label, "authors": "", "additional_data": False,
        "number_forward_passes": 1, "dataset": config.get("data", {}).get("name", ""),
        "venue": "", "architecture": config.get("model", {}).get("name", ""),
        "eps": None if eps is None else format_eps(eps, norm), "threat_model": {"linf": "Linf", "l2": "L2"}.get(norm, norm),
        "clean_acc": f"{100 * clean:.2f}", "reported": "",
        "autoattack_acc": f"{100 * min(aa_at_eps):.2f}" if aa_at_eps else "",
        "worst_adaptive_acc": "" if worst is None else f"{100 * worst:.2f}",
        "footnote": f"Evaluated with robustkit on {n} test images.",
        "robustkit": {"rows": mine},
    }


def slug(label: str) -> str:
    """A file-name-safe version of a defense label."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in label)
