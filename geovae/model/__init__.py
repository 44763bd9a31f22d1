"""The VAE segmenter, its losses and its self-describing file format."""

from geovae.model.base import ModelInfo, SegmentationModel

__all__ = ["ModelInfo", "SegmentationModel"]
