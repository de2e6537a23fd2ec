"""Attacks: evasion (PGD, EOT) and, later, backdoor triggers."""

from .backdoor import SIG, BadNets, Blended, WaNet
from .evasion import PGD

__all__ = ["PGD", "BadNets", "Blended", "SIG", "WaNet"]
