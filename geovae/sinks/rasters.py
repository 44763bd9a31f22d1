"""The raster sink: a run's blocks into Cloud Optimized GeoTIFFs.

Outputs (names, profiles and tags from :mod:`geovae.products`) are COGs: 256 x 256 tiles,
ZSTD with a predictor, overviews, same CRS/transform/shape as the scene. A COG keeps its
overviews' tiles before the full-resolution ones, which a file written block by block
cannot: so the blocks stream into a tiled GeoTIFF in the run's staging folder
(:meth:`~geovae.atomic.OutputSet.scratch`, fast ZSTD level), and :meth:`RasterSink.close`
has GDAL's COG driver copy it into the output, building the overviews on the way (mode for
classes, average for the rest), block by block in GDAL's capped cache, so memory stays flat
with the scene's size. The scratch file is removed after the copy. Every output is written
into the run's :class:`~geovae.atomic.OutputSet` and moved into place with the rest of the run:

* ``<stem>.classes.tif``: uint8 class ids, nodata **255** (so class ids must be 0..254), a
  colour table, class names as ``CLASS_<id>`` tags and a ``CLASSES`` JSON tag, and the
  ``.aux.xml`` sidecar with GDAL's category names and attribute table;
* ``<stem>.confidence.tif``: float32 max blended probability, nodata NaN;
* ``<stem>.uncertainty.tif`` (with samples): band 1 predictive entropy of the blended mean
  probabilities (nats), band 2 mutual information (predictive entropy minus the blended
  expected entropy, clipped at 0), nodata NaN;
* ``<stem>.reconstruction-error.tif`` (with reconstruction): float32, nodata NaN;
* ``<stem>.object-probability.tif`` (with ``--objects``): one float32 band per object class
  and the boundary class, then, from a model with object heads, the object extent and the
  distance to the object's outline (0..1 each; tag ``OBJECT_MAPS``), nodata NaN.

Each file's SHA-256 is computed once, right after it is written, for the STAC Item.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import rasterio
import rasterio.shutil
from affine import Affine
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window

from geovae import signals
from geovae.atomic import OutputSet, disk_full_error, is_disk_full, sha256
from geovae.blocks import Block
from geovae.model.base import ModelInfo
from geovae.products import (
    BAND_DESCRIPTIONS,
    cog_options,
    output_name,
    raster_profile,
    uncertainty_tags,
    write_class_table,
)
from geovae.styles import write_class_aux

#: Band descriptions of the object maps in the object-probability raster.
MAP_DESCRIPTIONS = {
    "extent": "object extent (0..1)",
    "distance": "distance to the object's outline, normalised per object (0..1)",
}

__all__ = ["RasterFiles", "RasterSink", "RasterSpec", "cog_threads", "write_cog"]


def write_cog(src: str | Path, dst: str | Path, kind: str, *, overviews: bool = True) -> Path:
    """Copy a tiled GeoTIFF into a Cloud Optimized GeoTIFF of output raster ``kind``.

    GDAL's COG driver builds the overviews (:func:`geovae.products.overview_resampling`) into
    a temporary file next to ``dst`` and writes the COG block by block, all through GDAL's
    block cache (capped during a run), so memory does not grow with the raster. The colour
    table, nodata, tags and band descriptions are copied.

    Args:
        src: the tiled GeoTIFF (a run's scratch file).
        dst: the COG to write.
        kind: one of :data:`geovae.products.RASTER_KINDS`.
        overviews: give the COG overviews.

    Returns:
        ``dst``.
    """
    with warnings.catch_warnings(), _gdal_warnings_if_it_succeeds():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        rasterio.shutil.copy(
            str(src), str(dst), driver="COG", **cog_options(kind, overviews=overviews, threads=cog_threads())
        )
    return Path(dst)


class _HoldRecords(logging.Filter):
    """Holds back the records one thread logs (other threads' pass)."""

    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.get_ident()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.thread != self.thread:
            return True
        self.held.append(record)
        return False


@contextlib.contextmanager
def _gdal_warnings_if_it_succeeds() -> Iterator[None]:
    """GDAL's warnings (through rasterio's logger) from the block, logged only if it succeeds.

    A write that fails (a full disk) makes GDAL warn about what it could not do on the way
    ("A strile cannot be rewritten in place"), which the error that follows explains: the
    user gets that one line, not the warnings around it.
    """
    logger = logging.getLogger("rasterio._env")
    hold = _HoldRecords()
    logger.addFilter(hold)
    try:
        yield
    finally:
        logger.removeFilter(hold)
    for record in hold.held:
        logger.handle(record)


def cog_threads() -> int | None:
    """Threads for the COG copy's compression: the run's CPU budget, torch's thread count
    (which ``OMP_NUM_THREADS`` or ``torch.set_num_threads`` set), since the copy runs after
    the model has finished with those cores; on 2 cores that halves the copy of a 2048² run's
    two COGs against one thread. No more than the cores other processes leave free
    (:func:`geovae.cpu.helper_threads`: another run's model, say). None when the user set
    GDAL's own ``GDAL_NUM_THREADS``, which GDAL then applies."""
    import os

    import rasterio.env
    import torch

    if os.environ.get("GDAL_NUM_THREADS") or (rasterio.env.hasenv() and "GDAL_NUM_THREADS" in rasterio.env.getenv()):
        return None
    from geovae.cpu import helper_threads

    return helper_threads(torch.get_num_threads())


class _CopyWatch:
    """Report the bytes a GDAL copy into ``dst`` has written so far, from a thread, about
    twice a second; does nothing without ``report``."""

    def __init__(self, dst: Path, report: Callable[[int], None] | None, every: float = 0.5):
        self.files = [dst, dst.with_name(dst.name + ".ovr.tmp")]
        self.report, self.every = report, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _size(self) -> int:
        n = 0
        for f in self.files:
            with contextlib.suppress(OSError):
                n += f.stat().st_size
        return n

    def _run(self) -> None:
        assert self.report is not None
        while not self._stop.wait(self.every):
            self.report(self._size())

    def __enter__(self) -> _CopyWatch:
        if self.report is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


@dataclass(frozen=True)
class RasterSpec:
    """What a run's rasters are: their kinds, grid, band names and tags, resolved once.

    Attributes:
        stem: output name stem.
        kinds: the raster kinds written, in writing order.
        info: the model description (the class table comes from it).
        width: the scene's width.
        rows: ``(start, stop)`` scene rows the rasters cover.
        crs: CRS of the outputs (None in pixel-coordinate mode).
        transform: the scene's geotransform (the rasters' is shifted to ``rows``).
        bands: band descriptions per kind.
        tags: dataset tags per kind, besides the class table of ``classes``.
        overviews: give the COGs overviews.
    """

    stem: str
    kinds: tuple[str, ...]
    info: ModelInfo
    width: int
    rows: tuple[int, int]
    crs: Any
    transform: Affine
    bands: Mapping[str, tuple[str, ...]]
    tags: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    overviews: bool = True

    @classmethod
    def of_run(
        cls,
        stem: str,
        info: ModelInfo,
        *,
        width: int,
        rows: tuple[int, int],
        crs: Any,
        transform: Affine,
        uncertainty: bool = False,
        reconstruction: bool = False,
        anomaly_threshold: float | None = None,
        probabilities: Sequence[int] = (),
        probability_tags: Mapping[str, str] | None = None,
        object_maps: Sequence[str] = (),
        overviews: bool = True,
    ) -> RasterSpec:
        """The rasters of a run: ``classes`` and ``confidence`` always, the others as asked.

        Args:
            uncertainty: write ``uncertainty`` (its ``MAX_ENTROPY`` tag from the class count).
            reconstruction: write ``reconstruction_error``.
            anomaly_threshold: with ``reconstruction``, recorded as its ``ANOMALY_THRESHOLD`` tag.
            probabilities: model channels of ``object_probability``, one band each; empty for none.
            probability_tags: that raster's tags (:func:`geovae.objects.probability_tags`).
            object_maps: the object maps that raster holds after the probabilities
                (:data:`~geovae.objects.OBJECT_MAPS`), one band each.
        """
        kinds = ["classes", "confidence"] + ["uncertainty"] * uncertainty + ["reconstruction_error"] * reconstruction
        kinds += ["object_probability"] * bool(probabilities)
        bands = {k: BAND_DESCRIPTIONS[k] for k in kinds}
        tags: dict[str, dict[str, str]] = {}
        if probabilities:
            bands["object_probability"] = tuple(f"probability of {info.class_names[c]}" for c in probabilities) + tuple(
                MAP_DESCRIPTIONS[m] for m in object_maps
            )
            tags["object_probability"] = dict(probability_tags or {})
        if uncertainty:
            tags["uncertainty"] = uncertainty_tags(info.num_classes)
        if reconstruction and anomaly_threshold is not None:
            tags["reconstruction_error"] = {"ANOMALY_THRESHOLD": repr(float(anomaly_threshold))}
        return cls(stem, tuple(kinds), info, width, rows, crs, transform, bands, tags, overviews)

    @property
    def height(self) -> int:
        return self.rows[1] - self.rows[0]

    def name(self, kind: str) -> str:
        """The file name of raster ``kind``."""
        return output_name(self.stem, kind)

    def profile(self, kind: str) -> dict[str, Any]:
        """Creation options of the scratch GeoTIFF of raster ``kind``."""
        return raster_profile(
            kind,
            width=self.width,
            height=self.height,
            crs=self.crs,
            transform=self.transform @ Affine.translation(0, self.rows[0]),
            stream=True,
            count=len(self.bands[kind]),
        )

    def band_info(self, kind: str) -> list[dict[str, Any]]:
        """Each band's data type, nodata, description and resolution, as the STAC raster
        extension names them (what the written file would say, without opening it)."""
        prof = self.profile(kind)
        nodata = prof["nodata"]
        out = []
        for text in self.bands[kind]:
            band: dict[str, Any] = {
                "data_type": prof["dtype"],
                "nodata": "nan" if math.isnan(nodata) else float(nodata),
            }
            if self.crs is not None:
                band["spatial_resolution"] = abs(self.transform.a)
            if text:
                band["name"] = text
            out.append(band)
        return out


@dataclass
class RasterFiles:
    """What a :class:`RasterSink` wrote.

    Attributes:
        paths: final path of each raster, by kind (they appear when the run commits).
        staged: where each file is now, in the set's staging folder, by kind (``classes_aux``
            for the class raster's sidecar).
        checksums: SHA-256 (hex) of each staged file, by kind.
    """

    paths: dict[str, Path]
    staged: dict[str, Path]
    checksums: dict[str, str]


class RasterSink:
    """The rasters of a run, written block by block, copied into COGs when closed.

    Args:
        output_set: the run's open :class:`~geovae.atomic.OutputSet`.
        spec: what the rasters are.
        windows: the output blocks in write order (:meth:`geovae.blend.BlockGrid.windows`):
            each block fed must be the next of them, and every one must be fed.
        class_pixels: called at close for the pixels of each class (the class sidecar's
            histogram; :class:`~geovae.sinks.statistics.StatisticsSink` counts them).
    """

    def __init__(
        self,
        output_set: OutputSet,
        spec: RasterSpec,
        windows: Sequence[Window],
        class_pixels: Callable[[], Sequence[int]],
    ):
        self.output_set = output_set
        self.spec = spec
        self.windows = list(windows)
        self.class_pixels = class_pixels
        self.blocks_written = 0
        self._datasets: dict[str, Any] = {}
        self._closed = False
        try:
            for kind in spec.kinds:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", NotGeoreferencedWarning)
                    ds = rasterio.open(output_set.scratch(spec.name(kind)), "w", **spec.profile(kind))
                self._datasets[kind] = ds
                if kind == "object_probability":
                    ds.update_tags(**spec.tags[kind])
                for b, text in enumerate(spec.bands[kind], start=1):
                    ds.set_band_description(b, text)
        except Exception:
            self.abort()
            raise
        info = spec.info
        write_class_table(self._datasets["classes"], info.class_ids, info.class_names, info.class_colors)
        for kind in ("uncertainty", "reconstruction_error"):
            if kind in self._datasets and kind in spec.tags:
                self._datasets[kind].update_tags(**spec.tags[kind])

    def add(self, block: Block) -> None:
        """Write one block (window in scene coordinates) into every raster.

        Raises:
            ValueError: the block is not the next output block, or lacks a raster's values.
        """
        n = self.blocks_written
        win = block.window
        if n >= len(self.windows) or win != self.windows[n]:
            expected = self.windows[n] if n < len(self.windows) else "none (all were written)"
            raise ValueError(f"{win} is not an output block in write order; expected {expected}")
        missing = set(self._datasets) - set(block.arrays)
        if missing:
            raise ValueError(f"a block needs every output; missing {sorted(missing)}")
        file_win = Window(win.col_off, win.row_off - self.spec.rows[0], win.width, win.height)
        for kind, ds in self._datasets.items():
            ds.write(block.arrays[kind], window=file_win)
        self.blocks_written += 1

    def close(self, progress: Callable[[int, int], None] | None = None) -> RasterFiles:
        """Copy each raster into a COG (and write the class sidecar) in the output set.

        Args:
            progress: an optional callable ``progress(done, total)`` called about twice a
                second while the COGs are written, in bytes (an estimate from the files'
                sizes: rasterio passes no progress callback to GDAL's copy).

        Returns:
            The :class:`RasterFiles`.

        Raises:
            ValueError: some output blocks were never given.
        """
        left = len(self.windows) - self.blocks_written
        if left:
            raise ValueError(f"{left} output blocks were never given to the raster sink")
        for ds in self._datasets.values():
            ds.close()
        files = self._write_cogs(progress)
        self._closed = True
        return files

    def _write_cogs(self, progress: Callable[[int, int], None] | None) -> RasterFiles:
        spec, oset = self.spec, self.output_set
        scratch = {k: oset.scratch(spec.name(k)) for k in self._datasets}
        # What one copy writes, roughly: the overviews' temporary file (a third of the image)
        # and the COG (the image and its overviews): 5/3 of the scratch file.
        expect = {k: max(1, p.stat().st_size * 5 // 3) for k, p in scratch.items()}
        total, done = sum(expect.values()), 0
        staged: dict[str, Path] = {}
        checksums: dict[str, str] = {}
        for kind, src in scratch.items():
            signals.check()
            dst = oset.path(spec.name(kind))
            report = None
            if progress is not None:

                def report(n: int, d: int = done, e: int = expect[kind]) -> None:
                    assert progress is not None
                    progress(d + min(n, e), total)

            try:
                with _CopyWatch(dst, report):
                    write_cog(src, dst, kind, overviews=spec.overviews)
            except Exception as exc:
                # GDAL's error for a full disk during the copy says nothing of space, and its
                # partial COG is gone by now: a disk without room for the copy is full. The
                # room is counted generously (twice the scratch file and a MiB): the overviews'
                # temporary file may be written uncompressed.
                if is_disk_full(exc, oset.folder, needed=2 * src.stat().st_size + 2**20):
                    raise disk_full_error(oset.folder, oset.staged_bytes()) from None
                raise
            src.unlink()
            staged[kind], checksums[kind] = dst, sha256(dst)
            if kind == "classes":
                # Category names, attribute table and the exact colour table, in GDAL's sidecar
                # (geovae.styles): rasterio cannot write them into the GeoTIFF.
                info = spec.info
                pixels = [int(n) for n in self.class_pixels()]
                aux = write_class_aux(dst, info.class_ids, info.class_names, info.class_colors, pixels)
                staged["classes_aux"], checksums["classes_aux"] = aux, sha256(aux)
            done += expect[kind]
            if progress is not None:
                progress(done, total)
        paths = {k: oset.final(spec.name(k)) for k in self._datasets}
        return RasterFiles(paths, staged, checksums)

    def abort(self) -> None:
        """Close every unfinished output (after an error or interruption); the output set
        removes them with its staging folder."""
        for ds in list(self._datasets.values()):
            try:
                ds.close()
            except Exception:  # pragma: no cover - closing a broken dataset
                pass
        # The files stay in the set's staging folder until the set closes: until then a full
        # disk still shows as one (geovae.atomic.is_disk_full).
        self._datasets.clear()
        self._closed = True
