"""The training data as a TorchGeo data module: one labelled scene plus optional unlabelled scenes.

Training reads through TorchGeo, not around it: the image and a label raster are
:class:`~torchgeo.datasets.RasterDataset` instances joined by an
:class:`~torchgeo.datasets.IntersectionDataset`; vector labels are rasterised on the fly by a
:class:`~torchgeo.datasets.VectorDataset`; patches come from TorchGeo samplers
(:class:`~torchgeo.samplers.RandomGeoSampler` for training,
:class:`~torchgeo.samplers.GriddedPatchSampler` for validation) and are collated by
:func:`~torchgeo.datasets.stack_samples`.

What geovae adds is the checking a user needs before minutes of training (labels on the
image's grid, class ids that ``classes`` names, labelled pixels where training looks) and
scene-wide band statistics computed block by block over valid pixels only
(:func:`geovae.bands.band_statistics`), which the task normalises with.

A pixel of the image is valid when at least one band differs from the image's nodata value
(GDAL's dataset mask for a nodata-tagged raster). A single band equal to nodata inside a
valid pixel (a per-band gap, such as Landsat-7's B7 stripes) is replaced by that band's
scene mean before the model sees it.
"""

from __future__ import annotations

import functools
import math
import operator
import os
from collections.abc import Mapping, Sequence
from typing import Any

import shapely
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader
from torchgeo.datamodules import GeoDataModule
from torchgeo.datasets import GeoDataset, IntersectionDataset, stack_samples
from torchgeo.samplers import GeoSampler, GriddedPatchSampler, RandomGeoSampler

from geovae.bands import band_statistics
from geovae.choices import SAMPLERS, Sampler, ValSide
from geovae.classes import parse_classes
from geovae.errors import LabelsError, OptionError, SceneError
from geovae.scene import Scene, gdal_path, open_scene
from geovae.training.labels import (
    ObjectLabels,
    SceneImage,
    SceneLabels,
    VectorLabels,
    background_area,
    check_same_grid,
    label_counts,
    object_label_counts,
    resolve_classes,
    vector_label_values,
)
from geovae.training.samplers import LabelledPatchSampler, labelled_cells, split_regions
from geovae.training.transforms import IGNORE_INDEX, AddIgnoreMask, Compose, IgnoreOutside, RemapMask

__all__ = ["SAMPLERS", "SceneDataModule", "open_training_image"]


def open_training_image(path: str, role: str = "image") -> Scene:
    """Open and describe a training image (:func:`geovae.scene.open_scene`), georeferenced.

    Args:
        path: local path, URL (``https://``, ``s3://``) or GDAL ``/vsi...`` name.
        role: what the raster is, for messages.

    Returns:
        The :class:`~geovae.scene.Scene` (header only; no pixels are read).

    Raises:
        SceneError: missing, unreadable, rotated, or without CRS.
    """
    scene = open_scene(path, pixel_coords=True)
    if scene.crs is None or scene.transform.is_identity:
        raise SceneError(
            f"{role} {path}: has no CRS or geotransform; georeference it (e.g. gdal_edit.py -a_srs -a_ullr)"
        )
    return scene


def _bands_read(scene: Scene) -> int:
    # TorchGeo's RasterDataset reads every band of the file, an alpha band included.
    return scene.count + (scene.alpha is not None)


class SceneDataModule(GeoDataModule):
    """A TorchGeo data module for one labelled scene, plus optional unlabelled scenes.

    Training patches are drawn at random inside the training part of the scene by
    :class:`~torchgeo.samplers.RandomGeoSampler`; validation patches tile the validation part
    with :class:`~torchgeo.samplers.GriddedPatchSampler`. With ``unlabeled`` scenes, every
    training step also gets a batch from them (via Lightning's
    :class:`~lightning.pytorch.utilities.CombinedLoader`) whose mask is all ``ignore_index``:
    those pixels train the reconstruction and KL terms only.

    Everything that can be wrong with the inputs is checked in ``__init__`` (files, grids,
    classes, labelled pixels), so a bad run fails before any training. ``__init__`` also
    computes the image's band statistics: the data module exposes what a model of this data
    needs, and :class:`~geovae.training.VAESegmentationTask` built without them (as in
    ``torchgeo fit``) reads them from here. Batches are not normalised here; the task does it.

    Attributes:
        facts: the training image (a :class:`~geovae.scene.Scene`: crs, res, bounds...).
        classes: the :class:`~geovae.classes.ClassSpec` (ids, names, colours).
        stats: the image's :class:`~geovae.bands.BandStats` (valid pixels, scene-wide).
        in_channels: bands of the image (what TorchGeo reads).
        num_classes: number of classes.
        mean: per-band mean of the image, for the task's normalisation.
        std: per-band standard deviation of the image.
        nodata: the image's nodata value, or None.
        band_names: band descriptions, when every band has one.

    Args:
        image: the training image (any GDAL raster).
        labels: a label raster on the image's grid (0 or its nodata = unlabelled).
        vector_labels: vector labels instead of ``labels``, rasterised by TorchGeo.
        label_field: attribute of ``vector_labels`` holding the class id (or class name).
        classes: ``"1:developed,5:forest"`` or a mapping; None for every id in the labels.
        unlabeled: extra scenes without labels (same band count) for semi-supervised training.
        tile: patch size in pixels.
        batch_size: patches per batch (and as many unlabelled ones per step).
        val_fraction: share of the scene held out for validation on the ``val_side``.
        val_side: side of the scene kept for validation.
        samples_per_epoch: training patches per epoch (default: 4x the number of
            non-overlapping tiles in the training part, rounded up to whole batches).
        num_workers: DataLoader worker processes.
        sampler: where training patches come from: ``"random"`` (TorchGeo's
            ``RandomGeoSampler`` over the training part) or ``"labelled"``
            (:class:`LabelledPatchSampler`: every patch holds labelled pixels; for sparse
            labels without unlabelled scenes, see docs/quality.md). Unlabelled scenes are
            always sampled at random.
        seed: seed of the random patch sampler.
        ignore_index: mask value of unlabelled pixels.
        boundary_width: with ``vector_labels`` holding *objects* (fields, parcels,
            buildings): train a ``boundary`` class, the pixels within this many pixels of
            every polygon's outline (:class:`~geovae.training.labels.ObjectLabels`), so that
            touching objects of one class are kept apart and ``geovae segment --objects``
            can split them. None (the default) trains classes only.
        background: with ``boundary_width``, where pixels outside every polygon are the
            ``background`` class: ``"extent"`` (default: inside the labels' bounding box),
            a vector file whose polygons mark the area the labels cover completely, or
            ``"none"`` (nowhere: they stay unlabelled, and the model has no background
            class). Outside it they are unlabelled, never background.

    Attributes (object labels):
        objects: with ``boundary_width``, ``{"boundary_class", "background_class",
            "object_classes", "boundary_width", "background"}``, recorded in the model file;
            else None.

    Raises:
        SceneError, LabelsError, OptionError: for bad inputs (see the messages).
    """

    def __init__(
        self,
        image: str,
        labels: str | None = None,
        vector_labels: str | None = None,
        label_field: str | None = None,
        classes: str | Mapping[Any, Any] | None = None,
        unlabeled: Sequence[str] = (),
        tile: int = 64,
        batch_size: int = 16,
        val_fraction: float = 0.25,
        val_side: ValSide = "east",
        samples_per_epoch: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        ignore_index: int = IGNORE_INDEX,
        sampler: Sampler = "random",
        boundary_width: int | None = None,
        background: str | None = None,
    ) -> None:
        super().__init__(
            SceneImage, batch_size=batch_size, patch_size=tile, length=samples_per_epoch, num_workers=num_workers
        )
        if tile < 8:
            raise OptionError(f"tile {tile}: too small; use 32 or more")
        if batch_size < 1:
            raise OptionError(f"batch_size {batch_size}: must be at least 1")
        if samples_per_epoch is not None and samples_per_epoch < 1:
            raise OptionError(
                f"samples_per_epoch {samples_per_epoch}: trains nothing; give 1 or more (or leave it out: 4x the tiles)"
            )
        if sampler not in SAMPLERS:
            raise OptionError(f"sampler {sampler!r}: use one of {', '.join(SAMPLERS)}")
        if labels and vector_labels:
            raise OptionError("give either labels (a raster) or vector_labels, not both")
        if not labels and not vector_labels:
            raise OptionError("no labels given; pass a label raster or vector_labels with label_field")
        if boundary_width is not None:
            if isinstance(boundary_width, bool) or not isinstance(boundary_width, int) or boundary_width < 1:
                raise OptionError(f"--boundary-width {boundary_width}: must be a whole number of pixels >= 1")
            if not vector_labels:
                raise OptionError(
                    "--boundary-width needs object polygons: pass --vector-labels (and --label-field), "
                    "not a label raster"
                )
        elif background is not None:
            raise OptionError("--background applies to object labels; pass --boundary-width too")
        self.boundary_width = boundary_width
        self.background = background if background is not None else ("extent" if boundary_width else None)
        self.image_path = str(image)
        self.labels_path = str(labels) if labels else None
        self.vector_path = str(vector_labels) if vector_labels else None
        self.label_field = label_field
        self.unlabeled_paths = [str(p) for p in (unlabeled or ())]
        self.tile = int(tile)
        self.seed = int(seed)
        self.ignore_index = int(ignore_index)
        self.val_side = val_side

        self.facts = open_training_image(self.image_path)
        f = self.facts
        self.train_box, self.val_box = split_regions(tuple(f.bounds), f.res, val_fraction, val_side)
        for name, box in (("training", self.train_box), ("validation", self.val_box)):
            if box is None:
                continue
            w = round((box[2] - box[0]) / f.res[0])
            h = round((box[3] - box[1]) / f.res[1])
            if w < tile or h < tile:
                raise OptionError(
                    f"the {name} part of {self.image_path} is {w}x{h} px, smaller than tile {tile}; "
                    f"use a smaller --tile, or another data.val_fraction or data.val_side in a train --config file"
                )

        for p in self.unlabeled_paths:
            u = open_training_image(p, "unlabeled scene")
            if _bands_read(u) != _bands_read(f):
                raise SceneError(
                    f"unlabeled scene {p}: has {_bands_read(u)} bands but the image has {_bands_read(f)}; "
                    f"give scenes of the same sensor and band order"
                )

        name_to_id: dict[str, int] = {}
        if self.labels_path:
            check_same_grid(f, self.labels_path)
            train_counts, _ = label_counts(self.labels_path, self.train_box)
            val_counts, _ = label_counts(self.labels_path, self.val_box) if self.val_box else ({}, None)
            present = dict(train_counts)
            for k, v in val_counts.items():
                present[k] = present.get(k, 0) + v
            self.classes = resolve_classes(classes, present, where=self.labels_path, colors_from=self.labels_path)
        else:
            assert self.vector_path is not None
            gdf = vector_label_values(self.vector_path, label_field, f.crs)
            values, vbounds = list(gdf[label_field]), tuple(float(v) for v in gdf.total_bounds)
            l, b, r, t = tuple(f.bounds)
            if vbounds[2] <= l or vbounds[0] >= r or vbounds[3] <= b or vbounds[1] >= t:
                raise LabelsError(
                    f"vector labels {self.vector_path}: do not overlap the image; give the labels of this scene"
                )
            if all(isinstance(v, str) for v in values):
                spec = (
                    parse_classes(classes)
                    if classes is not None
                    else {i + 1: n for i, n in enumerate(sorted(set(values)))}
                )
                name_to_id = {n: i for i, n in spec.items()}
                unknown = sorted(set(values) - set(name_to_id))
                if unknown:
                    raise LabelsError(
                        f"vector labels {self.vector_path}: classes {', '.join(map(repr, unknown[:8]))} "
                        f"of {label_field!r} are not named in --classes; add them"
                    )
                counts = {name_to_id[v]: values.count(v) for v in set(values)}
                classes = spec
            else:
                try:
                    ints = [int(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
                except (TypeError, ValueError):
                    raise LabelsError(
                        f"vector labels {self.vector_path}: {label_field!r} holds values that are neither "
                        f"class ids nor names; choose the class attribute"
                    ) from None
                counts = {v: ints.count(v) for v in set(ints)}
            self.classes = resolve_classes(
                classes, counts, where=self.vector_path, min_classes=1 if self.boundary_width else 2
            )
            self._label_shapes = list(gdf.geometry)
            if self.boundary_width:
                train_counts, val_counts = self._object_classes(gdf, label_field or "", name_to_id)
            else:
                # Pixel counts per class from polygon areas inside each part (for class weights).
                train_counts = self._vector_pixel_counts(gdf, label_field or "", name_to_id, self.train_box)
                val_counts = self._vector_pixel_counts(gdf, label_field or "", name_to_id, self.val_box)
        if not self.boundary_width:
            self.objects: dict[str, Any] | None = None
            self._background_geom = None
        self.name_to_id = name_to_id
        self.lookup = self.classes.lookup()
        self.train_class_counts = {cid: int(train_counts.get(cid, 0)) for cid in self.classes.ids}
        n_train = sum(self.train_class_counts.values())
        n_val = sum(c for v, c in val_counts.items() if v in self.lookup)
        if n_train == 0:
            raise LabelsError(
                f"labels {self.labels_path or self.vector_path}: no labelled pixels in the training part "
                f"of the scene; check the labels, --classes, or data.val_fraction/data.val_side (train --config)"
            )
        self.n_labelled = {"train": n_train, "val": n_val}
        self.sampler_name = sampler

        if samples_per_epoch is None:
            tb = self.train_box
            chips = max(1, round((tb[2] - tb[0]) / f.res[0] / tile) * round((tb[3] - tb[1]) / f.res[1] / tile))
            samples_per_epoch = 4 * chips
        self.length: int = int(math.ceil(samples_per_epoch / batch_size) * batch_size)

        # What the model needs to know about the data (a task built without these reads them
        # from here, see VAESegmentationTask.setup). The data module does not normalise:
        # the task does, so that the same numbers go into the model file.
        self.stats = band_statistics(self.image_path)
        self.in_channels = _bands_read(f)
        self.num_classes = self.classes.num_classes
        # TorchGeo's data module types mean and std as the tensors of its Normalize; this one
        # does not normalise and gives plain lists, what the task and the model file take.
        self.mean: list[float] = list(self.stats.mean)  # type: ignore[assignment]  # TorchGeo's base: Tensor
        self.std: list[float] = list(self.stats.std)  # type: ignore[assignment]  # TorchGeo's base: Tensor
        self.nodata = f.nodata
        descr = list(f.descriptions)
        self.band_names = [str(d) for d in descr] if all(descr) and len(descr) == self.in_channels else None

    @property
    def labelled_share(self) -> float:
        """Share of the training part's pixels that carry a label (sparse labels: a few %)."""
        tb, res = self.train_box, self.facts.res
        return min(1.0, self.n_labelled["train"] / max(1.0, (tb[2] - tb[0]) * (tb[3] - tb[1]) / (res[0] * res[1])))

    def _object_classes(
        self, gdf: Any, label_field: str, name_to_id: Mapping[str, int]
    ) -> tuple[dict[int, int], dict[int, int]]:
        """Add the background and boundary classes to the labels' classes; count every class.

        The background is class 0 (``background``), the boundary the id after the largest
        label class (``boundary``). Pixel counts come from the same rasterisation the
        training patches get (:func:`~geovae.training.labels.object_label_counts`).
        """
        from geovae.classes import ClassSpec
        from geovae.objects import BACKGROUND_NAME, BOUNDARY_NAME

        spec = self.classes
        for cid, name in zip(spec.ids, spec.names, strict=True):
            if name.strip().lower() in (BACKGROUND_NAME, BOUNDARY_NAME):
                raise LabelsError(
                    f"vector labels {self.vector_path}: class {cid} is named {name!r}, a name object "
                    f"training gives its own classes; rename it (--classes)"
                )
        boundary_id = max(spec.ids) + 1
        if boundary_id > 254:
            raise LabelsError(
                f"vector labels {self.vector_path}: class ids up to {max(spec.ids)} leave no id for the "
                f"boundary class (class ids are 0..254); renumber the classes (--classes)"
            )
        self._background_geom = background_area(self.background, self.vector_path or "", self.facts.crs)
        background_id = 0 if self._background_geom is not None else None
        colors = list(spec.colors) or []
        ids = [*([0] * (background_id is not None)), *spec.ids, boundary_id]
        names = [*([BACKGROUND_NAME] * (background_id is not None)), *spec.names, BOUNDARY_NAME]
        cols = [*([(200, 200, 200)] * (background_id is not None)), *colors, (20, 20, 20)] if colors else []
        self.classes = ClassSpec(ids=ids, names=names, colors=cols)
        self.objects = {
            "boundary_class": boundary_id,
            "background_class": background_id,
            "object_classes": list(spec.ids),
            "boundary_width": int(self.boundary_width or 1),
            "background": self.background,
        }

        def class_of(v: Any) -> int:
            if isinstance(v, str):
                return int(name_to_id.get(v, 0))
            if v is None or (isinstance(v, float) and math.isnan(v)):
                return 0
            return int(v)

        feature_class = [class_of(v) for v in gdf[label_field]]
        objs = gdf.assign(class_id=feature_class)
        self._object_gdf = objs[objs["class_id"].isin(list(spec.ids))][["class_id", "geometry"]]
        f = self.facts
        counts = [
            object_label_counts(
                gdf,
                feature_class,
                f.transform,
                (f.height, f.width),
                box,
                int(self.boundary_width or 1),
                boundary_id,
                background_id,
                self._background_geom,
            )
            for box in (self.train_box, self.val_box)
        ]
        return counts[0], counts[1]

    def object_reference(self) -> Any:
        """The object polygons of the object labels (their object classes only), in the image's
        CRS, with a ``class_id`` column; None without object labels (``boundary_width``)."""
        return getattr(self, "_object_gdf", None) if self.objects else None

    def _vector_pixel_counts(
        self, gdf: Any, label_field: str, name_to_id: Mapping[str, int], box: tuple[float, float, float, float] | None
    ) -> dict[int, int]:
        if box is None:
            return {}
        part = gdf.clip(shapely.box(*box))
        if part.empty:
            return {}
        ids = part[label_field].map(lambda v: name_to_id.get(v, 0) if isinstance(v, str) else v)
        px = part.geometry.area / (self.facts.res[0] * self.facts.res[1])
        out: dict[int, int] = {}
        for cid, n in zip(ids, px, strict=True):
            if cid is None or (isinstance(cid, float) and math.isnan(cid)):
                continue
            out[int(cid)] = out.get(int(cid), 0) + round(float(n))
        return out

    # -- datasets ---------------------------------------------------------------------
    def _image_ds(self, path: str, transforms: Any = None) -> SceneImage:
        # TorchGeo finds remote files by their GDAL name (/vsicurl/..., /vsis3/...).
        try:
            return SceneImage(paths=gdal_path(path), crs=self.facts.crs, res=self.facts.res, transforms=transforms)
        except Exception as e:  # DatasetNotFoundError and rasterio errors
            raise SceneError(f"image {path}: TorchGeo cannot index it ({str(e).splitlines()[0]})") from None

    def _labelled_ds(self, box: tuple[float, float, float, float] | None) -> GeoDataset:
        img = self._image_ds(self.image_path)
        remap = RemapMask(self.lookup, self.ignore_index)
        outside = IgnoreOutside(box, self.ignore_index) if box is not None else None
        if self.labels_path:
            lab: GeoDataset = SceneLabels(paths=gdal_path(self.labels_path), crs=img.crs, res=self.facts.res)
        elif self.boundary_width:
            # __init__ takes labels or vector_labels; object labels are vector labels
            assert self.vector_path is not None and self.objects is not None
            lab = ObjectLabels(
                gdal_path(self.vector_path),
                crs=img.crs,
                res=self.facts.res,
                label_field=self.label_field or "",
                name_to_id=self.name_to_id,
                boundary_width=self.boundary_width,
                boundary_id=self.objects["boundary_class"],
                background_id=self.objects["background_class"],
                background=self._background_geom,
            )
        else:
            assert self.vector_path is not None  # labels or vector_labels, checked in __init__
            lab = VectorLabels(
                gdal_path(self.vector_path),
                crs=img.crs,
                res=self.facts.res,
                label_field=self.label_field or "",
                name_to_id=self.name_to_id,
            )
        return IntersectionDataset(img, lab, transforms=Compose(remap, outside))

    def setup(self, stage: str) -> None:
        """Build the TorchGeo datasets and samplers for ``stage``."""
        if stage in ("fit",):
            self.train_dataset = self._labelled_ds(self.train_box)
            gen = torch.Generator().manual_seed(self.seed)
            if self.sampler_name == "labelled":
                cells = labelled_cells(
                    self.labels_path,
                    self.train_box,
                    self.facts.transform,
                    max(1, self.tile // 2),
                    self.classes.ids,
                    shapes=None if self.labels_path else self._label_shapes,
                )
                self.train_sampler: GeoSampler = LabelledPatchSampler(
                    self.train_dataset, self.tile, self.length, self.train_box, cells, generator=gen
                )
            else:
                randoms = RandomGeoSampler(
                    self.train_dataset,
                    size=self.tile,
                    length=self.length,
                    roi=shapely.box(*self.train_box),
                    generator=gen,
                )
                if len(randoms.areas) == 0:
                    # TorchGeo would fail later inside torch.multinomial with no hint.
                    raise OptionError(
                        f"the labels cover less than one {self.tile} x {self.tile} px tile of the training part of "
                        f"{self.image_path}; use a smaller --tile, a smaller data.val_fraction (train --config), or "
                        "labels that cover more of it"
                    )
                self.train_sampler = randoms  # type: ignore[assignment]  # TorchGeo 0.10: derives from samplers.single's GeoSampler, not the one its data module declares
            if self.unlabeled_paths:
                uds = [self._image_ds(p, transforms=AddIgnoreMask(self.ignore_index)) for p in self.unlabeled_paths]
                self.unlabeled_dataset: GeoDataset | None = (
                    functools.reduce(operator.or_, uds) if len(uds) > 1 else uds[0]
                )
                ugen = torch.Generator().manual_seed(self.seed + 1)
                self.unlabeled_sampler: RandomGeoSampler | None = RandomGeoSampler(
                    self.unlabeled_dataset, size=self.tile, length=self.length, generator=ugen
                )
            else:
                self.unlabeled_dataset = None
                self.unlabeled_sampler = None
        if stage in ("fit", "validate") and self.val_box is not None:
            self.val_dataset = self._labelled_ds(self.val_box)
            self.val_sampler = GriddedPatchSampler(
                self.val_dataset, size=self.tile, stride=self.tile, roi=shapely.box(*self.val_box)
            )

    def train_dataloader(self) -> Any:
        """Labelled patches; with unlabelled scenes, a CombinedLoader of both streams."""
        labelled = self._dataloader_factory("train")
        if not self.unlabeled_paths or self.unlabeled_dataset is None or self.unlabeled_sampler is None:
            return labelled
        unl = DataLoader(
            self.unlabeled_dataset,
            batch_size=self.batch_size,
            sampler=self.unlabeled_sampler,
            num_workers=self.num_workers,
            collate_fn=stack_samples,
            drop_last=True,
            persistent_workers=self.num_workers > 0,
        )
        return CombinedLoader({"labeled": labelled, "unlabeled": unl}, mode="max_size_cycle")

    def val_dataloader(self) -> Any:
        """Gridded validation patches, or none when nothing is held out."""
        if self.val_box is None:
            return []
        return self._dataloader_factory("val")

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """No batch augmentation: normalisation lives in the task (and in the model file)."""
        return batch

    def describe(self) -> dict[str, Any]:
        """Provenance of the training data, for the model file."""
        return {
            "image": os.path.abspath(self.image_path) if "://" not in self.image_path else self.image_path,
            "labels": self.labels_path or self.vector_path,
            "label_field": self.label_field,
            "unlabeled": self.unlabeled_paths,
            "train_box": list(self.train_box),
            "val_box": list(self.val_box) if self.val_box else None,
            "crs": self.facts.crs.to_string() if self.facts.crs is not None else None,
            "labelled_pixels": self.n_labelled,
            "sampler": self.sampler_name,
            **({"objects": self.objects} if self.objects else {}),
        }
