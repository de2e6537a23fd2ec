"""Attacks: evasion (PGD, EOT) and, later, backdoor triggers."""

from .autoattack import AutoAttack, install_upstream_shim
from .backdoor import SIG, BadNets, Blended, WaNet
from .evasion import PGD

__all__ = ["PGD", "AutoAttack", "install_upstream_shim", "BadNets", "Blended", "SIG", "WaNet"]
