"""Backbones by name, adapted to a dataset's channels, image size and classes."""

from raymeta.models.registry import MODELS, build_model

__all__ = ["MODELS", "build_model"]
