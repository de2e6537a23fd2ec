"""Defenses: input preprocessors, model repair and data filtering."""

from .preprocess import BilateralFilter, GaussianNoise, NoiseBilateral, gaussian_noise

__all__ = ["GaussianNoise", "BilateralFilter", "NoiseBilateral", "gaussian_noise"]
