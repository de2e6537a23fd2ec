"""Training: one loop (:func:`fit`) with pluggable per-batch steps and callbacks.

- :func:`fit` - the loop (loader, optimizer, schedule, progress, divergence check, history).
- steps - :class:`PlainStep` (cross-entropy, optional train-time preprocessor), :class:`SAMStep`.
- :func:`train_classifier`, :func:`train` - classifier training (``train`` adds per-epoch ASR / RA
  for a backdoor and checkpoints).
"""

from .classifier import TrainResult, train, train_classifier
from .loop import Callback, EpochEnd, Monitor, fit
from .optim import make_optimizer, make_scheduler
from .sam import AdaptiveSAM, frozen_bn_stats
from .steps import PlainStep, SAMStep, TrainStep

__all__ = ["fit", "Callback", "Monitor", "EpochEnd", "TrainStep", "PlainStep", "SAMStep", "AdaptiveSAM",
           "frozen_bn_stats", "make_optimizer", "make_scheduler", "train_classifier", "train", "TrainResult"]
