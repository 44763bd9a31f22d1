"""The resolved specification of one segmentation run, built and validated once.

:class:`~geovae.segment.options.SegmentOptions` checks what a user typed (types, ranges);
:func:`resolve` settles what needs the model and the scene as well: the scene opened and its
header checked, the model loaded and matched against it, the tile size and overlap (the
model's stride and halo), the batch size, the polygon formats (GeoJSON needs real
coordinates), whether the reconstruction error is written, the anomaly threshold, the
``--objects`` spec, the output block grid, the trust check's findings and the list of
outputs. The layers below (tiling, blending, the sinks, the report, the STAC Item) take the
resulting :class:`RunSpec` as settled and check none of it again.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from geovae.blend import BlockGrid
from geovae.errors import ModelMismatchError, OptionError, SceneError
from geovae.model.base import ModelInfo, SegmentationModel
from geovae.products import PolygonFormat, run_kinds
from geovae.scene import Scene, open_scene
from geovae.segment.options import SegmentOptions
from geovae.segment.trust import anomaly_threshold, band_mismatch, trust_findings
from geovae.sinks.rasters import RasterSpec
from geovae.tiling import TileGrid, check_options, default_batch_size, default_tiling

__all__ = ["RunSpec", "polygon_formats", "resolve", "tiling"]

log = logging.getLogger("geovae.segment")


@dataclass(frozen=True)
class RunSpec:
    """Everything a run is, resolved from the options, the model, the scene and the tile grid.

    Attributes:
        scene: the open scene.
        model: the loaded model.
        model_path: the model file, or None for a model given as an object.
        options: the options as given.
        grid: the tile grid (tile size and overlap resolved).
        blocks: the output block grid (block side, the rows written).
        batch_size: tiles per model call.
        formats: the polygon formats written.
        samples: latent samples per tile (> 0: the uncertainty raster).
        reconstruction: whether the reconstruction error is written.
        anomaly_threshold: the training's reconstruction error above which a pixel counts as
            unlike the training data, when the run writes the reconstruction error; else None.
        objects: the :class:`~geovae.objects.ObjectSpec` of ``--objects``, or None.
        probabilities: the model channels of the object-probability raster (``--objects``).
        rasters: the output rasters (:class:`~geovae.sinks.rasters.RasterSpec`).
        kinds: every output of the run, in commit order (the report last).
        trust: the trust check's findings (the report's ``trust`` entry, before counting).
    """

    scene: Scene
    model: SegmentationModel
    model_path: str | None
    options: SegmentOptions
    grid: TileGrid
    blocks: BlockGrid
    batch_size: int
    formats: tuple[PolygonFormat, ...]
    samples: int
    reconstruction: bool
    anomaly_threshold: float | None
    objects: Any
    probabilities: tuple[int, ...]
    rasters: RasterSpec
    kinds: tuple[str, ...]
    trust: Mapping[str, Any]

    @property
    def object_maps(self) -> bool:
        """Whether the run predicts and blends the model's object maps (``--objects`` with a
        model with object heads: seeds from the distance map)."""
        return bool(self.objects is not None and self.objects.distance)

    @property
    def stem(self) -> str:
        """The scene's stem, which names every output."""
        return self.scene.stem

    @property
    def info(self) -> ModelInfo:
        """The model description (the class table of every output)."""
        return self.model.info

    def report_options(self) -> dict[str, Any]:
        """The run report's ``options`` entry: the options as resolved."""
        m = self.model
        return {
            **self.options.to_dict(),
            "rows": None if self.blocks.whole_scene else list(self.blocks.rows),
            "tile": self.grid.tile,
            "batch_size": self.batch_size,
            "overlap": self.grid.overlap,
            "device": str(m.device),
            "precision": str(m.amp_dtype or "fp32").replace("torch.", ""),
            "backend": m.backend,
            "reconstruction": self.reconstruction,
            "formats": list(self.formats),
            "pixel_coords": self.scene.crs is None,
            "nodata": self.scene.nodata,
            "block_size": self.blocks.side,
        }


def tiling(
    options: SegmentOptions, info: ModelInfo, height: int | None = None, width: int | None = None
) -> tuple[int, int]:
    """Tile side and overlap of a run with ``options``, for a model (and a scene of ``height`` x ``width``).

    By default (:func:`geovae.tiling.default_tiling`) the overlap covers the model's halo
    on both sides, so blending only uses each tile's trustworthy interior, and the tile is
    the one that predicts the fewest pixels for the scene.

    Raises:
        OptionError: a tile that is not a multiple of the model's stride, an overlap not
            smaller than the tile.
    """
    stride = info.stride
    if options.overlap is None:
        tile, overlap = default_tiling(info.tile_size, info.halo, stride, height, width, options.tile)
    else:
        overlap = options.overlap
        tile = (
            options.tile
            if options.tile is not None
            else max(info.tile_size, -(-(options.overlap + stride) // stride) * stride)
        )
    check_options(tile, overlap, 1, stride)
    return tile, overlap


def polygon_formats(formats: tuple[PolygonFormat, ...] | None, pixel_coords: bool) -> tuple[PolygonFormat, ...]:
    """The polygon formats for a scene with (False) or without (True) real coordinates.

    Raises:
        OptionError: GeoJSON asked for a scene in pixel coordinates.
    """
    if formats is None:
        return ("gpkg",) if pixel_coords else ("geojson",)
    if pixel_coords and "geojson" in formats:
        raise OptionError(
            "--formats geojson: GeoJSON needs real coordinates (EPSG:4326) and this scene is in "
            "pixel coordinates; use --formats gpkg or parquet"
        )
    return tuple(formats)


def _warn_seams(info: ModelInfo, tiles: int, overlap: int) -> None:
    """One warning line when more than one tile overlaps by less than twice the model's halo."""
    if info.halo is not None and tiles > 1 and overlap <= 2 * info.halo:
        log.warning(
            "tiles overlap by %d px but this model's predictions change up to %d px from a tile's edge: "
            "tile seams may show; use --overlap %d or more (a larger --tile keeps the cost down), or "
            "leave both to their defaults",
            overlap,
            info.halo,
            2 * info.halo + 16,
        )


def _open(scene: Any, opts: SegmentOptions) -> Scene:
    import rasterio.io

    if isinstance(scene, Scene):
        if opts.nodata is not None and opts.nodata != scene.nodata:
            kind = "nodata" if scene.mask_kind in ("none", "nodata") else scene.mask_kind
            scene = dataclasses.replace(scene, nodata=float(opts.nodata), mask_kind=kind)
        if scene.crs is None and not opts.pixel_coords:
            raise SceneError(
                f"scene {scene.name} has no CRS; it looks like an image without georeferencing; "
                "pass --pixel-coords to segment it in pixel coordinates"
            )
        return scene if opts.bands is None else scene.select_bands(opts.bands)
    if isinstance(scene, rasterio.io.DatasetReaderBase):
        # An open dataset (a file, or a MemoryFile's /vsimem/ name): reopened by name, so
        # the reader threads get handles of their own.
        scene = scene.name
    return open_scene(scene, pixel_coords=opts.pixel_coords, nodata=opts.nodata, bands=opts.bands)


def _load(model: str | Path | SegmentationModel, opts: SegmentOptions) -> SegmentationModel:
    if isinstance(model, SegmentationModel):
        if opts.backend == "torch" and model.backend != "torch":
            raise OptionError("--backend torch: this model is an ONNX graph, which runs with onnxruntime")
        if opts.backend == "onnxruntime" and model.backend != "onnxruntime":
            from geovae.model.onnx_export import to_onnxruntime

            model = to_onnxruntime(model, opts.precision or "auto")
        return model if opts.precision is None else model.with_precision(opts.precision)
    from geovae.model.io import load_model

    return load_model(model, opts.device, precision=opts.precision or "auto", backend=opts.backend)


def resolve(
    scene: Any,
    model: str | Path | SegmentationModel,
    options: SegmentOptions,
    rows: tuple[int, int] | None = None,
    *,
    check_trust: bool = True,
) -> RunSpec:
    """Every check of a run, before any output is written; the run's :class:`RunSpec`.

    Args:
        scene: a path/URL, an open :class:`~geovae.scene.Scene` or an open rasterio dataset.
        model: a model file or a :class:`~geovae.model.base.SegmentationModel`.
        options: the run's options.
        rows: ``(start, stop)`` scene rows to write (on the output block grid); None for all.
        check_trust: compare the scene with the model's training data (skipped when the
            outputs are assembled from bands that were checked already).

    Raises:
        OptionError, SceneError, ModelFileError, ModelMismatchError: as
            :func:`~geovae.segment.segment_scene` documents.
    """
    sc = _open(scene, options)
    formats = polygon_formats(options.formats, sc.crs is None)
    model_path = None if isinstance(model, SegmentationModel) else str(model)
    m = _load(model, options)
    info = m.info
    if sc.count != info.in_channels:
        raise ModelMismatchError(band_mismatch(sc.name, sc.count, info, options.bands is not None))
    if options.reconstruction and not m.supports_reconstruction:
        raise ModelMismatchError("this model has no reconstruction decoder; drop --reconstruction")
    threshold = anomaly_threshold(info) if m.supports_reconstruction else None
    reconstruction = options.reconstruction if options.reconstruction is not None else threshold is not None
    tile, overlap = tiling(options, info, sc.height, sc.width)
    grid = TileGrid(sc.height, sc.width, tile, overlap, margin=info.halo)
    _warn_seams(info, len(grid), overlap)
    blocks = BlockGrid(grid, options.block_size, rows)
    if rows is not None and options.quicklook:
        raise OptionError("rows: a quicklook shows the whole scene; pass quicklook=False with rows")
    trust = trust_findings(sc, info, force=options.force, check=check_trust)
    if reconstruction and threshold is not None:
        trust["anomaly"] = {"threshold": threshold, "quantile": "0.995 of the training pixels' reconstruction error"}
    from geovae.objects import plan_objects, stitch_channels

    objects = plan_objects(options, info, formats, object_maps=m.supports_object_maps)
    channels, tags = stitch_channels(objects, info) if objects is not None else ([], None)
    counted = threshold if reconstruction else None
    rasters = RasterSpec.of_run(
        sc.stem,
        info,
        width=sc.width,
        rows=blocks.rows,
        crs=sc.crs,
        transform=sc.transform,
        uncertainty=options.samples > 0,
        reconstruction=reconstruction,
        anomaly_threshold=counted,
        probabilities=channels,
        probability_tags=tags,
        object_maps=objects.maps if objects is not None else (),
    )
    kinds = run_kinds(rasters.kinds, formats, quicklook=options.quicklook, objects=objects is not None)
    batch_size = options.batch_size if options.batch_size is not None else default_batch_size(tile)
    return RunSpec(
        scene=sc,
        model=m,
        model_path=model_path,
        options=options,
        grid=grid,
        blocks=blocks,
        batch_size=batch_size,
        formats=formats,
        samples=options.samples,
        reconstruction=reconstruction,
        anomaly_threshold=counted,
        objects=objects,
        probabilities=tuple(channels),
        rasters=rasters,
        kinds=tuple(kinds),
        trust=trust,
    )
