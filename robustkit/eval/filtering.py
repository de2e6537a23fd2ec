"""Compatibility alias: filter metrics and ``run_filter`` live in :mod:`robustkit.filtering.run`."""

from ..filtering.run import filter_metrics, ground_truth, run_filter, score_histogram

__all__ = ["filter_metrics", "ground_truth", "run_filter", "score_histogram"]
