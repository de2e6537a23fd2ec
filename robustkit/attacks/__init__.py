"""Attacks: evasion (PGD, EOT) and, later, backdoor triggers."""

from .evasion import PGD

__all__ = ["PGD"]
