"""The options that take one of a fixed set of values: each set defined once, as a type.

Each ``Literal`` type is the one definition of its values; the tuple beside it
(``typing.get_args`` of the type) is what run-time checks, the CLI's choices and messages
read. The module imports nothing heavy, so the CLI builds its choices from it without
importing torch.
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = [
    "BACKENDS",
    "CLASS_WEIGHTINGS",
    "CONNECTIVITIES",
    "HEADS",
    "POLYGON_FORMAT_NAMES",
    "PRECISIONS",
    "RECON_CONDITIONS",
    "SAMPLERS",
    "VAL_SIDES",
    "Backend",
    "ClassWeighting",
    "Connectivity",
    "Head",
    "PolygonFormat",
    "Precision",
    "ReconCondition",
    "Sampler",
    "ValSide",
]

#: A polygon output format; :data:`geovae.products.POLYGON_FORMATS` gives each one's suffix
#: and driver.
PolygonFormat = Literal["geojson", "gpkg", "parquet"]
POLYGON_FORMAT_NAMES: tuple[PolygonFormat, ...] = get_args(PolygonFormat)

#: The pixel neighbourhood of a polygon's region: edge neighbours (4) or corners too (8).
Connectivity = Literal[4, 8]
CONNECTIVITIES: tuple[Connectivity, ...] = get_args(Connectivity)

#: Inference precision; ``auto`` picks per device (:func:`geovae.device.autocast_dtype`).
Precision = Literal["auto", "fp32", "bf16", "fp16"]
PRECISIONS: tuple[Precision, ...] = get_args(Precision)

#: What runs a model: ``auto`` (the runtime of its file: onnxruntime for a ``.onnx`` file,
#: torch for every other model), ``torch`` or ``onnxruntime`` (:mod:`geovae.model.onnx`).
Backend = Literal["auto", "torch", "onnxruntime"]
BACKENDS: tuple[Backend, ...] = get_args(Backend)

#: Where training patches come from (:class:`geovae.training.SceneDataModule`): anywhere in
#: the training part, or only where they hold labels.
Sampler = Literal["random", "labelled"]
SAMPLERS: tuple[Sampler, ...] = get_args(Sampler)

#: The side of the scene held out for validation.
ValSide = Literal["east", "west", "north", "south"]
VAL_SIDES: tuple[ValSide, ...] = get_args(ValSide)

#: Cross-entropy class weights from the training labels (None: the plain mean).
ClassWeighting = Literal["inverse-sqrt"]
CLASS_WEIGHTINGS: tuple[ClassWeighting, ...] = get_args(ClassWeighting)

#: The segmentation head of :class:`geovae.model.vae.VAESegmenter`.
Head = Literal["mlp", "lowrank"]
HEADS: tuple[Head, ...] = get_args(Head)

#: What the reconstruction decoder is given besides ``z``: the pixel's class, or nothing.
ReconCondition = Literal["class", "none"]
RECON_CONDITIONS: tuple[ReconCondition, ...] = get_args(ReconCondition)
