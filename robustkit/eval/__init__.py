"""Evaluation: clean / robust accuracy, the adaptive evaluation policy (:func:`evaluate_defenses`),
RobustBench-format results, reports and plots."""

from ..inference import accuracy, eval_mode, predict
from .metrics import AttackResult, robust_accuracy
from .report import Report
from .robust import Evaluation, evaluate_defenses

__all__ = ["AttackResult", "accuracy", "predict", "eval_mode", "robust_accuracy", "Report", "Evaluation",
           "evaluate_defenses"]
