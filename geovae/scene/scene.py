"""A validated raster scene, read by windows with its valid-data mask, and :func:`open_scene`.

A :class:`Scene` is lazy: opening it reads the header only, and pixels come in windows
(:meth:`Scene.read`) or through a Dask array over rasterio windows (:meth:`Scene.to_dask`).
Each thread gets its own rasterio handle, because GDAL dataset handles are not thread-safe
and the prediction pipeline reads in a background thread while the main thread writes.

Valid data: a pixel is invalid where *every* data band equals the nodata value (the
``nodata`` override, else the file's nodata tag), where the alpha band is 0, where an
internal/per-dataset mask is 0, or where any band is NaN. "Every band" follows GDAL's
dataset mask: real scenes have legitimate zeros in single bands (dark water in the NIR),
while fill is fill on all bands at once. A band that holds the nodata value at a valid pixel
is still missing *in that band* (a gap in one band of a stack, such as the NC Landsat-7
band 6): :meth:`Scene.fill_missing` gives such values, and invalid pixels, a fill value
(the model's band means) before they reach a model.
"""

from __future__ import annotations

import dataclasses
import math
import re
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from rasterio.enums import MaskFlags
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.windows import Window

from geovae.errors import CorruptSceneError, SceneError
from geovae.scene.raster import alpha_index, check_transform, gdal_message, is_local, open_raster, scene_stem
from geovae.sources.stack import StackedSource, build_vrt

__all__ = ["SUPPORTED_DTYPES", "Scene", "open_scene"]

#: Pixel types a scene may have; everything real-valued that fits float32 well enough.
SUPPORTED_DTYPES = frozenset({"uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64"})


@dataclass
class Scene:
    """A validated raster; pixels are read by window.

    Each thread reads through a handle of its own (:meth:`dataset`, opened on first use); the
    thread that opened the scene (:func:`open_scene`) keeps the handle that validated it.

    Attributes:
        path: the name GDAL opens (``/vsicurl/...`` for URLs).
        name: the path as the user gave it.
        width, height: size in pixels.
        count: number of data bands (an alpha band is not a data band).
        bands: 1-based indexes of the data bands in the file.
        dtypes: data type of each data band.
        crs: coordinate reference system, or None in pixel-coordinate mode.
        transform: affine geotransform (north-up).
        nodata: the nodata value in use (override or tag), or None.
        alpha: 1-based index of the alpha band, or None.
        descriptions: band descriptions of the data bands (None where unset).
        block_shapes: internal (rows, cols) block shape of each data band.
        mask_kind: how validity is decided: ``"nodata"``, ``"alpha"``, ``"mask"`` or ``"none"``.
        pixel_coords: True when the scene is used without georeferencing.
        source: the rasters stacked into this scene (a STAC Item's assets, ``--stack``), whose
            VRT ``path`` is; None for a plain raster.
    """

    path: str
    name: str
    width: int
    height: int
    count: int
    bands: list[int]
    dtypes: list[str]
    crs: rasterio.crs.CRS | None
    transform: Affine
    nodata: float | None
    alpha: int | None
    descriptions: list[str | None]
    colorinterp: list[str]
    block_shapes: list[tuple[int, int]]
    mask_kind: str
    pixel_coords: bool = False
    source: StackedSource | None = None
    _local: threading.local = field(default_factory=threading.local, repr=False, compare=False)

    # -- pickling (Dask workers reopen the file by name) ---------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_local", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    # -- geometry ------------------------------------------------------------------------
    @property
    def res(self) -> tuple[float, float]:
        """Pixel size (x, y), positive."""
        return (abs(self.transform.a), abs(self.transform.e))

    @property
    def bounds(self) -> rasterio.coords.BoundingBox:
        """(left, bottom, right, top) in the scene's CRS."""
        return rasterio.coords.BoundingBox(*_bounds(self.transform, self.height, self.width))

    @property
    def shape(self) -> tuple[int, int]:
        return (self.height, self.width)

    @property
    def stem(self) -> str:
        """File name without directory and extension, for naming outputs (:func:`scene_stem`)."""
        return scene_stem(self.source if self.source is not None else self.name)

    @property
    def local_files(self) -> list[str]:
        """The local files this scene reads (an output must never replace one)."""
        if self.source is not None:
            return self.source.local_files
        return [self.path] if is_local(self.path) else []

    def select_bands(self, bands: Sequence[int]) -> Scene:
        """This scene as the bands ``bands`` of its file, in that order (``--bands 4,3,2,8``).

        Only those bands are ever read (windows stay lazy); a band may be given twice (one
        date standing in for two). Validity follows the chosen bands.

        Args:
            bands: 1-based band numbers of the file, as ``gdal_translate -b`` takes them.

        Returns:
            A new :class:`Scene`.

        Raises:
            SceneError: a number that is not a data band of the file (out of range, or its
                alpha band).
        """
        if not bands:
            raise SceneError("--bands: name at least one band")
        pos: list[int] = []
        for b in bands:
            if b == self.alpha:
                raise SceneError(f"--bands {b}: band {b} of scene {self.name} is its alpha band (the valid-data mask)")
            if b not in self.bands:
                raise SceneError(
                    f"--bands {b}: scene {self.name} has no data band {b}; its data bands are "
                    f"{', '.join(map(str, self.bands))}"
                )
            pos.append(self.bands.index(b))
        return dataclasses.replace(
            self,
            count=len(pos),
            bands=[self.bands[i] for i in pos],
            dtypes=[self.dtypes[i] for i in pos],
            descriptions=[self.descriptions[i] for i in pos],
            colorinterp=[self.colorinterp[i] for i in pos],
            block_shapes=[self.block_shapes[i] for i in pos],
            _local=threading.local(),
        )

    # -- reading -------------------------------------------------------------------------
    def dataset(self) -> rasterio.io.DatasetReader:
        """This thread's open rasterio handle (opened on first use)."""
        ds = getattr(self._local, "ds", None)
        if ds is None or ds.closed:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                ds = rasterio.open(self.path)
            self._local.ds = ds
        return ds

    def close(self) -> None:
        """Close this thread's handle (other threads' handles close when they are collected)."""
        ds = getattr(self._local, "ds", None)
        if ds is not None:
            ds.close()
            self._local.ds = None

    def __enter__(self) -> Scene:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read(self, window: Window, *, fill: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """Read a window of the data bands with its valid-data mask.

        The window may run past the scene (or start before it): the outside is padded with
        ``fill`` and marked invalid, so tiles at the right and bottom edges keep their size.

        Args:
            window: the window in pixel coordinates (integer offsets and sizes).
            fill: value of padded pixels.

        Returns:
            ``(data, valid)``: float32 (count, h, w) and bool (h, w).

        Raises:
            CorruptSceneError: if GDAL cannot decode part of the window.
        """
        r0, c0 = int(window.row_off), int(window.col_off)
        h, w = int(window.height), int(window.width)
        data = np.full((self.count, h, w), fill, dtype=np.float32)
        valid = np.zeros((h, w), dtype=bool)
        ir0, ic0 = max(r0, 0), max(c0, 0)
        ir1, ic1 = min(r0 + h, self.height), min(c0 + w, self.width)
        if ir1 <= ir0 or ic1 <= ic0:
            return data, valid
        inner = Window(ic0, ir0, ic1 - ic0, ir1 - ir0)
        try:
            d, v = self._read_valid(window=inner)
        except RasterioError as exc:
            raise self._corrupt(inner, exc) from None
        sl = (slice(ir0 - r0, ir1 - r0), slice(ic0 - c0, ic1 - c0))
        data[(slice(None), *sl)] = d
        valid[sl] = v
        return data, valid

    def fill_missing(self, data: np.ndarray, valid: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Put ``values`` (one per band) wherever a band has no data, in place.

        Missing are every band of an invalid pixel, and, at a valid pixel, each band that
        holds the nodata value (GDAL's per-band mask): the pixel stays valid because other
        bands have data, but that band's value is fill, not a measurement.

        Args:
            data: float32 (count, h, w) from :meth:`read`.
            valid: bool (h, w) from :meth:`read`.
            values: float32 (count,) fill per band (the model's band means).

        Returns:
            ``data``.
        """
        missing = np.broadcast_to(~valid, data.shape)
        nd = self.nodata
        if nd is not None and not math.isnan(nd):
            missing = missing | (data == np.float32(nd))
        np.copyto(data, np.asarray(values, dtype=np.float32)[:, None, None], where=missing)
        return data

    def _read_valid(
        self, window: Window | None = None, shape: tuple[int, int] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Every data band as float32 and the valid-data mask (the rule of the module's
        docstring), of ``window`` or of the whole scene decimated to ``shape``: the one read
        behind :meth:`read` and :meth:`read_overview`. Non-finite values are invalid and set
        to 0, so that they cannot reach a model.

        Raises:
            RasterioError: GDAL cannot decode what is read (the callers say where).
        """
        ds = self.dataset()
        where: dict[str, Any] = {"window": window} if shape is None else {"out_shape": shape}
        bands_where: dict[str, Any] = where if shape is None else {"out_shape": (self.count, *shape)}
        data = ds.read(self.bands, out_dtype="float32", **bands_where)
        if self.mask_kind == "alpha":
            valid = ds.read(self.alpha, **where) > 0
        elif self.mask_kind == "mask":
            valid = ds.read_masks(self.bands[0], **where) > 0
        else:
            valid = np.ones(data.shape[1:], dtype=bool)
        nd = self.nodata
        if nd is not None and not math.isnan(nd):
            valid &= ~(data == np.float32(nd)).all(axis=0)
        if any(np.issubdtype(np.dtype(dt), np.floating) for dt in self.dtypes):
            # A NaN in any band cannot go through the model.
            bad = ~np.isfinite(data)
            if bad.any():
                valid &= ~bad.any(axis=0)
                data[bad] = 0.0
        return data, valid

    def _corrupt(self, win: Window, exc: RasterioError) -> CorruptSceneError:
        """The one-line error of a window that failed to read, naming the first bad block."""
        bad, err = self._locate_corrupt(win)
        r0, c0 = int(bad.row_off), int(bad.col_off)
        where = f"rows {r0}-{r0 + int(bad.height) - 1}, cols {c0}-{c0 + int(bad.width) - 1}"
        if not is_local(self.path):
            # Over a network, a failed read is a lost connection or a vanished file far
            # more often than a corrupt one.
            return CorruptSceneError(
                f"scene {self.name} cannot be read at {where}: {gdal_message(err or exc)}; check the URL and your network"
            )
        return CorruptSceneError(
            f"scene {self.name} is corrupt at {where}: {gdal_message(err or exc)}; re-download or re-export it"
        )

    def _locate_corrupt(self, win: Window) -> tuple[Window, BaseException | None]:
        """The first internal block inside ``win`` that fails to decode (``win`` if none does)."""
        ds = self.dataset()
        bh, bw = self.block_shapes[0]
        r0, c0 = int(win.row_off), int(win.col_off)
        r1, c1 = r0 + int(win.height), c0 + int(win.width)
        for br in range(r0 // bh * bh, r1, bh):
            for bc in range(c0 // bw * bw, c1, bw):
                blk = Window(bc, br, min(bw, self.width - bc), min(bh, self.height - br))
                try:
                    ds.read(self.bands, window=blk)
                except RasterioError as exc:
                    return blk, exc
        return win, None

    def read_overview(self, max_size: int, bands: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """A decimated read of the whole scene (uses overviews where the file has them).

        Args:
            max_size: the longer side of the result, in pixels (the scene's own size if smaller).
            bands: 1-based data band numbers (of :attr:`bands` order) to read; all when None.

        Returns:
            ``(data, valid)`` float32 (n, h', w') and bool (h', w'), nearest-neighbour sampled.
        """
        scale = max(self.height, self.width) / max_size
        if scale <= 1:
            oh, ow = self.height, self.width
        else:
            oh, ow = max(1, round(self.height / scale)), max(1, round(self.width / scale))
        try:
            data, valid = self._read_valid(shape=(oh, ow))
        except RasterioError as exc:
            msg = gdal_message(exc)
            where = ""
            m = re.search(r"X offset (\d+), Y offset (\d+)", msg)
            if m:  # GDAL names the internal block it failed on
                bh, bw = self.block_shapes[0]
                r0, c0 = int(m.group(2)) * bh, int(m.group(1)) * bw
                where = f" at rows {r0}-{min(r0 + bh, self.height) - 1}, cols {c0}-{min(c0 + bw, self.width) - 1}"
            raise CorruptSceneError(
                f"scene {self.name} is corrupt{where}: {msg}; re-download or re-export it"
            ) from None
        return (data if bands is None else data[[b - 1 for b in bands]]), valid

    def to_dask(self, chunks: int | tuple[int, int] = 1024, *, valid: bool = False) -> Any:
        """A lazy Dask array over rasterio windows; nothing is read until it is computed.

        Args:
            chunks: chunk size in pixels (rows, cols), or one number for both.
            valid: return the valid-data mask (bool (H, W)) instead of the bands.

        Returns:
            ``dask.array.Array`` float32 (count, H, W), or bool (H, W) with ``valid=True``.
        """
        import dask.array as da

        ch, cw = (chunks, chunks) if isinstance(chunks, int) else chunks
        adapter = _WindowArray(self, valid)
        chunk_spec = (ch, cw) if valid else (self.count, ch, cw)
        return da.from_array(
            adapter,
            chunks=chunk_spec,
            lock=False,
            asarray=False,
            fancy=False,
            meta=np.empty((0,) * adapter.ndim, dtype=adapter.dtype),
            name=f"geovae-scene-{'valid' if valid else 'data'}-{abs(hash((self.path, self.nodata)))}",
        )

    def any_valid(self) -> bool:
        """Whether the scene has at least one valid pixel, in bounded memory.

        A decimated read answers most scenes at once; only when it sees no valid pixel is
        the whole mask streamed through the Dask view (a sparse scene may hide its valid
        pixels between the sampled ones).
        """
        _, v = self.read_overview(1024)
        if v.any():
            return True
        return bool(self.to_dask(2048, valid=True).any().compute(scheduler="threads"))

    def sample(self, windows: int = 64, size: int = 256) -> np.ndarray:
        """Valid pixels from ``windows`` windows spread evenly over the scene.

        A cheap look at what the scene holds, whatever its size: about ``windows * size**2``
        pixels are read (the whole scene when it is that small), on a regular grid of
        windows aligned to the file's internal blocks where possible, so a remote COG
        answers with a few dozen range requests.

        Args:
            windows: how many windows to read.
            size: their side in pixels.

        Returns:
            float32 (count, n) values of the valid pixels read.
        """
        if self.width * self.height <= windows * size * size:
            wins = [Window(0, 0, self.width, self.height)]
        else:
            ny = max(1, round(math.sqrt(windows * self.height / self.width)))
            nx = max(1, windows // ny)
            bh, bw = self.block_shapes[0]
            wins = []
            for i in range(ny):
                for j in range(nx):
                    r = int((i + 0.5) * self.height / ny - size / 2)
                    c = int((j + 0.5) * self.width / nx - size / 2)
                    if bh < self.height and bh <= size:
                        r = r // bh * bh
                    if bw < self.width and bw <= size:
                        c = c // bw * bw
                    r, c = min(max(r, 0), max(self.height - size, 0)), min(max(c, 0), max(self.width - size, 0))
                    wins.append(Window(c, r, min(size, self.width - c), min(size, self.height - r)))
        parts = []
        for w in wins:
            data, valid = self.read(w)
            parts.append(data[:, valid])
        return np.concatenate(parts, axis=1) if parts else np.zeros((self.count, 0), np.float32)


def _bounds(t: Affine, height: int, width: int) -> tuple[float, float, float, float]:
    x0, y0 = t.c, t.f
    x1, y1 = t @ (width, height)
    return (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


class _WindowArray:
    """Array-like over a scene for ``dask.array.from_array``: slicing reads a window."""

    def __init__(self, scene: Scene, valid: bool):
        self.scene = scene
        self.valid = valid
        self.shape = (scene.height, scene.width) if valid else (scene.count, scene.height, scene.width)
        self.dtype = np.dtype(bool) if valid else np.dtype(np.float32)
        self.ndim = len(self.shape)

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        rs, cs = key[-2], key[-1]
        r0, r1, _ = rs.indices(self.scene.height)
        c0, c1, _ = cs.indices(self.scene.width)
        data, valid = self.scene.read(Window(c0, r0, max(c1 - c0, 0), max(r1 - r0, 0)))
        if self.valid:
            return valid
        return data[key[0]] if len(key) == 3 else data


def open_scene(
    path: str | Path | StackedSource,
    *,
    pixel_coords: bool = False,
    nodata: float | None = None,
    bands: Sequence[int] | None = None,
) -> Scene:
    """Open and validate a raster scene without reading its pixels.

    Args:
        path: local path, ``s3://`` or ``http(s)://`` URL, or GDAL ``/vsi...`` name; or a
            :class:`~geovae.sources.stack.StackedSource` (rasters or a STAC Item's assets
            stacked band-wise, clipped to an area), opened as its VRT.
        pixel_coords: accept a raster without CRS and work in pixel coordinates.
        nodata: value marking missing pixels, overriding the file's nodata tag (for scenes
            such as Landsat-8 Level-1 whose fill value 0 is not tagged).
        bands: read only these bands of the file, in this order (:meth:`Scene.select_bands`);
            None for every data band.

    Returns:
        The :class:`Scene`.

    Raises:
        SceneError: missing path, a directory, not a raster, a truncated or corrupt file,
            no CRS (unless ``pixel_coords``), a rotated/sheared transform, an unsupported dtype,
            ``bands`` that are not data bands of the file; for a stack, a member that cannot be
            opened or does not overlap the first.
        AreaOutsideSceneError: a stack's area holds none of its pixels.
    """
    if bands is not None:
        return open_scene(path, pixel_coords=pixel_coords, nodata=nodata).select_bands(bands)
    source = path if isinstance(path, StackedSource) else None
    if isinstance(path, StackedSource):
        ds = open_raster(build_vrt(path).xml, shown=path.name)
    else:
        ds = open_raster(path)
    name, shown = ds.name, str(path)
    try:
        if ds.crs is None and not pixel_coords:
            if ds.gcps[0]:
                raise SceneError(
                    f"scene {shown} is georeferenced by ground control points only; "
                    "warp it to a grid first (gdalwarp SCENE OUT.tif) or pass --pixel-coords"
                )
            raise SceneError(
                f"scene {shown} has no CRS; it looks like an image without georeferencing; "
                "pass --pixel-coords to segment it in pixel coordinates"
            )
        check_transform(ds.transform, shown)
        alpha = alpha_index(ds)
        bands = [i for i in ds.indexes if i != alpha]
        if not bands:
            raise SceneError(f"scene {shown} has only an alpha band; pass a raster with data bands")
        dtypes = [ds.dtypes[i - 1] for i in bands]
        for dt in dtypes:
            if dt not in SUPPORTED_DTYPES:
                raise SceneError(
                    f"scene {shown} has pixel type {dt}, which geovae does not support; "
                    f"convert it to one of {', '.join(sorted(SUPPORTED_DTYPES))} (gdal_translate -ot Float32)"
                )
        nd = nodata if nodata is not None else ds.nodata
        flags = ds.mask_flag_enums[bands[0] - 1]
        if alpha is not None:
            kind = "alpha"
        elif MaskFlags.per_dataset in flags and MaskFlags.nodata not in flags:
            kind = "mask"
        else:
            kind = "nodata" if nd is not None else "none"
        scene = Scene(
            path=name,
            name=shown,
            width=ds.width,
            height=ds.height,
            count=len(bands),
            bands=bands,
            dtypes=dtypes,
            crs=None if pixel_coords and ds.crs is None else ds.crs,
            transform=ds.transform,
            nodata=None if nd is None else float(nd),
            alpha=alpha,
            descriptions=[ds.descriptions[i - 1] for i in bands],
            colorinterp=[ds.colorinterp[i - 1].name for i in bands],
            block_shapes=[(int(ds.block_shapes[i - 1][0]), int(ds.block_shapes[i - 1][1])) for i in bands],
            mask_kind=kind,
            pixel_coords=pixel_coords or ds.crs is None,
            source=source,
        )
    except BaseException:
        ds.close()
        raise
    # The handle that validated the scene stays open as this thread's (Scene.dataset): the
    # checks and the quicklook read through it instead of opening the scene again.
    scene._local.ds = ds
    return scene
