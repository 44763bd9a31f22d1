"""Rasters stacked band-wise into one scene, read lazily through a GDAL VRT.

A :class:`StackedSource` names rasters (local files, URLs of Cloud-Optimized GeoTIFFs, a STAC
Item's band assets) in band order, and optionally an area to clip to and a pixel size.
:func:`build_vrt` turns it into a GDAL VRT written as an XML string: GDAL opens the string
itself as a dataset name, so nothing is written to disk and the string travels to Dask
workers inside the pickled scene. Reading a window of the VRT reads only that window of each
member (HTTP range requests for a remote COG).

The grid is the first raster's: its CRS, its origin and extent, the finest pixel size of the
members in that CRS (or the one asked for). A member on another grid of the same CRS is
resampled by the VRT (nearest neighbour, so every value stays a measured one); a member in
another CRS is warped onto the grid by a warped VRT (rasterio's ``WarpedVRT`` serialised by
GDAL), nested in the stack as its source. An area (a GeoJSON geometry in WGS84) clips the
grid to the window of the area's bounds in the scene's CRS, snapped outwards to whole pixels.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from affine import Affine

from geovae.errors import AreaOutsideSceneError, SceneError

__all__ = ["Raster", "StackedSource", "StackedVrt", "build_vrt", "stack_rasters"]

#: How far (in pixels) a member's grid may be from the scene's and still count as the same.
_GRID_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Raster:
    """One member of a stack: a raster file or URL, all of whose bands are stacked.

    Attributes:
        href: local path or URL (``s3://``, ``https://``, a GDAL ``/vsi...`` name).
        key: the STAC asset key it came from, if any.
        band_names: a name per band (from the asset's ``eo:bands``); empty to name the bands
            by ``key`` (a one-band asset) or by the file's own band descriptions.
        bands: what the asset's metadata says of each band (``eo:bands`` entries), recorded
            in the outputs' provenance.
    """

    href: str
    key: str | None = None
    band_names: tuple[str, ...] = ()
    bands: tuple[dict[str, Any], ...] = ()

    @property
    def label(self) -> str:
        """How messages name it: ``asset red (https://...)`` or the path."""
        return f"asset {self.key} ({self.href})" if self.key else self.href


@dataclass(frozen=True)
class StackedSource:
    """Rasters to be read as one multi-band scene (see :func:`build_vrt`).

    A source is what :func:`geovae.scene.open_scene` opens besides a plain path; it pickles
    small (names only), so a batch sends it to a worker, which builds the VRT again there.

    Attributes:
        rasters: the members, in band order.
        name: how the user and the manifest name the scene (a STAC Item's URL, ``A.tif+B.tif``).
        stem: the outputs' file stem and the batch folder (a STAC Item's id).
        resolution: pixel size in the first raster's CRS units; None for the finest member's.
        area: a GeoJSON geometry in WGS84 (EPSG:4326) to clip to; None for the whole grid.
        item: the STAC Item the rasters came from (``id``, ``collection``, ``href``,
            ``datetime``), recorded in the outputs' provenance.
        error: why this source cannot be read (an Item without an asset asked for), raised
            when it is opened, so that a batch fails that scene alone.
    """

    rasters: tuple[Raster, ...]
    name: str
    stem: str
    resolution: float | None = None
    area: dict[str, Any] | None = None
    item: dict[str, Any] | None = None
    error: str | None = None
    _meta: dict[str, Any] = field(default_factory=dict, repr=False, compare=False, hash=False)

    def __str__(self) -> str:
        return self.name

    @property
    def local_files(self) -> list[str]:
        """The members that are local files (an output must never replace one)."""
        from geovae.scene import is_remote

        return [r.href for r in self.rasters if not is_remote(r.href)]

    def provenance(self) -> dict[str, Any]:
        """What the outputs record of their source: the Item, the assets read, grid and area."""
        doc: dict[str, Any] = {
            "assets": [
                {
                    **({"key": r.key} if r.key else {}),
                    "href": r.href,
                    **({"bands": list(r.bands)} if r.bands else {}),
                }
                for r in self.rasters
            ],
            "band_names": self._meta.get("band_names"),
            "resolution": self._meta.get("resolution", self.resolution),
            "area": self.area,
            "window": self._meta.get("window"),
        }
        if self.item:
            doc["item"] = dict(self.item)
        return doc


def stack_rasters(
    paths: list[str],
    *,
    resolution: float | None = None,
    area: dict[str, Any] | None = None,
) -> StackedSource:
    """Rasters stacked band-wise (``geovae segment A.tif B.tif --stack``), named after them.

    Args:
        paths: local paths or URLs, in band order; each contributes all its bands.
        resolution: pixel size of the stack; None for the finest member's.
        area: GeoJSON geometry (WGS84) to clip to.

    Returns:
        The source; :func:`geovae.scene.open_scene` opens it.
    """
    from geovae.scene import is_remote, scene_stem

    hrefs = [p if is_remote(p) else str(Path(p).expanduser().absolute()) for p in paths]
    stems = [scene_stem(p) for p in paths]
    return StackedSource(
        rasters=tuple(Raster(h) for h in hrefs),
        name="+".join(paths),
        stem="+".join(stems),
        resolution=resolution,
        area=area,
    )


@dataclass(frozen=True)
class StackedVrt:
    """A stack's VRT and the grid it defines.

    Attributes:
        xml: the VRT document; GDAL opens it as a dataset name.
        crs: the stack's CRS (the first raster's).
        transform: its geotransform (of the clipped window when an area is given).
        width, height: its size in pixels.
        window: ``[col_off, row_off, width, height]`` of the clip on the unclipped grid.
        band_names: the name of each band of the stack.
        resolution: the stack's pixel size (x, y).
    """

    xml: str
    crs: Any
    transform: Affine
    width: int
    height: int
    window: list[int]
    band_names: list[str]
    resolution: tuple[float, float]


@dataclass
class _Member:
    raster: Raster
    crs: Any
    transform: Affine
    width: int
    height: int
    count: int
    dtypes: list[str]
    nodata: list[float | None]
    descriptions: list[str | None]
    name: str  # what GDAL opens


def _inspect(raster: Raster, source: StackedSource) -> _Member:
    from geovae.scene import open_raster

    ds = open_raster(raster.href, role=f"asset {raster.key}" if raster.key else "raster")
    try:
        if ds.crs is None:
            raise SceneError(
                f"{raster.label} of {source.name} has no CRS; stacking needs georeferenced rasters "
                "(assign one with gdal_edit.py -a_srs)"
            )
        t = ds.transform
        if t.b != 0 or t.d != 0:
            raise SceneError(
                f"{raster.label} of {source.name} has a rotated geotransform; warp it north-up first "
                "(gdalwarp IN OUT.tif)"
            )
        return _Member(
            raster,
            ds.crs,
            t,
            ds.width,
            ds.height,
            ds.count,
            list(ds.dtypes),
            list(ds.nodatavals),
            list(ds.descriptions),
            ds.name,
        )
    finally:
        ds.close()


def _area_bounds(area: dict[str, Any], crs: Any) -> tuple[float, float, float, float]:
    """The area's bounds in ``crs``: its WGS84 bounding box densified and transformed."""
    import shapely.geometry
    from rasterio.warp import transform_bounds

    w, s, e, n = shapely.geometry.shape(area).bounds
    left, bottom, right, top = transform_bounds("EPSG:4326", crs, w, s, e, n, densify_pts=21)
    return (left, bottom, right, top)


def _overlaps(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _bounds(t: Affine, width: int, height: int) -> tuple[float, float, float, float]:
    x0, y0 = t.c, t.f
    x1, y1 = t @ (width, height)
    return (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


def _warped_xml(member: _Member, crs: Any, transform: Affine, width: int, height: int) -> str:
    """A warped VRT of ``member`` on the given grid, as GDAL serialises it."""
    import rasterio
    import rasterio.shutil
    from rasterio.enums import Resampling
    from rasterio.io import MemoryFile
    from rasterio.vrt import WarpedVRT

    with (
        rasterio.open(member.name) as src,
        WarpedVRT(src, crs=crs, transform=transform, width=width, height=height, resampling=Resampling.nearest) as vrt,
        MemoryFile() as mem,
    ):
        rasterio.shutil.copy(vrt, mem.name, driver="VRT")
        return bytes(mem.read()).decode("utf-8")


def _fmt(v: float) -> str:
    return repr(float(v))


def build_vrt(source: StackedSource) -> StackedVrt:
    """The VRT of a stack: every band of every member, on the first member's grid, clipped.

    Reads each member's header only (a few range requests for a remote COG).

    Args:
        source: the rasters, pixel size and area.

    Returns:
        The VRT document and its grid.

    Raises:
        SceneError: a member cannot be opened, has no CRS, or does not overlap the first.
        AreaOutsideSceneError: the area does not overlap the stack.
    """
    if source.error is not None:
        raise SceneError(source.error)
    if not source.rasters:
        raise SceneError(f"{source.name}: nothing to stack; name at least one raster")
    members = [_inspect(r, source) for r in source.rasters]
    ref = members[0]
    crs = ref.crs
    same = [m for m in members if m.crs == crs]
    if source.resolution is not None:
        if not (math.isfinite(source.resolution) and source.resolution > 0):
            raise SceneError(f"--resolution {source.resolution}: must be a positive pixel size")
        rx = ry = float(source.resolution)
    else:
        rx = min(abs(m.transform.a) for m in same)
        ry = min(abs(m.transform.e) for m in same)
    left, bottom, right, top = _bounds(ref.transform, ref.width, ref.height)
    full_w = max(1, math.ceil((right - left) / rx - _GRID_TOLERANCE))
    full_h = max(1, math.ceil((top - bottom) / ry - _GRID_TOLERANCE))
    c0, r0, c1, r1 = 0, 0, full_w, full_h
    if source.area is not None:
        aw, as_, ae, an = _area_bounds(source.area, crs)
        c0 = max(0, math.floor((aw - left) / rx + _GRID_TOLERANCE))
        c1 = min(full_w, math.ceil((ae - left) / rx - _GRID_TOLERANCE))
        r0 = max(0, math.floor((top - an) / ry + _GRID_TOLERANCE))
        r1 = min(full_h, math.ceil((top - as_) / ry - _GRID_TOLERANCE))
        if c1 <= c0 or r1 <= r0:
            raise AreaOutsideSceneError(
                f"the area lies outside {source.name} (no pixel of it is in the area); nothing to segment there"
            )
    width, height = c1 - c0, r1 - r0
    transform = Affine(rx, 0.0, left + c0 * rx, 0.0, -ry, top - r0 * ry)
    grid_bounds = _bounds(transform, width, height)

    bands_xml: list[str] = []
    names: list[str] = []
    for m in members:
        if m.crs == crs:
            mb = _bounds(m.transform, m.width, m.height)
        else:
            from rasterio.warp import transform_bounds

            mb = tuple(transform_bounds(m.crs, crs, *_bounds(m.transform, m.width, m.height), densify_pts=21))
        if not _overlaps(mb, grid_bounds):
            what = "the area" if source.area is not None else f"the first raster ({ref.raster.label})"
            raise SceneError(
                f"{m.raster.label} of {source.name} does not overlap {what}; stack rasters of the same place"
            )
        if m.crs == crs:
            s = m.transform
            src_name = m.name
            rect = (
                (transform.c - s.c) / s.a,
                (transform.f - s.f) / s.e,
                width * rx / abs(s.a),
                height * ry / abs(s.e),
            )
        else:
            src_name = _warped_xml(m, crs, transform, width, height)
            rect = (0.0, 0.0, float(width), float(height))
        for b in range(1, m.count + 1):
            if m.raster.band_names and b <= len(m.raster.band_names):
                bname = m.raster.band_names[b - 1]
            elif m.raster.key and m.count == 1:
                bname = m.raster.key
            elif m.raster.key:
                bname = f"{m.raster.key}_{b}"
            else:
                bname = m.descriptions[b - 1] or (
                    _short(m.raster.href) if m.count == 1 else f"{_short(m.raster.href)}_{b}"
                )
            names.append(bname)
            nd = m.nodata[b - 1]
            nodata_xml = "" if nd is None else f"<NoDataValue>{_fmt(nd)}</NoDataValue>"
            bands_xml.append(
                f'<VRTRasterBand dataType="{_gdal_type(m.dtypes[b - 1])}" band="{len(names)}">'
                f"{nodata_xml}<Description>{escape(bname)}</Description>"
                f'<SimpleSource><SourceFilename relativeToVRT="0">{escape(src_name)}</SourceFilename>'
                f"<SourceBand>{b}</SourceBand>"
                f'<SrcRect xOff="{_fmt(rect[0])}" yOff="{_fmt(rect[1])}" xSize="{_fmt(rect[2])}" '
                f'ySize="{_fmt(rect[3])}"/>'
                f'<DstRect xOff="0" yOff="0" xSize="{width}" ySize="{height}"/>'
                "</SimpleSource></VRTRasterBand>"
            )
    t = transform
    xml = (
        f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}">'
        f"<SRS>{escape(crs.to_wkt())}</SRS>"
        f"<GeoTransform>{_fmt(t.c)}, {_fmt(t.a)}, {_fmt(t.b)}, {_fmt(t.f)}, {_fmt(t.d)}, {_fmt(t.e)}</GeoTransform>"
        + "".join(bands_xml)
        + "</VRTDataset>"
    )
    vrt = StackedVrt(xml, crs, transform, width, height, [c0, r0, width, height], names, (rx, ry))
    source._meta.update(band_names=names, resolution=[rx, ry], window=vrt.window)
    return vrt


def _short(href: str) -> str:
    from geovae.scene import scene_stem

    return scene_stem(href)


_GDAL_TYPES = {
    "uint8": "Byte",
    "int8": "Int8",
    "uint16": "UInt16",
    "int16": "Int16",
    "uint32": "UInt32",
    "int32": "Int32",
    "uint64": "UInt64",
    "int64": "Int64",
    "float32": "Float32",
    "float64": "Float64",
}


def _gdal_type(dtype: str) -> str:
    try:
        return _GDAL_TYPES[dtype]
    except KeyError:
        raise SceneError(f"a raster of pixel type {dtype} cannot be stacked; convert it first") from None


def is_vrt_xml(name: str | os.PathLike[str]) -> bool:
    """Whether a dataset name is a VRT document itself (what :func:`build_vrt` makes)."""
    return str(name).lstrip().startswith("<VRTDataset")
