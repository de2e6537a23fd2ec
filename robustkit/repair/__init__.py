"""Backdoor model repair: ``ModelRepair`` plug-ins that return a repaired copy of a model from a
little clean data (FineTune, FT-SAM, skip-connection suppression, and the baselines Fine-Pruning,
Neural Cleanse, NAD, ANP, I-BAU), the collapse guard they share and :func:`repair_and_measure`."""

from .anp import ANP, ANPStep
from .fine_pruning import FinePruning
from .finetune import FTSAM, FineTune, finetune_loop
from .guard import MAX_ACC_DROP, SuppressionError, check_collapse, split_clean
from .ibau import IBAU, IBAUStep
from .measure import RepairOutcome, repair_and_measure
from .nad import NAD, NADStep, attention_map
from .neural_cleanse import NeuralCleanse, anomaly_index
from .skip_suppression import SkipSuppression, jump_score

__all__ = ["FineTune", "FTSAM", "finetune_loop", "SkipSuppression", "jump_score", "RepairOutcome",
           "repair_and_measure", "MAX_ACC_DROP", "SuppressionError", "check_collapse", "split_clean",
           "FinePruning", "NeuralCleanse", "anomaly_index", "NAD", "NADStep", "attention_map", "ANP", "ANPStep",
           "IBAU", "IBAUStep"]
