"""A segmentation run, assembled in one place: checks, a block source, its sinks, commit.

:func:`segment_scene` checks everything first (options, scene, model, band count, valid
data, whether the scene looks like the training data, that no output would replace an
input), then streams: a background thread reads tiles in the blocks' order
(:mod:`geovae.segment.reader`), the main thread runs the model and blends the outputs into
blocks (:mod:`geovae.blend`), and each block goes, as soon as it is complete, to every sink:
the rasters, the statistics, the polygons traced while the model runs, the objects
(:mod:`geovae.sinks`). Then the sinks are closed, a quicklook drawn and the report and STAC
Item written. Every file goes into the run's :class:`~geovae.atomic.OutputSet` and the set
is moved into place at the end, the report last; a failed or interrupted run aborts every
sink and leaves the previous outputs as they were.

:func:`segment_rows` and :func:`assemble_rows` are the two halves of one huge scene spread
over several machines (:mod:`geovae.batch`): row bands segmented on the scene's own tile
grid, then read back block by block (:mod:`geovae.segment.assemble`) through the same run
skeleton and sinks, into the same outputs a single run writes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from geovae import signals
from geovae.atomic import OutputSet, check_name_lengths, check_not_inputs, check_output_dir, write_text
from geovae.blocks import Block
from geovae.errors import OptionError
from geovae.heap import tune_heap
from geovae.model.base import SegmentationModel
from geovae.objects import pixel_area
from geovae.products import RASTER_KINDS, class_table, output_name
from geovae.scene import Scene, capped_gdal_cache
from geovae.segment.assemble import RowBands, split_entry
from geovae.segment.options import SegmentOptions
from geovae.segment.predict import PredictedBlocks, blender, buffering
from geovae.segment.progress import Progress, set_total
from geovae.segment.report import build_report
from geovae.segment.spec import RunSpec, resolve
from geovae.segment.trust import WARN_FLAGGED
from geovae.segment.writers import model_sha256, objects_entry, write_stac, write_styles
from geovae.sinks.objects import ObjectSink
from geovae.sinks.rasters import RasterFiles, RasterSink
from geovae.sinks.statistics import Statistics, StatisticsSink
from geovae.sources.stack import StackedSource

__all__ = ["SegmentResult", "assemble_rows", "segment_rows", "segment_scene"]

log = logging.getLogger("geovae.segment")

#: Upper bound of GDAL's block cache during a run (bytes). A 512 MiB cache fills while
#: overviews are built: +111 MiB from 2048² to 8192² and most of the growth to 20480². At 16
#: MiB instead of 32, with the smaller queues of a CPU run (:func:`~geovae.segment.predict.buffering`),
#: a long scene peaks lower and the 3.8 MP Parana scene the same (docs/benchmarks.md, issue 29).
GDAL_CACHE_BYTES = 16 * 2**20


@dataclass
class SegmentResult:
    """What a segmentation run wrote.

    Attributes:
        outputs: final paths keyed by kind (``classes``, ``confidence``, ``uncertainty``,
            ``reconstruction_error``, ``geojson``/``gpkg``/``parquet``, ``quicklook``, ``report``).
        report: the run report (also written as ``<stem>.json``).
    """

    outputs: dict[str, Path] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)

    def polygons(self) -> Any:
        """The run's polygons as a ``geopandas.GeoDataFrame`` (read from its GeoPackage,
        GeoParquet or GeoJSON output, in that order of preference).

        Raises:
            OptionError: the run wrote no polygons.
        """
        import geopandas as gpd

        for kind in ("gpkg", "parquet", "geojson"):
            if kind in self.outputs:
                p = Path(self.outputs[kind])
                if kind == "parquet":
                    return gpd.read_parquet(p)
                # the GeoPackage also holds QGIS's layer_styles table: read the polygon layer
                layer = p.name[: -len(".gpkg")] if kind == "gpkg" else None
                return gpd.read_file(p, engine="pyogrio", layer=layer)
        raise OptionError("this run wrote no polygons; run it with formats such as ('gpkg',)")

    def to_xarray(self, chunks: Any = True) -> Any:
        """The run's rasters as one lazy ``xarray.Dataset`` (rioxarray over the COGs).

        Variables on the scene's ``y``/``x`` grid (with its CRS as ``spatial_ref``):
        ``classes`` (uint8, nodata 255; CF ``flag_values``/``flag_meanings`` name the
        classes), ``confidence``, and where the run wrote them ``uncertainty`` (predictive
        entropy, band 1), ``mutual_information`` (band 2) and ``reconstruction_error``. Nothing
        is read until computed: each variable is a dask array.

        Args:
            chunks: passed to ``rioxarray.open_rasterio`` (True: dask's automatic chunks, aligned on
                the files' 256 x 256 blocks).

        Returns:
            The ``xarray.Dataset``.
        """
        import rioxarray
        import xarray as xr

        names = {
            "classes": ["classes"],
            "confidence": ["confidence"],
            "uncertainty": ["uncertainty", "mutual_information"],
            "reconstruction_error": ["reconstruction_error"],
        }
        variables = {}
        for kind, vnames in names.items():
            if kind not in self.outputs:
                continue
            da = rioxarray.open_rasterio(self.outputs[kind], chunks=chunks, masked=False, lock=False)
            # a GeoTIFF without subdatasets opens as one DataArray
            assert isinstance(da, xr.DataArray)
            for b, vname in enumerate(vnames):
                v = da.isel(band=b, drop=True)
                v.name = vname
                variables[vname] = v
        if "classes" in variables:
            model = self.report.get("model", {})
            variables["classes"].attrs.update(
                flag_values=list(model.get("class_ids", [])),
                flag_meanings=" ".join(n.strip().replace(" ", "_") for n in model.get("class_names", [])),
            )
        return xr.Dataset(variables)


def _previous_outputs(folder: Path, stem: str) -> list[str]:
    """Names of the files an earlier run's report in ``folder`` lists (to remove stale ones)."""
    try:
        doc = json.loads((folder / output_name(stem, "report")).read_text())
        outs = doc["outputs"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    names = []
    for v in outs.values() if isinstance(outs, dict) else []:
        p = Path(str(v))
        if p.is_absolute() and p.parent.resolve() != folder.resolve():
            continue  # not in this folder: not part of this set
        if p.name.startswith(f"{stem}."):
            names.append(p.name)
            names += [p.name + side for side in (".aux.xml", ".ovr", ".msk") if (folder / (p.name + side)).exists()]
    return names


class _BlockSource(Protocol):
    """What the run skeleton streams: blocks in write order, and the report's tile counts."""

    def __iter__(self) -> Generator[Block]: ...

    def summary(self) -> dict[str, Any]: ...


def _polygon_sink(spec: RunSpec, oset: OutputSet) -> Any:
    """The class polygons (:class:`~geovae.vector.PolygonStream`), traced from each block as
    the rasters are written; the class table comes from the model."""
    from geovae.vector import LayerOptions, PolygonStream

    s, info = spec.scene, spec.info
    if not spec.blocks.whole_scene:
        raise ValueError("polygons are written for whole scenes only")
    return PolygonStream(
        LayerOptions(
            targets=tuple(
                (oset.final(output_name(spec.stem, f)), oset.path(output_name(spec.stem, f))) for f in spec.formats
            ),
            width=s.width,
            height=s.height,
            crs=s.crs,
            transform=s.transform,
            block=spec.blocks.side,
            min_area=spec.options.min_area,
            simplify=spec.options.simplify,
            layer=spec.stem,
        ),
        classes=class_table(info.class_ids, info.class_names, info.class_colors),
        confidence=True,
        uncertainty=spec.samples > 0,
        anomaly_threshold=spec.anomaly_threshold,
        queue_blocks=buffering(spec.model.device).polygon_blocks,
    )


def _open_sinks(spec: RunSpec, oset: OutputSet) -> dict[str, Any]:
    """Every sink of the run, in the order they are fed and closed; on an error the sinks
    already open are aborted."""
    sinks: dict[str, Any] = {}
    try:
        statistics = StatisticsSink(spec.info, spec.scene.crs, spec.scene.transform, spec.anomaly_threshold)
        sinks["rasters"] = RasterSink(oset, spec.rasters, list(spec.blocks.windows()), statistics.pixels)
        sinks["statistics"] = statistics
        if spec.formats:
            sinks["polygons"] = _polygon_sink(spec, oset)
        if spec.objects is not None:
            opts = spec.options
            sinks["objects"] = ObjectSink(
                oset,
                spec.stem,
                spec.objects,
                spec.formats,
                min_area=spec.objects.min_object_area(opts.min_area, pixel_area(spec.scene.crs, spec.scene.transform)),
                simplify=opts.simplify,
                block_size=opts.block_size,
            )
    except BaseException:
        _abort(sinks)
        raise
    return sinks


def _abort(sinks: dict[str, Any]) -> None:
    for sink in reversed(sinks.values()):
        sink.abort()


#: How a sink's close shows progress and is timed: bar label, bar unit, timing key.
_CLOSING = {
    "rasters": ("COGs", "MiB", "rasters_close_s"),
    "polygons": ("polygons", "block rows", "vectorize_s"),
    "objects": ("objects", "block rows", "objects_s"),
}


def _close(spec: RunSpec, timings: dict[str, float], name: str, sink: Any) -> Any:
    """Close one sink, with a progress bar for the slow ones; its result."""
    if name not in _CLOSING:
        return sink.close()
    label, unit, key = _CLOSING[name]
    t0 = time.perf_counter()
    with Progress(1, spec.options.progress, f"{label} {spec.stem}", unit=unit) as bar:
        if name == "rasters":
            # The COG copies (overviews included) take a minute or more on a 20k scene: a bar
            # in MiB, rounded up so a small scene still ends at 1/1.
            seen = [1]

            def progress(done: int, total: int) -> None:
                seen[0] = max(1, -(-total >> 20))
                set_total(bar, min(seen[0], -(-done >> 20)), seen[0])

            result = sink.close(progress=progress)
            set_total(bar, seen[0], seen[0])
        else:
            result = sink.close(progress=lambda done, total: set_total(bar, done, total))
    timings[key] = time.perf_counter() - t0
    stem, took = spec.stem, timings[key]
    if name == "rasters":
        log.info("%s: rasters closed (overviews built, COGs written) in %.1f s", stem, took)
    elif name == "polygons":
        log.info("%s: %d polygons written, %.1f s after the rasters", stem, result.n_polygons, took)
    else:
        log.info("%s: %d objects written in %.1f s", stem, result.n_objects, took)
    return result


def _run(
    spec: RunSpec,
    oset: OutputSet,
    source: _BlockSource,
    timings: dict[str, float],
    t_start: float,
    extra: dict[str, Any] | None = None,
) -> SegmentResult:
    """The one run skeleton: open the sinks, stream the source's blocks into every sink in
    order, close the sinks, then quicklook, styles, report and STAC Item, and commit the set.
    On any error (an interrupt included) every sink is aborted; the caller's ``with oset``
    then removes the staged files."""
    sinks = _open_sinks(spec, oset)
    try:
        with contextlib.closing(iter(source)) as blocks:
            for block in blocks:
                signals.check()
                for sink in sinks.values():
                    sink.add(block)
        results = {name: _close(spec, timings, name, sink) for name, sink in sinks.items()}
        return _finish(spec, oset, results, source.summary(), timings, t_start, extra)
    except BaseException:
        _abort(sinks)
        raise


def _finish(
    spec: RunSpec,
    oset: OutputSet,
    results: dict[str, Any],
    tiles: dict[str, Any],
    timings: dict[str, float],
    t_start: float,
    extra: dict[str, Any] | None,
) -> SegmentResult:
    """Quicklook, styles, report and STAC Item into the set, from the sinks' results; commit it."""
    opts, info, stem = spec.options, spec.info, spec.stem
    rasters: RasterFiles = results["rasters"]
    statistics: Statistics = results["statistics"]
    polygons: dict[str, int] = {}
    if "polygons" in results:
        polygons = dict.fromkeys(spec.formats, results["polygons"].n_polygons)
    if "objects" in results:
        extra = {**(extra or {}), "objects": objects_entry(spec, results["objects"])}
    if opts.quicklook:
        t0 = time.perf_counter()
        from geovae.quicklook import write_quicklook

        write_quicklook(spec.scene, rasters.staged["classes"], oset.path(output_name(stem, "quicklook")), info)
        timings["quicklook_s"] = time.perf_counter() - t0
        log.info("%s: quicklook drawn in %.1f s", stem, timings["quicklook_s"])
    write_styles(spec, oset, list(rasters.paths))
    timings["total_s"] = time.perf_counter() - t_start
    kinds = list(spec.kinds)
    outputs = {k: oset.final(output_name(stem, k)) for k in kinds}
    report = build_report(
        scene=spec.scene,
        model=spec.model,
        source=spec.model_path,
        model_sha256=model_sha256(spec.model_path),
        options=spec.report_options(),
        tiles=tiles,
        timings=timings,
        class_pixels=statistics.class_pixels,
        class_area=statistics.class_area,
        class_flagged=statistics.class_flagged,
        area_unit=statistics.area_unit,
        trust=dict(spec.trust),
        outputs=outputs,
        folder=oset.folder,
        polygons=polygons,
        extra=extra,
    )
    write_text(oset.path(output_name(stem, "report")), json.dumps(report, indent=2, default=str))
    t0 = time.perf_counter()
    write_stac(spec, oset, report, statistics, rasters.checksums)
    log.info("%s: STAC item written in %.1f s", stem, time.perf_counter() - t0)
    names = [output_name(stem, k) for k in kinds]
    oset.commit(names[:-1], last=names[-1], remove=_previous_outputs(oset.folder, stem))
    _warn_anomalies(report)
    return SegmentResult(outputs=outputs, report=report)


def _warn_anomalies(report: dict[str, Any]) -> None:
    a = report.get("trust", {}).get("anomaly", {})
    frac = a.get("fraction")
    if frac is not None and frac > WARN_FLAGGED:
        log.warning(
            "%.0f%% of %s's pixels are unlike the model's training data (reconstruction error above the "
            "training's 99.5th percentile); the classes there are unreliable, see the reconstruction-error "
            "raster and the polygons' anomaly_fraction",
            100 * frac,
            Path(report["scene"]["path"]).name,
        )


def _run_set(spec: RunSpec, out_dir: str | Path) -> OutputSet:
    """The run's output set, after checking that no output would replace an input."""
    folder = check_output_dir(out_dir, create=False)
    inputs = [*spec.scene.local_files, spec.model_path]
    names = [output_name(spec.stem, k) for k in spec.kinds]
    oset = OutputSet(folder, spec.stem, inputs=inputs)
    # Names are measured in bytes before anything is made: a long scene name failed with
    # `[Errno 36] File name too long` after the folder was created.
    check_name_lengths(folder, names)
    check_name_lengths(folder, [oset.staging.name, oset.lock_path.name], margin=0)
    check_not_inputs([folder / n for n in names], inputs)
    return oset


def _segment(
    scene: Any,
    model: str | Path | SegmentationModel,
    options: SegmentOptions,
    out_dir: str | Path,
    source: Callable[[RunSpec, dict[str, float]], _BlockSource],
    *,
    rows: tuple[int, int] | None = None,
    check_trust: bool = True,
    extra: dict[str, Any] | None = None,
) -> SegmentResult:
    """Resolve the run, open its output set, and run ``source(spec, timings)``'s blocks
    through the skeleton (:func:`_run`); the scene's handle is closed at the end."""
    t_start = time.perf_counter()
    # Blocks, tiles and batches of a few MiB freed again and again would otherwise stay on
    # malloc's heaps, a share that grows with the scene's area; and the heaps are shared by
    # the threads started from here on (torch's among them), not one each (geovae.heap).
    tune_heap()
    spec = resolve(scene, model, options, rows, check_trust=check_trust)
    timings = {"validate_s": time.perf_counter() - t_start}
    oset = _run_set(spec, out_dir)
    # GDAL's block cache defaults to 5 % of RAM and would keep written output blocks and
    # read scene blocks up to that: cap it so memory stays bounded on big machines too.
    with capped_gdal_cache(GDAL_CACHE_BYTES), oset:
        try:
            return _run(spec, oset, source(spec, timings), timings, t_start, extra)
        finally:
            spec.scene.close()


# -- the public entry points ------------------------------------------------------------------


def segment_scene(
    scene: str | Path | Scene | Any,
    model: str | Path | SegmentationModel,
    out_dir: str | Path,
    options: SegmentOptions | None = None,
    *,
    rows: tuple[int, int] | None = None,
    **kwargs: Any,
) -> SegmentResult:
    """Segment a scene of any size into class, confidence and uncertainty rasters and polygons.

    Memory stays bounded by tile, batch and block size whatever the scene's size: tiles are
    read lazily, blended into output blocks, and each block is written once complete. The
    outputs appear together when the run succeeds; a failed run leaves the folder as it was.

    Args:
        scene: a path/URL (opened with :func:`geovae.scene.open_scene`), an open
            :class:`~geovae.scene.Scene`, or an open rasterio dataset.
        model: a model file (loaded with ``geovae.model.io.load_model``) or a :class:`SegmentationModel`.
        out_dir: output folder (created once every check has passed).
        options: a :class:`~geovae.segment.options.SegmentOptions`; keyword arguments
            (``tile=256, samples=8, ...``, the same names) override its fields.
        rows: ``(start, stop)``: segment only these scene rows, which must lie on the output
            block grid (multiples of :func:`geovae.blend.block_side`, or the scene's height).
            The outputs then cover just those rows (transform shifted) and equal the same rows
            of a whole-scene run bit for bit: the tiles touching them run on the scene's own
            tile grid. Used to spread one scene over several machines (no quicklook then).

    Returns:
        The :class:`SegmentResult` with output paths and the run report.

    Raises:
        OptionError: an option is out of range (tile, overlap, batch size, formats...).
        OutputError: the output folder is a file or cannot be written, an output would
            replace an input, another run is writing the same outputs, or the disk is full.
        SceneError: the scene is missing, unreadable, not georeferenced, or all nodata.
        CorruptSceneError: a tile of the scene cannot be decoded (raised while streaming;
            nothing is left under a final name).
        ModelFileError: the model file cannot be loaded.
        ModelMismatchError: the scene's band count differs from the model's, the model lacks
            an output asked for, or the scene lies far outside the model's training data.
    """
    opts = SegmentOptions.from_kwargs(options, **kwargs)
    return _segment(
        scene, model, opts, out_dir, lambda spec, timings: PredictedBlocks(spec, blender(spec), timings), rows=rows
    )


def segment_rows(
    scene: str | StackedSource,
    model: str | Path | SegmentationModel,
    out_dir: str | Path,
    rows: tuple[int, int],
    options: SegmentOptions,
) -> dict[str, Any]:
    """Segment rows ``start:stop`` of a scene into rasters in ``out_dir`` (one band of a split run).

    :func:`segment_scene` with ``rows``, without polygons or quicklook.

    Returns:
        ``{"rasters": {kind: path}, "tiles": tile counts}``.
    """
    res = segment_scene(scene, model, out_dir, options.replace(formats=(), quicklook=False, progress=False), rows=rows)
    return {"rasters": {k: str(v) for k, v in res.outputs.items() if k in RASTER_KINDS}, "tiles": res.report["tiles"]}


def assemble_rows(
    scene: str | StackedSource,
    model: str | Path | SegmentationModel,
    out_dir: str | Path,
    bands: list[tuple[int, int]],
    parts: list[dict[str, Any]],
    options: SegmentOptions,
) -> SegmentResult:
    """Join the row bands of :func:`segment_rows` into a scene's final outputs, as one run writes them.

    The band rasters are read back block by block (:class:`~geovae.segment.assemble.RowBands`)
    into the same sinks a single run feeds (same creation options, tags, overviews, class
    areas and polygons), then the quicklook and report are written and the set committed.

    Args:
        bands: ``(start, stop)`` rows of each band, top to bottom.
        parts: what :func:`segment_rows` returned for each band.
    """
    return _segment(
        scene,
        model,
        options.replace(progress=False),
        out_dir,
        lambda spec, timings: RowBands(spec.blocks, bands, parts),
        check_trust=False,
        extra={"split": split_entry(bands, parts)},
    )
