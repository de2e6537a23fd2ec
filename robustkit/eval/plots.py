"""Plots for reports (matplotlib; Agg backend outside notebooks, no display needed)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import matplotlib

if "ipykernel" not in sys.modules:  # inside Jupyter keep the inline backend so plt.show() displays
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .report import save_figure  # noqa: E402


def accuracy_bars(rows: list[dict[str, Any]], path: str | Path, title: str = "Clean and robust accuracy") -> Path:
    """Grouped bars: one group per defense, one bar per condition (clean, each attack).

    ``rows`` have keys ``defense``, ``attack`` and ``accuracy`` (``attack == "clean"``
    for clean accuracy).
    """
    defenses = list(dict.fromkeys(r["defense"] for r in rows))
    conditions = list(dict.fromkeys(r["attack"] for r in rows))
    width = 0.8 / max(1, len(conditions))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(defenses) * max(1, len(conditions)) / 2), 4))
    for j, cond in enumerate(conditions):
        vals = []
        for d in defenses:
            match = [r["accuracy"] for r in rows if r["defense"] == d and r["attack"] == cond]
            vals.append(100 * match[0] if match else 0.0)
        xs = [i + (j - (len(conditions) - 1) / 2) * width for i in range(len(defenses))]
        bars = ax.bar(xs, vals, width=width, label=cond)
        for b, v in zip(bars, vals):
            ax.text(b.get_x() + b.get_width() / 2, v + 1, f"{v:.0f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(defenses)))
    ax.set_xticklabels(defenses)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 110)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=min(4, len(conditions)))
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def training_curves(history: list[dict[str, Any]], path: str | Path, title: str = "Training") -> Path:
    """Loss and accuracy per epoch: train / test accuracy, ASR after poisoning, and the
    adversarial-training monitor's clean and PGD accuracy (``clean_acc``, ``pgd_acc``, which
    include an ``epoch 0`` point measured before training). Rows may lack keys; each curve
    uses the rows that have its key.
    """
    def series(key: str, scale: float = 1.0) -> tuple[list[Any], list[float]]:
        pts = [(h["epoch"], scale * float(h[key])) for h in history if key in h and h[key] is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, ax1 = plt.subplots(figsize=(5.5, 3.4))
    ax1.plot(*series("loss"), "o-", color="tab:red", label="loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss", color="tab:red")
    ax2 = ax1.twinx()
    curves = (("train_acc", "s-", "tab:blue", "train acc"), ("val_acc", "^-", "tab:green", "test acc"),
              ("asr", "x--", "tab:purple", "ASR"), ("clean_acc", "D-", "tab:olive", "clean acc (monitor)"),
              ("pgd_acc", "v-", "tab:orange", "PGD acc (monitor)"))
    for key, style, color, label in curves:
        xs, ys = series(key, 100.0)
        if xs:
            ax2.plot(xs, ys, style, color=color, label=label)
    ax2.set_ylabel("accuracy (%)")
    ax2.set_ylim(-3, 103)
    ax2.legend(fontsize=7, loc="center right")
    ax1.set_title(title)
    return save_figure(fig, path)


def robust_vs_eps(rows: list[dict[str, Any]], path: str | Path, title: str = "Robust accuracy vs. eps") -> Path:
    """One line per (defense, attack family): accuracy against the attack radius; eps 0 is clean accuracy.

    ``rows`` have ``defense``, ``attack`` (``"clean"`` for clean rows), ``accuracy`` and, for
    attacks, ``family`` and ``eps``.
    """
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    clean = {r["defense"]: r["accuracy"] for r in rows if r["attack"] == "clean"}
    curves: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for r in rows:
        if r["attack"] != "clean":
            curves.setdefault((r["defense"], r["family"]), []).append((r["eps"], r["accuracy"]))
    for (defense, family), pts in curves.items():
        pts = sorted(pts)
        xs = [0.0] + [p[0] for p in pts]
        ys = [100 * clean.get(defense, float("nan"))] + [100 * p[1] for p in pts]
        ax.plot(xs, ys, "o-", label=f"{defense}: {family}")
    ax.set_xlabel("eps")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def repair_curves(histories: dict[str, list[dict[str, Any]]], path: str | Path,
                  title: str = "ACC and ASR during repair") -> Path:
    """ACC (solid) and ASR (dashed) per repair epoch, one colour per defense; epoch 0 is the input model.

    ``histories`` maps a defense label to its :class:`~robustkit.base.RepairResult` history
    (rows with ``epoch`` and ``acc`` / ``asr`` where they were measured).
    """
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for i, (label, hist) in enumerate(histories.items()):
        color = f"C{i}"
        for key, style in (("acc", "-"), ("asr", "--")):
            pts = [(h["epoch"], h[key]) for h in hist if key in h]
            if pts:
                ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], style, color=color, marker="." if len(pts) < 30 else None,
                        label=f"{label} {key.upper()}")
    return _save_percent_plot(fig, ax, path, title, "repair epoch", "%")


def skip_sweep(sweep: dict[str, list[float]], gammas: list[float], path: str | Path, chosen: str | None = None,
               title: str = "Surrogate-trigger ASR vs. skip scale gamma") -> Path:
    """The skip-suppression layer sweep: one line per skip connection, the chosen one bold."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, asr in sweep.items():
        bold = name == chosen
        ax.plot(gammas, [100 * a for a in asr], "o-" if bold else "-", lw=2.5 if bold else 1, label=name + (" (chosen)" if bold else ""))
    return _save_percent_plot(fig, ax, path, title, "gamma (scale of the skip connection)", "excess ASR (%)")


def _save_percent_plot(fig: Any, ax: Any, path: str | Path, title: str, xlabel: str, ylabel: str) -> Path:
    """Shared finish of the percentage plots: labels, 0-100 axis, grid, legend, atomic save."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)
