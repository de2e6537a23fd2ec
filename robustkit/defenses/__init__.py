"""Defenses: input preprocessors, model repair and data filtering."""

from .preprocess import BilateralFilter, GaussianNoise, NoiseBilateral, Quantize, gaussian_noise

__all__ = ["GaussianNoise", "BilateralFilter", "NoiseBilateral", "Quantize", "gaussian_noise"]
