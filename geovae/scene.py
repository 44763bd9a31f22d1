"""Open, validate and describe a raster scene; read windows of it with a valid-data mask.

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
import os
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
from rasterio.enums import ColorInterp, MaskFlags
from rasterio.errors import NotGeoreferencedWarning, RasterioError, RasterioIOError
from rasterio.windows import Window

from geovae.errors import CorruptSceneError, SceneError
from geovae.sources.stack import StackedSource, build_vrt, is_vrt_xml

__all__ = ["SUPPORTED_DTYPES", "Scene", "describe_scene", "gdal_path", "grid_mismatch", "open_raster", "open_scene"]

#: Pixel types a scene may have; everything real-valued that fits float32 well enough.
SUPPORTED_DTYPES = frozenset({"uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64"})

# scheme -> (GDAL prefix, keep the scheme in the name)
_REMOTE_PREFIXES = {
    "s3://": ("/vsis3/", False),
    "gs://": ("/vsigs/", False),
    "az://": ("/vsiaz/", False),
    "http://": ("/vsicurl/", True),
    "https://": ("/vsicurl/", True),
}


def capped_gdal_cache(limit_bytes: int) -> rasterio.Env:
    """A ``rasterio.Env`` whose GDAL block cache is at most ``limit_bytes`` (never raised).

    GDAL's block cache defaults to 5 % of RAM and keeps every block read or written until it
    is full, so a streaming job's memory would grow with the scene up to that size. geovae
    reads each block about once, so a small cache costs nothing. The cache size is process-wide
    in GDAL: two runs in threads of one process share the last value set.
    """
    from rasterio.env import get_gdal_config

    # rasterio reports the effective size in bytes, whatever form (MB, %) the user set.
    current = int(get_gdal_config("GDAL_CACHEMAX") or limit_bytes)
    return rasterio.Env(GDAL_CACHEMAX=min(current, int(limit_bytes)))


def gdal_path(path: str | os.PathLike[str]) -> str:
    """Turn a user's path or URL into the name GDAL opens.

    ``s3://b/k`` becomes ``/vsis3/b/k``, ``http(s)://...`` becomes ``/vsicurl/http(s)://...``;
    ``/vsi...`` names and local paths pass through (local paths made absolute).

    Args:
        path: local path, URL or GDAL virtual file name.

    Returns:
        The GDAL dataset name.
    """
    s = str(path)
    for scheme, (vsi, keep) in _REMOTE_PREFIXES.items():
        if s.lower().startswith(scheme):
            return vsi + (s if keep else s[len(scheme) :])
    if s.startswith("/vsi") or is_vrt_xml(s):
        return s
    return str(Path(s).expanduser().absolute())


def is_remote(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a URL or a GDAL virtual file rather than a local file.

    A Windows drive letter parses as a one-letter scheme; only real schemes count.
    """
    from urllib.parse import urlparse

    s = str(path)
    return len(urlparse(s).scheme) > 1 or s.startswith("/vsi")


def scene_stem(path: str | Path | StackedSource) -> str:
    """A scene's file name without folder, query string and extension: the outputs' stem.

    ``/data/LC08.TIF`` -> ``LC08``, ``https://host/a/b.tif?sig=1`` -> ``b``; a stacked source
    (a STAC Item's assets) has its own stem (the Item's id).
    """
    from urllib.parse import urlparse

    if isinstance(path, StackedSource):
        return path.stem
    s = str(path)
    name = (urlparse(s).path if is_remote(s) and "://" in s else s).rstrip("/").split("/")[-1]
    for ext in (".tif", ".tiff", ".vrt", ".jp2", ".img", ".nc"):
        if name.lower().endswith(ext):
            return name[: -len(ext)] or "scene"
    return (name.rsplit(".", 1)[0] if "." in name else name) or "scene"


def _is_local(name: str) -> bool:
    return not (name.startswith("/vsi") or is_vrt_xml(name))


def _check_local_file(name: str, shown: str, role: str) -> None:
    p = Path(name)
    if not p.exists():
        raise SceneError(f"{role} {shown} does not exist; check the path")
    if p.is_dir():
        raise SceneError(f"{role} {shown} is a directory, not a raster file; pass the image file inside it")
    if not os.access(p, os.R_OK):
        raise SceneError(f"{role} {shown} cannot be read (permission denied); check its permissions")
    if p.stat().st_size == 0:
        raise SceneError(f"{role} {shown} is an empty file; re-download or re-export it")


def _gdal_message(exc: BaseException) -> str:
    """GDAL's own message, on one line (rasterio chains it as the cause of a generic one)."""
    while exc.__cause__ is not None and "see previous exception" in str(exc).lower():
        exc = exc.__cause__
    return " ".join(str(exc).split())[:300]


def _check_tiff_extent(ds: rasterio.io.DatasetReader, name: str, shown: str, role: str) -> None:
    """Catch a truncated local GeoTIFF: some block lies past the end of the file.

    Reads only the TIFF directory (block offsets and sizes), never pixels.
    """
    if ds.driver != "GTiff" or not _is_local(name):
        return
    size = Path(name).stat().st_size
    bh, bw = ds.block_shapes[0]
    nby, nbx = math.ceil(ds.height / bh), math.ceil(ds.width / bw)
    # Pixel-interleaved files store one block for all bands; band-interleaved one per band.
    bands = [1] if ds.interleaving is None or ds.interleaving.name == "PIXEL" else list(ds.indexes)
    if nby * nbx * len(bands) > 200_000:
        bands = bands[:1]  # enough to catch a cut-off file without a long scan of a huge one
    for b in bands:
        for by in range(nby - 1, -1, -1):  # truncation loses the end: scan from the last rows
            for bx in range(nbx - 1, -1, -1):
                off = ds.get_tag_item(f"BLOCK_OFFSET_{bx}_{by}", "TIFF", bidx=b)
                cnt = ds.get_tag_item(f"BLOCK_SIZE_{bx}_{by}", "TIFF", bidx=b)
                if off is None or cnt is None:
                    return
                if int(off) + int(cnt) > size:
                    r0, c0 = by * bh, bx * bw
                    raise SceneError(
                        f"{role} {shown} is truncated: the block at rows {r0}-{min(r0 + bh, ds.height) - 1}, "
                        f"cols {c0}-{min(c0 + bw, ds.width) - 1} lies past the end of the file "
                        f"({size} bytes); re-download or re-export it"
                    )


def open_raster(
    path: str | os.PathLike[str], role: str = "scene", *, shown: str | None = None
) -> rasterio.io.DatasetReader:
    """Open any raster GDAL reads, local or remote, turning every failure into one line.

    The one way geovae opens a raster it reads (a scene, a class raster, labels, a confidence
    raster): the same remote paths (``s3://``, ``https://``, ``/vsi...``), the same checks
    (missing, a folder, empty, truncated GeoTIFF, a first block that cannot be decoded) and
    the same messages, naming the raster by its ``role``.

    Args:
        path: local path, URL or GDAL virtual file name (see :func:`gdal_path`).
        role: what the raster is to the caller, for messages (``"scene"``, ``"labels"``...).
        shown: how messages name it (default: ``path``; a stack's VRT is named by its source).

    Returns:
        The open dataset; the caller closes it.

    Raises:
        SceneError: with one line saying what is wrong and what to do.
    """
    shown = str(path) if shown is None else shown
    name = gdal_path(path)
    if _is_local(name):
        _check_local_file(name, shown, role)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            ds = rasterio.open(name)
    except RasterioIOError as exc:
        msg = _gdal_message(exc)
        if not _is_local(name):
            raise SceneError(
                f"{role} {shown} cannot be opened: {msg}; check the URL and your network/credentials"
            ) from None
        if "not recognized as" in msg or "not a supported file format" in msg:
            raise SceneError(
                f"{role} {shown} is not a raster GDAL can read; pass a GeoTIFF or another GDAL raster"
            ) from None
        raise SceneError(f"{role} {shown} is corrupt or unreadable: {msg}; re-download or re-export it") from None
    except RasterioError as exc:  # pragma: no cover - other GDAL open failures
        raise SceneError(f"{role} {shown} cannot be opened: {_gdal_message(exc)}") from None
    try:
        if ds.count == 0:
            raise SceneError(f"{role} {shown} has no raster bands (is it a vector or a container?); pass a raster")
        _check_tiff_extent(ds, name, shown, role)
        # Decode one pixel: catches corrupt headers and codecs that open but cannot read.
        try:
            ds.read(1, window=Window(0, 0, 1, 1))
        except RasterioError as exc:
            raise SceneError(
                f"{role} {shown} is corrupt: its first block cannot be decoded ({_gdal_message(exc)}); "
                "re-download or re-export it"
            ) from None
    except Exception:
        ds.close()
        raise
    return ds


def _check_transform(t: Affine, shown: str) -> None:
    if t.b != 0 or t.d != 0:
        raise SceneError(
            f"scene {shown} has a rotated or sheared geotransform, which geovae does not support; "
            "warp it north-up first (gdalwarp SCENE OUT.tif)"
        )
    if t.a == 0 or t.e == 0:
        raise SceneError(f"scene {shown} has a zero pixel size in its geotransform; fix its georeferencing")


def _alpha_index(ds: rasterio.io.DatasetReader) -> int | None:
    for i, ci in enumerate(ds.colorinterp, start=1):
        if ci == ColorInterp.alpha:
            return i
    return None


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
        return [self.path] if _is_local(self.path) else []

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
        if not _is_local(self.path):
            # Over a network, a failed read is a lost connection or a vanished file far
            # more often than a corrupt one.
            return CorruptSceneError(
                f"scene {self.name} cannot be read at {where}: {_gdal_message(err or exc)}; check the URL and your network"
            )
        return CorruptSceneError(
            f"scene {self.name} is corrupt at {where}: {_gdal_message(err or exc)}; re-download or re-export it"
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
            msg = _gdal_message(exc)
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


def grid_mismatch(ref: Any, other: Any, precision: float = 1e-9) -> list[str]:
    """How raster ``other`` differs from ``ref``'s pixel grid; empty when they share it exactly.

    Rasters written together (classes, confidence, uncertainty) or meant to be compared pixel by
    pixel (a prediction and its labels) must agree in shape, CRS and transform.

    Args:
        ref: an open rasterio dataset (the reference grid).
        other: an open rasterio dataset.
        precision: tolerance on the transform's coefficients.

    Returns:
        Human-readable differences, e.g. ``["shape 10x12 vs 10x13"]``.
    """
    problems = []
    if (other.height, other.width) != (ref.height, ref.width):
        problems.append(f"shape {other.height}x{other.width} vs {ref.height}x{ref.width}")
    if other.crs != ref.crs:
        problems.append(f"CRS {other.crs} vs {ref.crs}")
    if not other.transform.almost_equals(ref.transform, precision=precision):
        problems.append(f"transform {tuple(other.transform)[:6]} vs {tuple(ref.transform)[:6]}")
    return problems


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
        _check_transform(ds.transform, shown)
        alpha = _alpha_index(ds)
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


def _mask_flag_names(flags: list[MaskFlags]) -> list[str]:
    return [f.name for f in flags]


def describe_scene(path: str | Path) -> dict[str, Any]:
    """Everything ``geovae info`` shows about a raster, JSON-serialisable.

    Args:
        path: local path, URL or GDAL name.

    Returns:
        A dict with driver, width, height, count (all bands, alpha included), data_count,
        dtypes, descriptions, crs, epsg, transform (6 numbers a, b, c, d, e, f), res,
        bounds (native left, bottom, right, top), bounds_wgs84 (None without CRS), nodata,
        mask_flags (per band), alpha_band, block_shapes, overviews (per band), compression,
        interleave, is_tiled, colorinterp.

    Raises:
        SceneError: as :func:`open_scene`, except that a missing CRS is reported, not refused.
    """
    ds = open_raster(path)
    name, shown = ds.name, str(path)
    try:
        _check_transform(ds.transform, shown)
        t = ds.transform
        crs = ds.crs
        bounds = ds.bounds
        wgs84 = None
        epsg = None
        crs_name = None
        if crs is not None:
            from rasterio.warp import transform_bounds

            try:
                epsg = crs.to_epsg()
            except Exception:  # pragma: no cover - unusual CRS definitions
                epsg = None
            try:
                from pyproj import CRS as PCRS

                crs_name = PCRS.from_wkt(crs.to_wkt()).name
            except Exception:  # pragma: no cover
                crs_name = None
            try:
                wgs84 = [float(v) for v in transform_bounds(crs, "EPSG:4326", *bounds, densify_pts=21)]
            except Exception:  # pragma: no cover - CRS PROJ cannot transform
                wgs84 = None
        alpha = _alpha_index(ds)
        return {
            "path": shown,
            "gdal_path": name,
            "driver": ds.driver,
            "width": ds.width,
            "height": ds.height,
            "count": ds.count,
            "data_count": ds.count - (alpha is not None),
            "dtypes": list(ds.dtypes),
            "descriptions": list(ds.descriptions),
            "colorinterp": [c.name for c in ds.colorinterp],
            "crs": None if crs is None else (f"EPSG:{epsg}" if epsg else crs.to_string()),
            "crs_name": crs_name,
            "crs_wkt": None if crs is None else crs.to_wkt(),
            "epsg": epsg,
            "is_geographic": None if crs is None else bool(crs.is_geographic),
            "transform": [t.a, t.b, t.c, t.d, t.e, t.f],
            "res": [abs(t.a), abs(t.e)],
            "bounds": [bounds.left, bounds.bottom, bounds.right, bounds.top],
            "bounds_wgs84": wgs84,
            "nodata": ds.nodata,
            "mask_flags": [_mask_flag_names(f) for f in ds.mask_flag_enums],
            "alpha_band": alpha,
            "block_shapes": [list(b) for b in ds.block_shapes],
            "overviews": [ds.overviews(i) for i in ds.indexes],
            "compression": ds.compression.name if ds.compression else None,
            "interleave": ds.interleaving.name if ds.interleaving else None,
            "is_tiled": bool(ds.profile.get("tiled", False)),
        }
    finally:
        ds.close()
