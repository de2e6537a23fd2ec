"""Compatibility alias: backdoor metrics live in :mod:`robustkit.backdoor.metrics`."""

from ..backdoor.metrics import BackdoorMetrics, backdoor_metrics, defense_effectiveness_rating, triggered_test_set

__all__ = ["BackdoorMetrics", "backdoor_metrics", "defense_effectiveness_rating", "triggered_test_set"]
