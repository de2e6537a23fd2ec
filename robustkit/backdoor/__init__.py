"""Backdoor attacks: triggers (BadNets, Blended, SIG, WaNet), poisoned datasets with ground
truth and manifests, and the ACC / ASR / RA / DER metrics (BackdoorBench conventions)."""

from .metrics import BackdoorMetrics, backdoor_metrics, backdoor_monitor, defense_effectiveness_rating, triggered_test_set
from .poisoned import LoadedPoisonedDataset, PoisonedDataset, load_poisoned, rebuild_attack, save_poisoned
from .triggers import SIG, BadNets, Blended, WaNet

__all__ = ["BadNets", "Blended", "SIG", "WaNet", "PoisonedDataset", "LoadedPoisonedDataset", "load_poisoned",
           "save_poisoned", "rebuild_attack", "BackdoorMetrics", "backdoor_metrics", "defense_effectiveness_rating",
           "triggered_test_set", "backdoor_monitor"]
