"""Any raster geovae reads: the name GDAL opens, opening it with one-line errors, its header checks.

:func:`open_raster` is the one way geovae opens a raster it reads (a scene, a class raster,
labels, a confidence raster); :func:`gdal_path` turns a path or URL into GDAL's name;
:func:`grid_mismatch` compares two rasters' pixel grids; :func:`capped_gdal_cache` bounds
GDAL's block cache for a streaming job.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any

import rasterio
from affine import Affine
from rasterio.enums import ColorInterp
from rasterio.errors import NotGeoreferencedWarning, RasterioError, RasterioIOError
from rasterio.windows import Window

from geovae.errors import SceneError
from geovae.sources.stack import StackedSource, is_vrt_xml

__all__ = [
    "alpha_index",
    "capped_gdal_cache",
    "check_transform",
    "gdal_message",
    "gdal_path",
    "grid_mismatch",
    "is_local",
    "is_remote",
    "open_raster",
    "scene_stem",
]

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


def is_local(name: str) -> bool:
    """Whether a GDAL dataset name (:func:`gdal_path`) is a local file."""
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


def gdal_message(exc: BaseException) -> str:
    """GDAL's own message, on one line (rasterio chains it as the cause of a generic one)."""
    while exc.__cause__ is not None and "see previous exception" in str(exc).lower():
        exc = exc.__cause__
    return " ".join(str(exc).split())[:300]


def _check_tiff_extent(ds: rasterio.io.DatasetReader, name: str, shown: str, role: str) -> None:
    """Catch a truncated local GeoTIFF: some block lies past the end of the file.

    Reads only the TIFF directory (block offsets and sizes), never pixels.
    """
    if ds.driver != "GTiff" or not is_local(name):
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
    if is_local(name):
        _check_local_file(name, shown, role)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            ds = rasterio.open(name)
    except RasterioIOError as exc:
        msg = gdal_message(exc)
        if not is_local(name):
            raise SceneError(
                f"{role} {shown} cannot be opened: {msg}; check the URL and your network/credentials"
            ) from None
        if "not recognized as" in msg or "not a supported file format" in msg:
            raise SceneError(
                f"{role} {shown} is not a raster GDAL can read; pass a GeoTIFF or another GDAL raster"
            ) from None
        raise SceneError(f"{role} {shown} is corrupt or unreadable: {msg}; re-download or re-export it") from None
    except RasterioError as exc:  # pragma: no cover - other GDAL open failures
        raise SceneError(f"{role} {shown} cannot be opened: {gdal_message(exc)}") from None
    try:
        if ds.count == 0:
            raise SceneError(f"{role} {shown} has no raster bands (is it a vector or a container?); pass a raster")
        _check_tiff_extent(ds, name, shown, role)
        # Decode one pixel: catches corrupt headers and codecs that open but cannot read.
        try:
            ds.read(1, window=Window(0, 0, 1, 1))
        except RasterioError as exc:
            raise SceneError(
                f"{role} {shown} is corrupt: its first block cannot be decoded ({gdal_message(exc)}); "
                "re-download or re-export it"
            ) from None
    except Exception:
        ds.close()
        raise
    return ds


def check_transform(t: Affine, shown: str) -> None:
    """Refuse a rotated or sheared geotransform, or one with a zero pixel size.

    Raises:
        SceneError: naming the scene as ``shown``.
    """
    if t.b != 0 or t.d != 0:
        raise SceneError(
            f"scene {shown} has a rotated or sheared geotransform, which geovae does not support; "
            "warp it north-up first (gdalwarp SCENE OUT.tif)"
        )
    if t.a == 0 or t.e == 0:
        raise SceneError(f"scene {shown} has a zero pixel size in its geotransform; fix its georeferencing")


def alpha_index(ds: rasterio.io.DatasetReader) -> int | None:
    """The 1-based index of the dataset's alpha band, or None."""
    for i, ci in enumerate(ds.colorinterp, start=1):
        if ci == ColorInterp.alpha:
            return i
    return None


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
