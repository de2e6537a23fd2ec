"""Poisoned-sample filtering: ``DataFilter`` plug-ins scoring a suspect training set with a model
trained on it (attention entropy for ViTs, activation clustering, spectral signatures), their
metrics against ground truth and :func:`run_filter` (kept data, flagged list, report, plot); and
inference-time detectors (``DETECTORS``: STRIP, an ``InputDetector``)."""

from .activation_clustering import ActivationClustering
from .attention_entropy import AttentionEntropyFilter, attention_entropies, cls_attention_entropy
from .common import fit_gmm2, is_bimodal, low_cluster, penultimate_features
from .run import filter_metrics, ground_truth, run_filter, score_histogram
from .spectral_signatures import SpectralSignatures
from .detectors import DETECTORS, DetectorGuard, InputDetector, ModelScanner, detection_rates
from .strip import STRIP

__all__ = ["AttentionEntropyFilter", "ActivationClustering", "SpectralSignatures", "cls_attention_entropy",
           "attention_entropies", "penultimate_features", "fit_gmm2", "is_bimodal", "low_cluster", "filter_metrics",
           "ground_truth", "run_filter", "score_histogram", "STRIP", "InputDetector", "DetectorGuard",
           "ModelScanner", "DETECTORS", "detection_rates"]
