"""robustkit: harden PyTorch image classifiers and clean up after backdoor attacks.

Images are float tensors N x C x H x W in [0, 1] everywhere; a model's normalization
lives inside the model.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import attacks, backdoor, data, filtering, models, preprocessing, repair  # noqa: F401  (registers plug-ins)
from . import defenses, kernels  # noqa: F401  (compatibility fronts)
from .models import robustbench_zoo  # noqa: F401,E402  (registers the 'robustbench' model)
from .base import (
    BackdoorAttack,
    DataFilter,
    EvasionAttack,
    FilterResult,
    ModelRepair,
    Preprocessor,
    RepairResult,
    ResultDetails,
)
from .errors import ConfigError, DataNotFoundError, InputError, RobustkitError, UnknownNameError
from .registry import (
    ATTACKS,
    BACKDOORS,
    DATASETS,
    FILTERS,
    MODELS,
    PREPROCESSORS,
    REGISTRIES,
    REPAIRS,
    STEPS,
)
from .wrap import Defended, wrap
from .pipeline import load_config, run, validate_config  # noqa: E402  (also registers the steps)
from .training import TrainResult, train, train_classifier  # noqa: E402

__all__ = [
    "__version__",
    "wrap",
    "load_config",
    "validate_config",
    "run",
    "train_classifier",
    "train",
    "TrainResult",
    "Defended",
    "Preprocessor",
    "EvasionAttack",
    "BackdoorAttack",
    "ModelRepair",
    "RepairResult",
    "ResultDetails",
    "DataFilter",
    "FilterResult",
    "RobustkitError",
    "ConfigError",
    "InputError",
    "UnknownNameError",
    "DataNotFoundError",
    "PREPROCESSORS",
    "ATTACKS",
    "BACKDOORS",
    "REPAIRS",
    "FILTERS",
    "MODELS",
    "DATASETS",
    "STEPS",
    "REGISTRIES",
]
