"""Pipelines: a config (YAML or dict) -> data, model -> steps -> :class:`~robustkit.eval.report.Report`.

- :mod:`.config` - load, ``--set`` overrides, plug-in ``imports``, validation of the whole config;
- :mod:`.context` - the typed state the steps share;
- :mod:`.runner` - :func:`run`;
- :mod:`.steps` - one small module per step (registered in ``STEPS``).
"""

from .config import TOP_LEVEL_KEYS, apply_overrides, import_plugins, load_config, validate_config
from .context import Context
from .runner import build_model, distributed_rank, model_kwargs_from_data, run
from . import steps  # noqa: F401,E402  (registers the steps)

__all__ = ["run", "load_config", "validate_config", "apply_overrides", "import_plugins", "build_model",
           "model_kwargs_from_data", "distributed_rank", "Context", "TOP_LEVEL_KEYS"]
