"""Defenses: input preprocessors, model repair and data filtering."""

from .preprocess import GaussianNoise, gaussian_noise

__all__ = ["GaussianNoise", "gaussian_noise"]
