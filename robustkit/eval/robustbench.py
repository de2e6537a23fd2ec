"""Results in RobustBench's model-info JSON format (one file per defense), with the protocol recorded."""

from __future__ import annotations

from typing import Any

from ..base import format_eps

PROTOCOL = {
    "robust": "correct on the clean and on the attacked image (RobustBench / AutoAttack convention)",
    "worst_adaptive_acc": "per-example worst case: images surviving every adaptive attack at the largest radius",
    "autoattack_acc": "AutoAttack rows only, with the published budget (not reduced) and adaptive for this defense "
                      "('rand' with EOT for randomized defenses); lowest such row at the largest radius",
    "randomized": "accuracies are means over draws of the defense's randomness; 'all_draws' counts an image only if "
                  "it is robust in every draw; an image AutoAttack itself found broken is never counted robust",
}


def robustbench_entry(label: str, rows: list[dict[str, Any]], config: dict[str, Any], n: int) -> dict[str, Any]:
    """One defense's results in RobustBench's model-info format (accuracies as percent strings).

    ``autoattack_acc``: the lowest AutoAttack row at the largest radius that ran with the
    published budget and was adaptive for this defense (empty otherwise). ``worst_adaptive_acc``:
    the per-example worst case over the adaptive attacks at that radius. ``robustkit`` keeps
    every row with the attack settings and the protocol.
    """
    mine = [{k: v for k, v in r.items() if k != "family"} for r in rows if r["defense"] == label]
    clean = next(r for r in mine if r["attack"] == "clean")
    attacked = [r for r in mine if r["attack"] != "clean"]
    eps = max((r["eps"] for r in attacked), default=None)
    norm = next((r["norm"] for r in attacked), "linf")
    aa = [r for r in attacked if r.get("kind") == "autoattack" and r["eps"] == eps and r["adaptive"] is True
          and not r.get("settings", {}).get("reduced", False)]
    worst = [r for r in attacked if r.get("kind") == "worst_case" and r["eps"] == eps]
    return {
        "link": "", "name": label, "authors": "", "additional_data": False,
        "number_forward_passes": 1, "dataset": config.get("data", {}).get("name", ""),
        "venue": "", "architecture": config.get("model", {}).get("name", ""),
        "eps": None if eps is None else format_eps(eps, norm), "threat_model": {"linf": "Linf", "l2": "L2"}.get(norm, norm),
        "clean_acc": f"{100 * clean['accuracy']:.2f}", "reported": "",
        "autoattack_acc": f"{100 * min(r['accuracy'] for r in aa):.2f}" if aa else "",
        "worst_adaptive_acc": f"{100 * worst[0]['accuracy']:.2f}" if worst else "",
        "footnote": f"Evaluated with robustkit on {n} test images; draws per image: {clean.get('draws', 1)}.",
        "robustkit": {"rows": mine, "protocol": PROTOCOL},
    }


def slug(label: str) -> str:
    """A file-name-safe version of a defense label."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in label)
