"""Evasion (test-time) attacks: PGD with restarts and EOT, AutoAttack, BPDA.

Backdoor triggers live in :mod:`robustkit.backdoor`; ``BadNets``, ``Blended``, ``SIG`` and
``WaNet`` stay importable from here for compatibility.
"""

from .autoattack import AutoAttack, install_upstream_shim
from .bpda import BPDA, with_bpda
from .pgd import PGD

__all__ = ["PGD", "AutoAttack", "install_upstream_shim", "BPDA", "with_bpda", "BadNets", "Blended", "SIG", "WaNet"]


def __getattr__(name: str):  # compatibility: triggers moved to robustkit.backdoor
    if name in ("BadNets", "Blended", "SIG", "WaNet"):
        from .. import backdoor

        return getattr(backdoor, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
