"""Backdoor model repair: ``ModelRepair`` plug-ins that return a repaired copy of a model from a
little clean data (FineTune, FT-SAM, skip-connection suppression)."""

from .finetune import FTSAM, FineTune, finetune_loop
from .skip_suppression import SkipSuppression, jump_score

__all__ = ["FineTune", "FTSAM", "finetune_loop", "SkipSuppression", "jump_score"]

from .measure import RepairOutcome, repair_and_measure  # noqa: E402

__all__ += ["RepairOutcome", "repair_and_measure"]

from .guard import MAX_ACC_DROP, SuppressionError, check_collapse, split_clean  # noqa: E402

__all__ += ["MAX_ACC_DROP", "SuppressionError", "check_collapse", "split_clean"]
