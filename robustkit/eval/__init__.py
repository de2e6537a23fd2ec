"""Evaluation: metrics, reports and plots."""

from .metrics import AttackResult, accuracy, predict, robust_accuracy
from .report import Report

__all__ = ["AttackResult", "accuracy", "predict", "robust_accuracy", "Report"]
