"""Metrics, plots and the end-to-end run of a poisoned-sample filter.

Metrics follow BackdoorBench's filtering conventions (../shared/REFERENCES.md section 6): the
positive class is "poisoned"; TPR (recall), FPR, precision, F1 on the flagged mask and AUROC
on the scores (higher = more suspicious).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ..base import DataFilter, FilterResult
from ..errors import InputError


def ground_truth(dataset: Dataset) -> torch.Tensor | None:
    """The poisoned-sample mask of a ``PoisonedDataset`` / loaded poisoned set (None for other data)."""
    mask = getattr(dataset, "is_poisoned", None)
    return torch.as_tensor(mask, dtype=torch.bool) if mask is not None else None


def filter_metrics(result: FilterResult, poisoned: torch.Tensor) -> dict[str, float]:
    """TPR, FPR, precision, F1, AUROC and counts of ``result`` against the true poisoned mask."""
    from sklearn.metrics import roc_auc_score

    truth = torch.as_tensor(poisoned, dtype=torch.bool).cpu()
    if truth.shape != result.flagged.shape:
        raise InputError(f"ground truth has {truth.numel()} samples but the filter scored {result.flagged.numel()}")
    f = result.flagged.cpu()
    tp = int((f & truth).sum())
    fp = int((f & ~truth).sum())
    fn = int((~f & truth).sum())
    tn = int((~f & ~truth).sum())
    tpr = tp / (tp + fn) if tp + fn else float("nan")
    fpr = fp / (fp + tn) if fp + tn else float("nan")
    precision = tp / (tp + fp) if tp + fp else 0.0
    f1 = 2 * precision * tpr / (precision + tpr) if tp else 0.0
    both = 0 < int(truth.sum()) < truth.numel()
    auroc = float(roc_auc_score(truth.numpy(), result.scores.double().cpu().numpy())) if both else float("nan")
    return {"tpr": tpr, "fpr": fpr, "precision": precision, "f1": f1, "auroc": auroc, "flagged": tp + fp,
            "true_positives": tp, "false_positives": fp, "poisoned": tp + fn, "samples": truth.numel()}


def score_histogram(result: FilterResult, path: str | Path, poisoned: torch.Tensor | None = None,
                    title: str = "Filter scores") -> Path:
    """Histogram of the scores, clean and poisoned samples in two colours (when known), threshold dashed."""
    from ..eval.plots import plt
    from ..eval.report import save_figure

    s = result.scores.double().cpu().numpy()
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    bins = np.linspace(s.min(), s.max() + 1e-12, 50)
    if poisoned is not None:
        truth = torch.as_tensor(poisoned, dtype=torch.bool).numpy()
        ax.hist(s[~truth], bins=bins, alpha=0.7, label=f"clean ({int((~truth).sum())})", color="tab:blue")
        ax.hist(s[truth], bins=bins, alpha=0.7, label=f"poisoned ({int(truth.sum())})", color="tab:red")
    else:
        ax.hist(s, bins=bins, alpha=0.8, label="all samples", color="tab:gray")
    thr = result.details.get("threshold")
    if thr is not None:
        ax.axvline(thr, color="k", ls="--", lw=1, label="flagging threshold")
    ax.set_yscale("log")
    ax.set_xlabel(result.details.get("score", "score") + "  (higher = more suspicious)", fontsize=7)
    ax.set_ylabel("samples")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


OUTPUT_FILES = ("kept.npz", "flagged.json", "report.json", "report.md", "scores.png")


def run_filter(model: nn.Module, dataset: Dataset, data_filter: DataFilter | Any, out_dir: str | Path,
               name: str | None = None, input_path: str | Path | None = None) -> tuple[FilterResult, dict[str, Any]]:
    """Score ``dataset``, write the kept samples and a report into ``out_dir``; the input is never modified.

    Writes ``kept.npz`` (the unflagged samples, readable by the ``npz`` dataset or
    :func:`~robustkit.data.npz.load_npz`, plus an array ``source_index``: each kept sample's
    index in the input), ``flagged.json`` (flagged indices of the input), ``report.json`` /
    ``report.md`` and ``scores.png``. With ground truth (a poisoned set saved by robustkit) the
    report holds TPR, FPR, precision, F1 and AUROC. ``data_filter`` is a :class:`DataFilter` or
    a ``FILTERS`` spec. ``input_path``, the file or folder the data was read from, is checked
    against the files to be written (an :class:`InputError` before any work if one would
    overwrite it). Returns ``(result, metrics or {})``.
    """
    if input_path is not None:
        src = Path(input_path).resolve()
        clash = [f for f in OUTPUT_FILES if (Path(out_dir) / f).resolve() == src or src in (Path(out_dir) / f).resolve().parents]
        if clash:
            raise InputError(f"writing {clash[0]} into {out_dir} would overwrite the input data {input_path}; choose another --out")
    from ..data.arrays import to_tensors
    from ..data.npz import save_npz
    from ..io import atomic_write_json
    from ..registry import FILTERS
    from ..eval.report import Report

    filt = data_filter if isinstance(data_filter, DataFilter) else FILTERS.build(data_filter, "filter")
    label = name or getattr(type(filt), "registry_name", type(filt).__name__)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = filt.fit(model, dataset)
    x, y = to_tensors(dataset)
    keep = torch.as_tensor(result.kept_indices(), dtype=torch.long)
    save_npz(out / "kept.npz", x[keep], y[keep], classes=getattr(dataset, "classes", None), source_index=keep)
    flagged_idx = torch.nonzero(result.flagged).flatten().tolist()
    atomic_write_json(out / "flagged.json", {"filter": label, "flagged_indices": flagged_idx, "samples": len(y)})
    truth = ground_truth(dataset)
    report = Report(name=f"filter {label}")
    row = {"filter": label, "samples": len(y), "flagged": len(flagged_idx), "kept": int(keep.numel())}
    metrics: dict[str, Any] = {}
    if truth is not None:
        metrics = filter_metrics(result, truth)
        row.update({k: metrics[k] for k in ("poisoned", "tpr", "fpr", "precision", "f1", "auroc")})
        report.metrics.update({k: metrics[k] for k in ("tpr", "fpr", "precision", "f1", "auroc")})
    else:
        report.notes.append("the data carries no ground truth (not a robustkit poisoned set): no TPR/FPR")
    report.add_table("Filtering", [row], note="TPR/FPR: share of poisoned / clean samples flagged; AUROC on the scores.")
    for note in result.details.get("warnings", None) or []:
        report.notes.append(f"WARNING ({label}): {note}")
    for title, rows in result.details.tables():
        report.add_table(title, rows)
    report.add_table("Details", [result.details.summary()])
    report.figures.append(score_histogram(result, out / "scores.png", truth, title=f"{label} scores").name)
    report.write(out)
    return result, metrics
