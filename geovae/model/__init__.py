"""The VAE segmenter, its losses and its self-describing file format."""

from geovae.model.base import ModelInfo, SegmentationModel
from geovae.model.discriminator import PatchDiscriminator, adversarial_losses
from geovae.model.io import load_model, read_model_info, save_model
from geovae.model.losses import kl_warmup, sample_diversity, vae_segmentation_loss
from geovae.model.vae import VAEOutput, VAESegmenter

__all__ = [
    "ModelInfo",
    "PatchDiscriminator",
    "SegmentationModel",
    "VAEOutput",
    "VAESegmenter",
    "adversarial_losses",
    "kl_warmup",
    "load_model",
    "read_model_info",
    "sample_diversity",
    "save_model",
    "vae_segmentation_loss",
]
