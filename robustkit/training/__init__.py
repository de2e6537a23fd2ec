"""Training: one loop (:func:`fit`) with pluggable per-batch steps and callbacks.

- :func:`fit` - the loop (loader, optimizer, schedule, progress, divergence check, history;
  DistributedDataParallel under torchrun).
- steps - :class:`PlainStep` (cross-entropy, optional train-time preprocessor), :class:`SAMStep`,
  and adversarial training with the preprocessor in the loop: :class:`PGDATStep` (Madry et al.),
  :class:`TRADESStep` (Zhang et al.).
- callbacks - :class:`Monitor`, :class:`EpochEnd`, :class:`RobustAccuracy` (per-epoch clean / PGD accuracy).
- :func:`train_classifier`, :func:`train` - classifier training (``train`` adds per-epoch ASR / RA
  for a backdoor and checkpoints).
- :func:`adversarial_step` - a step from a config mapping (``{method: trades, eps: 8/255, ...}``).
"""

from .adversarial import PGDATStep, TRADESStep, unwrap
from .classifier import TrainResult, train, train_classifier
from .config import adversarial_step, check_adversarial, check_monitor
from .loop import Callback, EpochEnd, Monitor, fit
from .monitor import RobustAccuracy
from .optim import make_optimizer, make_scheduler
from .sam import AdaptiveSAM, frozen_bn_stats
from .steps import PlainStep, SAMStep, TrainStep

__all__ = ["fit", "Callback", "Monitor", "EpochEnd", "RobustAccuracy", "TrainStep", "PlainStep", "SAMStep",
           "PGDATStep", "TRADESStep", "unwrap", "adversarial_step", "check_adversarial", "check_monitor",
           "AdaptiveSAM", "frozen_bn_stats", "make_optimizer", "make_scheduler", "train_classifier", "train",
           "TrainResult"]
