"""Pipeline steps, one small module each; importing this package registers them in ``STEPS``.

A step is ``step(ctx, /, **params)``: it reads the :class:`~robustkit.pipeline.context.Context`,
calls one library function and adds tables / figures to the report. An optional
``step.validate(params, path)`` checks nested specs before the run starts.
"""

from . import backdoor, evaluate, filter, model, repair, train  # noqa: F401
from . import certify  # noqa: F401
from . import detect  # noqa: F401

__all__: list[str] = []
