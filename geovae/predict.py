"""Segment a scene of any size: lazy tiles -> model -> blended rasters -> polygons.

``segment_scene`` checks everything first (options, output folder, scene, model, band
count, valid data), then streams: a background thread reads tiles in the stitcher's order
(block by block), fills nodata (invalid pixels, and single bands holding the nodata value)
with the model's band means and batches them; the main
thread runs the model and blends the outputs into blocks that are written as soon as they
are complete (:mod:`geovae.stitch`). Then the class raster is vectorised, a quicklook is
drawn and a JSON report is written. Every file is written under a temporary name and
renamed when complete; an error or interruption removes the temporary files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rasterio.windows import Window

from geovae.atomic import check_output_dir, write_text
from geovae.errors import ModelMismatchError, OptionError, SceneError
from geovae.model.base import ModelInfo, SegmentationModel
from geovae.scene import Scene, capped_gdal_cache, open_scene
from geovae.stitch import CLASS_NODATA, Stitcher, block_side, check_rows
from geovae.tiling import Tile, TileGrid, check_options

__all__ = ["SegmentResult", "segment_scene", "finish_outputs", "report_options", "tiling", "check_formats", "FORMATS", "check_output_dir"]

#: Upper bound of GDAL's block cache during a run (bytes). 512 MiB let the cache fill while
#: overviews were built: +111 MiB from 2048² to 8192² and most of the growth to 20480².
GDAL_CACHE_BYTES = 64 * 2**20

#: Polygon formats and their file suffixes.
FORMATS = {"geojson": "geojson", "gpkg": "gpkg", "parquet": "parquet"}


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


def _load(model: str | Path | SegmentationModel, device: str, precision: str | None) -> SegmentationModel:
    if isinstance(model, SegmentationModel):
        return model if precision is None else model.with_precision(precision)
    from geovae.model.io import load_model  # the model file format lives with the model

    return load_model(model, device, precision=precision or "auto")


# -- reading in a background thread -------------------------------------------------------


@dataclass
class _Batch:
    entries: list[tuple[Tile, bool]]  # every tile in stitch order; False = skipped (all nodata)
    x: torch.Tensor | None  # (n_run, C, T, T) raw values, nodata filled with band means
    valid: list[np.ndarray]  # one (T, T) mask per run tile


#: Most bytes of one read window (float32, every band): a window holds several tiles.
READ_WINDOW_BYTES = 16 * 2**20


def _read_groups(blocks: Sequence[Sequence[Tile]], count: int, budget: int = READ_WINDOW_BYTES) -> list[list[Tile]]:
    """Split each block's tiles into rectangles of tiles read as one window.

    Neighbouring tiles share ``overlap`` pixels; read one by one, those pixels are decoded
    ~1.8x at the defaults. A window per block (or per few tile rows of it, to stay within
    ``budget`` bytes) decodes them once, leaving only the halo between blocks read twice.
    A tile row wider than the budget is cut into runs of columns.
    """
    groups: list[list[Tile]] = []
    for tiles in blocks:
        if not tiles:
            continue
        T = tiles[0].size
        rows: dict[int, list[Tile]] = {}
        for t in tiles:  # tiles of a block come row by row, every row over the same columns
            rows.setdefault(t.row, []).append(t)
        cur: list[Tile] = []
        for row in rows.values():
            width = row[-1].col + T - row[0].col
            if cur and (row[0].row + T - cur[0].row) * width * count * 4 > budget:
                groups.append(cur)
                cur = []
            if T * width * count * 4 <= budget:
                cur.extend(row)
                continue
            run: list[Tile] = []
            for t in row:
                if run and T * (t.col + T - run[0].col) * count * 4 > budget:
                    groups.append(run)
                    run = []
                run.append(t)
            groups.append(run)
        if cur:
            groups.append(cur)
    return groups


class _Reader:
    """Reads tiles in order with a few threads and hands out batches through a bounded queue.

    Tiles are read a window at a time (:func:`_read_groups`: the tiles of one output block,
    or a few of its tile rows), so pixels shared by overlapping tiles are decoded once; each
    window is filled (:meth:`Scene.fill_missing`) and cut into its tiles. GDAL releases the
    GIL while it decodes, so ``workers`` threads (each with its own dataset handle, see
    :meth:`Scene.dataset`) read windows in parallel; results are consumed in tile order, at
    most ``workers * 2`` windows ahead. The queue holds at most ``prefetch`` batches, which
    bounds memory; on CUDA the batch tensors are in pinned memory so the copy to the device
    is asynchronous.

    Args:
        blocks: the tiles in stitch order, grouped by output block (:meth:`Stitcher.block_tiles`).
        window_bytes: most bytes of one read window.
    """

    def __init__(self, scene: Scene, blocks: Sequence[Sequence[Tile]], batch_size: int, mean: np.ndarray,
                 pin: bool, prefetch: int = 3, workers: int | None = None, window_bytes: int = READ_WINDOW_BYTES):
        self.scene = scene
        self.groups = _read_groups(blocks, scene.count, window_bytes)
        self.batch_size = batch_size
        self.mean = mean.astype(np.float32)
        self.pin = pin
        self.workers = workers or max(1, min(4, (os.cpu_count() or 2) // 2))
        self.q: queue.Queue[Any] = queue.Queue(maxsize=prefetch)
        self.stop = threading.Event()
        self.read_s = 0.0
        self.thread = threading.Thread(target=self._run, name="geovae-reader", daemon=True)

    def __enter__(self) -> _Reader:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        while self.thread.is_alive():
            try:  # unblock a producer waiting on a full queue
                self.q.get_nowait()
            except queue.Empty:
                pass
            self.thread.join(timeout=0.05)

    def _put(self, item: Any) -> bool:
        while not self.stop.is_set():
            try:
                self.q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _new_x(self, n: int, c: int, t: int) -> torch.Tensor:
        return torch.empty((n, c, t, t), dtype=torch.float32, pin_memory=self.pin)

    def _read(self, group: list[Tile]) -> tuple[np.ndarray, np.ndarray, float]:
        t0 = time.perf_counter()
        r0, c0 = group[0].row, group[0].col
        T = group[0].size
        win = Window(c0, r0, max(t.col for t in group) + T - c0, group[-1].row + T - r0)
        data, valid = self.scene.read(win)
        # Band means make nodata look like "average ground" to the model, so it does not
        # pollute the valid neighbours it sees through the receptive field; a band gap at a
        # valid pixel gets its band's mean too, not the raw nodata value.
        self.scene.fill_missing(data, valid, self.mean)
        return data, valid, time.perf_counter() - t0

    def _windows(self) -> Iterator[tuple[list[Tile], np.ndarray, np.ndarray]]:
        """Windows read ahead by the pool, yielded in order."""
        if self.workers == 1:
            for g in self.groups:
                data, valid, dt = self._read(g)
                self.read_s += dt
                yield g, data, valid
            return
        pending: deque[tuple[list[Tile], Future[tuple[np.ndarray, np.ndarray, float]]]] = deque()
        it = iter(self.groups)
        with ThreadPoolExecutor(self.workers, thread_name_prefix="geovae-read") as pool:
            try:
                for g in islice(it, self.workers * 2):
                    pending.append((g, pool.submit(self._read, g)))
                while pending:
                    g, fut = pending.popleft()
                    nxt = next(it, None)
                    if nxt is not None:
                        pending.append((nxt, pool.submit(self._read, nxt)))
                    data, valid, dt = fut.result()
                    self.read_s += dt
                    yield g, data, valid
            finally:
                for _, f in pending:
                    f.cancel()

    def _ordered(self) -> Iterator[tuple[Tile, np.ndarray, np.ndarray]]:
        """Tiles in order, cut out of their windows.

        The data are views, copied into the batch tensor; the masks are copies, since a batch
        keeps them until it is blended and a view would keep the whole window alive.
        """
        for g, data, valid in self._windows():
            r0, c0 = g[0].row, g[0].col
            for t in g:
                r, c = t.row - r0, t.col - c0
                yield t, data[:, r:r + t.size, c:c + t.size], valid[r:r + t.size, c:c + t.size].copy()

    def _run(self) -> None:
        try:
            c = self.scene.count
            entries: list[tuple[Tile, bool]] = []
            bufs: list[np.ndarray] = []
            valids: list[np.ndarray] = []
            for t, data, valid in self._ordered():
                if self.stop.is_set():
                    return
                if not valid.any():
                    entries.append((t, False))
                    continue
                entries.append((t, True))
                bufs.append(data)
                valids.append(valid)
                if len(bufs) == self.batch_size:
                    if not self._emit(entries, bufs, valids, c):
                        return
                    entries, bufs, valids = [], [], []
            if entries and not self._emit(entries, bufs, valids, c):
                return
            self._put(None)
        except BaseException as exc:  # handed to the main thread, which re-raises it
            self._put(exc)
        finally:
            self.scene.close()

    def _emit(self, entries: list[tuple[Tile, bool]], bufs: list[np.ndarray], valids: list[np.ndarray], c: int) -> bool:
        x = None
        if bufs:
            x = self._new_x(len(bufs), c, bufs[0].shape[-1])
            x.numpy()[:] = np.stack(bufs)
        return self._put(_Batch(entries, x, valids))

    def __iter__(self) -> Iterator[_Batch]:
        while True:
            item = self.q.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


# -- the model call ----------------------------------------------------------------------


def _predict(model: SegmentationModel, x: torch.Tensor, samples: int, reconstruction: bool, tta: bool) -> dict[str, torch.Tensor]:
    """Model outputs for one batch; with ``tta`` the mean over identity, h-flip and v-flip."""
    x = x.to(model.device, non_blocking=True)
    out = model.predict(x, samples=samples, reconstruction=reconstruction)
    if tta:
        for dim in (-1, -2):
            o = model.predict(x.flip(dim), samples=samples, reconstruction=reconstruction)
            for k, v in o.items():
                out[k] = out[k] + v.flip(dim)  # every output has H, W as its last two dims
        out = {k: v / 3.0 for k, v in out.items()}
    return out


@dataclass
class _InFlight:
    batch: _Batch
    outputs: dict[str, torch.Tensor]  # on the host (possibly still being copied)
    done: Any  # a CUDA event marking the end of the copy, or None on the CPU


def _launch(model: SegmentationModel, batch: _Batch, samples: int, reconstruction: bool, tta: bool) -> _InFlight:
    """Queue one batch on the device and its copy back to the host; does not wait on CUDA."""
    if batch.x is None:
        return _InFlight(batch, {}, None)
    o = _predict(model, batch.x, samples, reconstruction, tta)
    if model.device.type != "cuda":
        return _InFlight(batch, {k: v.float() for k, v in o.items()}, None)
    host = {}
    for k, v in o.items():
        buf = torch.empty(v.shape, dtype=torch.float32, pin_memory=True)
        buf.copy_(v.float(), non_blocking=True)  # asynchronous into pinned memory
        host[k] = buf
    done = torch.cuda.Event()
    done.record()
    return _InFlight(batch, host, done)


def _blend(f: _InFlight, stitcher: Stitcher) -> float:
    """Wait for a batch's outputs and blend them; returns the seconds spent waiting on the device."""
    t0 = time.perf_counter()
    if f.done is not None:
        f.done.synchronize()
    waited = time.perf_counter() - t0
    res = {k: v.numpy() for k, v in f.outputs.items()}
    n = 0
    for t, run in f.batch.entries:
        if not run:
            stitcher.skip(t)
            continue
        stitcher.add(
            t, f.batch.valid[n], res["probs"][n],
            expected_entropy=res["expected_entropy"][n] if "expected_entropy" in res else None,
            reconstruction_error=res["reconstruction_error"][n] if "reconstruction_error" in res else None,
        )
        n += 1
    return waited


class _Progress:
    """A rich progress bar with tiles/s, or nothing."""

    def __init__(self, total: int, enabled: bool, label: str):
        self.bar = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]} tiles/s"), TimeRemainingColumn(), transient=False,
            )
            self.task = self.bar.add_task(label, total=total, rate="-")
        self.t0 = time.perf_counter()
        self.done = 0

    def __enter__(self) -> _Progress:
        if self.bar is not None:
            self.bar.start()
        return self

    def advance(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.update(self.task, advance=n, rate=f"{rate:.1f}")

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


# -- the public entry point ----------------------------------------------------------------


def check_formats(formats: Sequence[str] | str | None, pixel_coords: bool) -> list[str]:
    """The polygon formats to write, checked.

    Args:
        formats: names among ``geojson``, ``gpkg``, ``parquet`` (a list, or one comma-separated
            string as typed on a command line); None for the default (``geojson``, ``gpkg``
            in pixel coordinates).
        pixel_coords: whether the outputs are in pixel coordinates (GeoJSON is refused).

    Returns:
        The formats, lower case, without duplicates.

    Raises:
        OptionError: an unknown format, or GeoJSON in pixel coordinates.
    """
    if formats is None:
        return ["gpkg"] if pixel_coords else ["geojson"]
    if isinstance(formats, str):  # "geojson,gpkg" as typed on a command line
        formats = [f for f in formats.split(",") if f.strip()]
    fmts = [f.strip().lower().lstrip(".") for f in formats]
    for f in fmts:
        if f not in FORMATS:
            raise OptionError(f"--formats {f}: unknown polygon format; use geojson, gpkg or parquet")
    if pixel_coords and "geojson" in fmts:
        raise OptionError("--formats geojson: GeoJSON needs real coordinates (EPSG:4326) and this scene is in "
                          "pixel coordinates; use --formats gpkg or parquet")
    return list(dict.fromkeys(fmts))


def tiling(info: ModelInfo, tile: int | None = None, overlap: int | None = None) -> tuple[int, int]:
    """Tile side and overlap of a run: by default the model's tile size and a quarter of it.

    Args:
        info: the model description.
        tile: tile side in pixels, or None.
        overlap: overlap in pixels, or None.

    Returns:
        ``(tile, overlap)``, checked against the model's stride.

    Raises:
        OptionError: if they are out of range.
    """
    tile = int(tile if tile is not None else info.tile_size)
    overlap = int(overlap if overlap is not None else tile // 4)
    check_options(tile, overlap, 1, info.stride)
    return tile, overlap


def _scene_summary(scene: Scene) -> dict[str, Any]:
    t = scene.transform
    epsg = None
    if scene.crs is not None:
        try:
            epsg = scene.crs.to_epsg()
        except Exception:  # pragma: no cover
            epsg = None
    return {
        "path": scene.name, "width": scene.width, "height": scene.height, "bands": scene.count,
        "dtypes": scene.dtypes, "crs": None if scene.crs is None else (f"EPSG:{epsg}" if epsg else scene.crs.to_string()),
        "transform": [t.a, t.b, t.c, t.d, t.e, t.f], "nodata": scene.nodata, "mask": scene.mask_kind,
        "pixel_coords": scene.crs is None,
    }


def _model_summary(model: SegmentationModel, source: str | None) -> dict[str, Any]:
    i = model.info
    return {
        "source": source, "kind": i.kind, "in_channels": i.in_channels, "num_classes": i.num_classes,
        "class_ids": i.class_ids, "class_names": i.class_names, "tile_size": i.tile_size, "stride": i.stride,
        "band_names": i.band_names, "supports_samples": model.supports_samples,
        "supports_reconstruction": model.supports_reconstruction,
    }


def _write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, default=str))


def segment_scene(
    scene: str | Path | Scene,
    model: str | Path | SegmentationModel,
    out_dir: str | Path,
    *,
    tile: int | None = None,
    overlap: int | None = None,
    batch_size: int = 8,
    device: str = "auto",
    precision: str | None = None,
    samples: int = 0,
    reconstruction: bool = False,
    tta: bool = False,
    min_area: float = 0.0,
    simplify: float = 0.0,
    formats: Sequence[str] | None = None,
    pixel_coords: bool = False,
    nodata: float | None = None,
    block_size: int = 1024,
    quicklook: bool = True,
    progress: bool = True,
    rows: tuple[int, int] | None = None,
) -> SegmentResult:
    """Segment a scene of any size into class, confidence and uncertainty rasters and polygons.

    Memory stays bounded by tile, batch and block size whatever the scene's size: tiles are
    read lazily, blended into output blocks, and each block is written once complete.

    Args:
        scene: a path/URL (opened with :func:`geovae.scene.open_scene`) or an open :class:`Scene`.
        model: a model file (loaded with ``geovae.model.io.load_model``) or a :class:`SegmentationModel`.
        out_dir: output folder (created if missing).
        tile: tile side in pixels; default the model's training tile size (``info.tile_size``).
        overlap: pixels shared by neighbouring tiles; default ``tile // 4``. Tiles are blended
            with smooth weights; a model whose receptive-field radius is at most ``overlap // 4``
            gives the same result as one untiled pass.
        batch_size: tiles per model call.
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N`` (used when loading
            a model file; a :class:`SegmentationModel` keeps its device).
        precision: ``auto`` (mixed precision on CUDA, fp32 on the CPU), ``fp32``, ``bf16`` (several
            times faster on CPUs with AVX-512 BF16/AMX, and on GPUs) or ``fp16`` (CUDA); None keeps
            the model's own setting.
        samples: latent samples per tile; > 0 writes ``<stem>.uncertainty.tif``.
        reconstruction: also write ``<stem>.reconstruction-error.tif``.
        tta: average the predictions over horizontal and vertical flips (3x the model time).
        min_area: drop polygons smaller than this (m^2; pixel units with ``pixel_coords``).
        simplify: topology-preserving simplification tolerance (metres, or pixels).
        formats: polygon formats among ``geojson``, ``gpkg``, ``parquet``; default ``geojson``
            (``gpkg`` in pixel coordinates, where GeoJSON is refused); empty for none.
        pixel_coords: accept a scene without CRS; outputs carry no CRS and polygons are in pixels.
        nodata: value marking missing pixels, overriding the scene's nodata tag.
        block_size: output block side (rounded to a multiple of ``tile - overlap``).
        quicklook: write ``<stem>.png`` (needs the whole scene: not with ``rows``).
        progress: show a progress bar with tiles/s.
        rows: ``(start, stop)``: segment only these scene rows, which must lie on the output
            block grid (multiples of :func:`geovae.stitch.block_side`, or the scene's height).
            The outputs then cover just those rows (transform shifted) and equal the same rows
            of a whole-scene run bit for bit: the tiles touching them are run on the scene's
            own tile grid. Used to spread one scene over several machines.

    Returns:
        The :class:`SegmentResult` with output paths and the run report.

    Raises:
        OptionError: an option is out of range (tile, overlap, batch size, formats...).
        OutputError: the output folder is a file or cannot be written.
        SceneError: the scene is missing, unreadable, not georeferenced, or all nodata.
        CorruptSceneError: a tile of the scene cannot be decoded (raised while streaming;
            nothing is left under a final name).
        ModelFileError: the model file cannot be loaded.
        ModelMismatchError: the scene's band count differs from the model's, or the model lacks
            an output asked for.
    """
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    # -- every check before any work ---------------------------------------------------------
    if int(samples) != samples or samples < 0:
        raise OptionError(f"--samples {samples}: must be 0 or more")
    if int(block_size) != block_size or block_size < 1:
        raise OptionError(f"--block-size {block_size}: must be 1 or more pixels")
    if min_area < 0:
        raise OptionError(f"--min-area {min_area}: must be 0 or more")
    if simplify < 0:
        raise OptionError(f"--simplify {simplify}: must be 0 or more")
    if batch_size < 1 or int(batch_size) != batch_size:
        raise OptionError(f"--batch-size {batch_size}: must be 1 or more")
    out = check_output_dir(out_dir)
    if isinstance(scene, Scene):
        if nodata is not None and nodata != scene.nodata:
            kind = "nodata" if scene.mask_kind in ("none", "nodata") else scene.mask_kind
            scene = dataclasses.replace(scene, nodata=float(nodata), mask_kind=kind)
        if scene.crs is None and not pixel_coords:
            raise SceneError(f"scene {scene.name} has no CRS; it looks like an image without georeferencing; "
                             "pass --pixel-coords to segment it in pixel coordinates")
    else:
        scene = open_scene(scene, pixel_coords=pixel_coords, nodata=nodata)
    in_pixels = scene.crs is None
    fmts = check_formats(formats, in_pixels)
    source = None if isinstance(model, SegmentationModel) else str(model)
    model = _load(model, device, precision)
    info: ModelInfo = model.info
    if scene.count != info.in_channels:
        raise ModelMismatchError(
            f"scene {scene.name} has {scene.count} bands but the model expects {info.in_channels}; "
            "pass a scene with the bands the model was trained on (in the same order)"
        )
    if reconstruction and not model.supports_reconstruction:
        raise ModelMismatchError("this model has no reconstruction decoder; drop --reconstruction")
    if any(not 0 <= int(c) < CLASS_NODATA for c in info.class_ids):
        raise ModelMismatchError(f"model class ids must be 0..{CLASS_NODATA - 1} (255 marks nodata in the class raster)")
    tile, overlap = tiling(info, tile, overlap)
    grid = TileGrid(scene.height, scene.width, tile, overlap, stride=info.stride)
    check_rows(rows, scene.height, block_side(block_size, grid.step))
    if rows is not None and quicklook:
        raise OptionError("rows: a quicklook shows the whole scene; pass quicklook=False with rows")
    if not scene.any_valid():
        raise SceneError(f"scene {scene.name} has no valid pixels (all nodata); check --nodata or the file")
    timings["validate_s"] = time.perf_counter() - t_start

    stem = scene.stem
    # GDAL's block cache defaults to 5 % of RAM and would keep written output blocks and
    # read scene blocks up to that: cap it so memory stays bounded on big machines too.
    with capped_gdal_cache(GDAL_CACHE_BYTES):
        return _run(scene, model, info, grid, out, stem, source, fmts, timings, t_start, batch_size=batch_size,
                    samples=samples, reconstruction=reconstruction, tta=tta, min_area=min_area, simplify=simplify,
                    block_size=block_size, quicklook=quicklook, progress=progress, rows=rows)


def _run(scene: Scene, model: SegmentationModel, info: ModelInfo, grid: TileGrid, out: Path, stem: str,
         source: str | None, fmts: list[str], timings: dict[str, float], t_start: float, *, batch_size: int,
         samples: int, reconstruction: bool, tta: bool, min_area: float, simplify: float, block_size: int,
         quicklook: bool, progress: bool, rows: tuple[int, int] | None) -> SegmentResult:
    """The streaming part of :func:`segment_scene`, after every check has passed."""
    stitcher = Stitcher(grid, out, stem, info, scene.crs, scene.transform, uncertainty=samples > 0,
                        reconstruction=reconstruction, block_size=block_size, rows=rows)
    model_s = 0.0
    try:
        t0 = time.perf_counter()
        pin = model.device.type == "cuda"
        mean = np.asarray(info.mean, dtype=np.float32)
        with _Reader(scene, list(stitcher.block_tiles()), batch_size, mean, pin) as reader, \
                _Progress(stitcher.tiles_total, progress, f"segment {stem}") as bar:
            # One batch in flight: batch n+1 is queued on the device before batch n is
            # blended, so on CUDA the GPU computes while the CPU blends and writes.
            pending: _InFlight | None = None
            for batch in reader:
                tm = time.perf_counter()
                launched = _launch(model, batch, samples, reconstruction, tta)
                model_s += time.perf_counter() - tm
                if pending is not None:
                    model_s += _blend(pending, stitcher)
                    bar.advance(len(pending.batch.entries))
                pending = launched
            if pending is not None:
                model_s += _blend(pending, stitcher)
                bar.advance(len(pending.batch.entries))
            timings["read_s"] = reader.read_s
        timings["model_s"] = model_s
        timings["predict_s"] = time.perf_counter() - t0
        options = report_options(model, batch_size=batch_size, samples=samples, reconstruction=reconstruction,
                                 tta=tta, rows=None if rows is None else list(stitcher.rows))
        return finish_outputs(scene, model, stitcher, formats=fmts, min_area=min_area, simplify=simplify,
                              quicklook=quicklook, options=options, source=source, timings=timings, t_start=t_start)
    except BaseException:
        stitcher.abort()
        raise
    finally:
        scene.close()


def report_options(model: SegmentationModel, *, batch_size: int, samples: int, reconstruction: bool, tta: bool,
                   rows: list[int] | None) -> dict[str, Any]:
    """The prediction options a report records, the same for a whole-scene and a split run."""
    return {"batch_size": batch_size, "precision": str(model.amp_dtype or "fp32").replace("torch.", ""),
            "samples": samples, "reconstruction": reconstruction, "tta": tta, "rows": rows}


def finish_outputs(
    scene: Scene,
    model: SegmentationModel,
    stitcher: Stitcher,
    *,
    formats: Sequence[str] | str | None = None,
    min_area: float = 0.0,
    simplify: float = 0.0,
    quicklook: bool = True,
    options: dict[str, Any] | None = None,
    source: str | None = None,
    timings: dict[str, float] | None = None,
    t_start: float | None = None,
    tiles: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> SegmentResult:
    """Close a run's rasters, then write its polygons, quicklook and JSON report.

    The end of :func:`segment_scene`, for a :class:`~geovae.stitch.Stitcher` that has been
    fed every tile (or given every block with ``write_block``, as :mod:`geovae.batch` does
    when it assembles one scene from row bands segmented on several workers). The caller
    aborts the stitcher if this raises.

    Args:
        scene: the segmented scene.
        model: the model that segmented it.
        stitcher: the run's stitcher; closed here (its rasters move to their final names).
        formats: polygon formats (see :func:`check_formats`); empty for none.
        min_area: drop polygons smaller than this (m^2; pixel units without CRS).
        simplify: topology-preserving simplification tolerance (metres, or pixels).
        quicklook: write ``<stem>.png``.
        options: run options for the report besides those known here (batch size, samples,
            reconstruction, tta...).
        source: the model file, for the report.
        timings: seconds per stage so far; the stages run here are added.
        t_start: ``time.perf_counter()`` at the start of the run, for ``total_s``.
        tiles: tile counts for the report; default the stitcher's own.
        extra: more top-level report entries.

    Returns:
        The :class:`SegmentResult`.

    Raises:
        OptionError: an unknown polygon format.
    """
    in_pixels = scene.crs is None
    fmts = check_formats(formats, in_pixels)
    timings = dict(timings or {})
    info = model.info
    out, stem = stitcher.out_dir, stitcher.stem
    t0 = time.perf_counter()
    outputs: dict[str, Path] = dict(stitcher.close())
    timings["rasters_close_s"] = time.perf_counter() - t0
    if fmts:
        t0 = time.perf_counter()
        from geovae.vectorize import vectorize

        vec_paths = [out / f"{stem}.{FORMATS[f]}" for f in fmts]
        vectorize(
            outputs["classes"], vec_paths, confidence=outputs["confidence"],
            uncertainty=outputs.get("uncertainty"), min_area=min_area, simplify=simplify,
            class_names=dict(zip(info.class_ids, info.class_names)),
        )
        outputs.update(zip(fmts, vec_paths))
        timings["vectorize_s"] = time.perf_counter() - t0
    if quicklook:
        t0 = time.perf_counter()
        from geovae.quicklook import write_quicklook

        outputs["quicklook"] = write_quicklook(scene, outputs["classes"], out / f"{stem}.png", info)
        timings["quicklook_s"] = time.perf_counter() - t0
    if t_start is not None:
        timings["total_s"] = time.perf_counter() - t_start
    total_area = float(stitcher.class_area.sum())
    report: dict[str, Any] = {
        "geovae_version": _version(),
        "scene": _scene_summary(scene),
        "model": _model_summary(model, source),
        "options": {
            "tile": stitcher.grid.tile, "overlap": stitcher.grid.overlap, "device": str(model.device),
            "amp": str(model.amp_dtype) if model.amp_dtype else None, **(options or {}), "min_area": min_area,
            "simplify": simplify, "formats": fmts, "pixel_coords": in_pixels, "nodata": scene.nodata,
            "block_size": stitcher.B,
        },
        "tiles": tiles if tiles is not None else stitcher.summary(),
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
        **(extra or {}),
        "area_unit": stitcher.areas.measure.unit,
        "classes": [
            {"id": int(c), "name": n, "pixels": int(px), "area": float(a),
             "fraction": float(a / total_area) if total_area else 0.0}
            for c, n, px, a in zip(info.class_ids, info.class_names, stitcher.class_pixels, stitcher.class_area)
        ],
    }
    report_path = out / f"{stem}.json"
    outputs["report"] = report_path
    report["outputs"] = {k: str(v) for k, v in outputs.items()}
    _write_json(report_path, report)
    return SegmentResult(outputs=outputs, report=report)


def _version() -> str:
    try:
        from geovae._version import __version__

        return str(__version__)
    except Exception:  # pragma: no cover
        return "unknown"
