"""Training the VAE segmenter through TorchGeo and Lightning.

One concept per module, and data moves forward only::

    labels.py      label rasters and vector labels: grid check, counts, colours, classes,
                   the TorchGeo RasterDataset/VectorDataset subclasses
    transforms.py  sample transforms (RemapMask, IgnoreOutside, AddIgnoreMask), merge_batches,
                   the D4 augmentation
    samplers.py    the spatial split and LabelledPatchSampler
    datamodule.py  SceneDataModule: image + labels (+ unlabelled scenes), checked, with statistics
    arguments.py   the task's arguments: ranges, checks, completion from a data module, class weights
    terms.py       extra loss terms: the PatchGAN critic, pseudo-labels, generated pairs
    callbacks.py   Lightning callbacks: the weight average (EMA), history, stops
    task.py        VAESegmentationTask (a TorchGeo BaseTask), whose signature holds every default
    fit.py         the chain data module -> task -> fit -> model file; train_model
    config.py      the same chain from a LightningCLI-style YAML; train_from_config

Two ways in, both ending in a self-describing model file that ``geovae segment`` needs
nothing else to run: :func:`train_model` (an image, its labels and a few options) and
:func:`train_from_config` (a YAML). A third, TorchGeo's own ``torchgeo fit --config``, trains
:class:`VAESegmentationTask` on :class:`SceneDataModule` and writes a Lightning checkpoint
that :func:`geovae.model.io.load_model` reads (docs/training.md).

Normalisation: band mean and standard deviation are computed scene-wide from the training
image (block by block, valid pixels only), applied inside the task, and saved in the model
file, so prediction normalises every tile of every scene with the same numbers.
"""

from __future__ import annotations

from geovae.training.config import load_config, train_from_config
from geovae.training.datamodule import SceneDataModule
from geovae.training.fit import TrainResult, train_model
from geovae.training.samplers import LabelledPatchSampler
from geovae.training.task import VAESegmentationTask

__all__ = [
    "LabelledPatchSampler",
    "SceneDataModule",
    "TrainResult",
    "VAESegmentationTask",
    "load_config",
    "train_from_config",
    "train_model",
]
