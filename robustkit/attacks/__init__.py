"""Attacks: evasion (PGD, EOT) and, later, backdoor triggers."""

from .autoattack import AutoAttack, install_upstream_shim
from .backdoor import SIG, BadNets, Blended, WaNet
from .bpda import BPDA, with_bpda
from .evasion import PGD

__all__ = ["PGD", "AutoAttack", "install_upstream_shim", "BPDA", "with_bpda", "BadNets", "Blended", "SIG", "WaNet"]
