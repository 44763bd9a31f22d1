"""Map tiles (Web Mercator, 256 px PNG) of a scene's output rasters, read by rio-tiler.

Each tile is warped from the overview that fits its zoom (the coarsest one still at least as
fine as the tile), so a request reads about one tile's worth of pixels whatever the raster's
size, and nothing holds a whole raster.
How each layer looks:

* ``classes``: the class raster's own colour table; nodata (255) transparent.
* ``confidence``: 0..1 through viridis.
* ``uncertainty``: band 1 (predictive entropy), 0..``MAX_ENTROPY`` (ln of the class count)
  through inferno.
* ``reconstruction_error``: its 2nd..98th percentile through magma.
* ``scene``: the input scene as RGB, with the bands and the per-band 2-98 % stretch of the
  quicklook (:func:`geovae.quicklook.choose_rgb_bands`, percentiles of the same 1280 px
  decimated read), so the map and the PNG look the same.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import rasterio
from rasterio.transform import from_bounds
from rio_tiler.colormap import cmap
from rio_tiler.reader import read
from rio_tiler.utils import render

from geovae.scene import capped_gdal_cache
from geovae.view.catalog import SceneEntry

log = logging.getLogger(__name__)

__all__ = ["TILE_SIZE", "LayerStyle", "TileRenderer", "empty_tile"]

TILE_SIZE = 256
#: GDAL block cache while serving tiles: each tile reads a few blocks once; GDAL's default
#: (5 % of RAM) would let the server's memory grow with every new part of a big raster viewed.
GDAL_CACHE_BYTES = 64 * 2**20
#: Zoom levels below the coarsest the file's overviews serve that are still drawn. Each level
#: down reads 4x the pixels; 3 levels is at most 2048 x 2048 source pixels for one tile.
#: A raster without overviews is shown only from its native zoom - 3 on.
MAX_LEVELS_BELOW_OVERVIEWS = 3
#: Same percentile stretch and decimated read as the quicklook (geovae.quicklook).
QUICKLOOK_MAX_SIZE = 1280
STRETCH_PERCENTILES = (2.0, 98.0)

_WEB_MERCATOR = "EPSG:3857"
_ORIGIN = math.pi * 6378137.0  # half the Web Mercator world's width, in metres
_COLORMAPS = {"confidence": "viridis", "uncertainty": "inferno", "reconstruction_error": "magma"}


@dataclass
class LayerStyle:
    """How one raster layer is drawn.

    Attributes:
        path: the file read (the output raster, or the input scene).
        indexes: 1-based bands read.
        ranges: per band (low, high) mapped to 0..255; None for the class raster.
        colormap: rio-tiler colormap name for one-band continuous layers, ``"table"`` for the
            class raster's own colour table, None for RGB.
        nodata: nodata value to mask, overriding the file's (the scene's ``--nodata``).
        minzoom: the zoom served by the coarsest overview; tiles more than
            :data:`MAX_LEVELS_BELOW_OVERVIEWS` below it are not drawn.
        bounds: the raster's bounds in Web Mercator, to skip tiles outside it cheaply.
        levels: pixel size in Web Mercator metres of the raster (first) and of each of its
            overviews, finest first.
    """

    path: str
    indexes: list[int]
    ranges: list[tuple[float, float]] | None
    colormap: str | None
    nodata: float | None
    minzoom: int
    bounds: tuple[float, float, float, float]
    levels: list[float]

    def legend(self) -> dict[str, Any]:
        """What the page shows for the layer: its value range and colour ramp (CSS colours)."""
        out: dict[str, Any] = {}
        if self.ranges and len(self.ranges) == 1:
            out["range"] = [float(self.ranges[0][0]), float(self.ranges[0][1])]
        if self.colormap and self.colormap != "table":
            cm = cmap.get(self.colormap)
            if isinstance(cm, dict):  # a value -> colour table; an interval colour map has no ramp
                out["ramp"] = ["#{:02x}{:02x}{:02x}".format(*cm[i][:3]) for i in (*range(0, 256, 32), 255)]
        return out


def _decimated(ds: Any, band: int, max_size: int) -> np.ndarray:
    """One band read at most ``max_size`` px on its longer side (from overviews), as float with NaN for nodata."""
    scale = max(ds.height, ds.width) / max_size
    shape = (ds.height, ds.width) if scale <= 1 else (max(1, round(ds.height / scale)), max(1, round(ds.width / scale)))
    a = ds.read(band, out_shape=shape, masked=True).astype("float64")
    return a.filled(np.nan)


def _percentile_range(values: np.ndarray, lo: float, hi: float) -> tuple[float, float]:
    v = values[np.isfinite(values)]
    if v.size == 0:
        return (0.0, 1.0)
    a, z = np.percentile(v, [lo, hi])
    return float(a), float(max(z, a + 1e-6))


def _mercator_bounds(ds: Any) -> tuple[float, float, float, float]:
    from rasterio.warp import transform_bounds

    w, s, e, n = transform_bounds(ds.crs, "EPSG:4326", *ds.bounds, densify_pts=21)
    s, n = max(s, -85.0511), min(n, 85.0511)
    return transform_bounds("EPSG:4326", _WEB_MERCATOR, w, s, e, n, densify_pts=21)


def _levels(ds: Any) -> list[float]:
    """Pixel size in Web Mercator metres of the raster and of each overview."""
    from rasterio.warp import calculate_default_transform

    t, _, _ = calculate_default_transform(ds.crs, _WEB_MERCATOR, ds.width, ds.height, *ds.bounds)
    return [abs(t.a)] + [abs(t.a) * ds.width / math.ceil(ds.width / f) for f in ds.overviews(1)]


def _coarsest_zoom(ds: Any, bounds3857: tuple[float, float, float, float]) -> int:
    """The Web Mercator zoom whose pixel matches the coarsest overview (or the raster itself)."""
    factors = ds.overviews(1) or [1]
    cols = max(1, math.ceil(ds.width / max(factors)))
    width_m = max(bounds3857[2] - bounds3857[0], 1e-9)
    res = width_m / cols  # metres of Web Mercator per coarsest pixel
    return max(0, math.floor(math.log2(2 * math.pi * 6378137.0 / (TILE_SIZE * res))))


def style_for(entry: SceneEntry, kind: str) -> LayerStyle:
    """Work out how to draw one layer of a scene (reads at most a 1280 px decimated view).

    Args:
        entry: the scene.
        kind: ``scene`` or a raster kind of :data:`geovae.view.catalog.RASTER_KINDS`.

    Returns:
        The :class:`LayerStyle`.

    Raises:
        KeyError: the scene has no such layer.
    """
    if kind == "scene":
        if entry.scene is None:
            raise KeyError(kind)
        return _scene_style(entry, entry.scene)
    path = entry.rasters[kind]
    with rasterio.open(path) as ds:
        bounds = _mercator_bounds(ds)
        minzoom = _coarsest_zoom(ds, bounds)
        res = _levels(ds)
        if kind == "classes":
            return LayerStyle(str(path), [1], None, "table", None, minzoom, bounds, res)
        if kind == "confidence":
            rng = (0.0, 1.0)
        elif kind == "uncertainty":
            try:
                rng = (0.0, float(ds.tags().get("MAX_ENTROPY", "nan")))
            except ValueError:
                rng = (0.0, math.nan)
            if not math.isfinite(rng[1]) or rng[1] <= 0:
                rng = _percentile_range(_decimated(ds, 1, 1024), 0, 99)
        else:
            rng = _percentile_range(_decimated(ds, 1, 1024), *STRETCH_PERCENTILES)
    return LayerStyle(str(path), [1], [rng], _COLORMAPS.get(kind, "viridis"), None, minzoom, bounds, res)


def _scene_style(entry: SceneEntry, path: str) -> LayerStyle:
    """The quicklook's RGB bands and stretch, for tiles of the input scene."""
    # the quicklook's band choice, the one definition of which bands show as RGB
    from geovae.quicklook import choose_rgb_bands
    from geovae.scene import open_scene

    scene = open_scene(path, nodata=entry.nodata)
    try:
        bands = choose_rgb_bands(scene, entry.band_names)
        data, valid = scene.read_overview(QUICKLOOK_MAX_SIZE, bands=bands)
        ranges = []
        for b in range(data.shape[0]):
            vals = data[b][valid]
            ranges.append(_percentile_range(vals, *STRETCH_PERCENTILES) if vals.size else (0.0, 1.0))
        indexes = [scene.bands[b - 1] for b in bands]
        path = scene.path
    finally:
        scene.close()
    with rasterio.open(path) as ds:
        bounds = _mercator_bounds(ds)
        minzoom = _coarsest_zoom(ds, bounds)
        res = _levels(ds)
    return LayerStyle(path, indexes, ranges, None, entry.nodata, minzoom, bounds, res)


_EMPTY: bytes | None = None


def empty_tile() -> bytes:
    """A transparent 256 px PNG, for tiles with nothing to draw."""
    global _EMPTY
    if _EMPTY is None:
        _EMPTY = render(
            np.zeros((1, TILE_SIZE, TILE_SIZE), np.uint8), np.zeros((TILE_SIZE, TILE_SIZE), np.uint8), img_format="PNG"
        )
    return _EMPTY


class TileRenderer:
    """Renders the tiles of every layer of a catalog; styles are worked out once, on first use."""

    def __init__(self, entries: dict[str, SceneEntry]) -> None:
        self._entries = entries
        self._styles: dict[tuple[str, str], LayerStyle | None] = {}
        self._lock = threading.Lock()
        self._style_locks: dict[tuple[str, str], threading.Lock] = {}
        self._started: set[tuple[str, str]] = set()

    def prepare_in_background(self, sid: str, kind: str) -> None:
        """Start working out a layer's style in a thread of its own (once)."""
        with self._lock:
            if (sid, kind) in self._started:
                return
            self._started.add((sid, kind))
        threading.Thread(
            target=self.style, args=(sid, kind), name=f"geovae-view-style-{sid}-{kind}", daemon=True
        ).start()

    def ready(self, sid: str, kind: str) -> bool:
        """Whether the layer's style is worked out (its tiles then come without delay)."""
        return (sid, kind) in self._styles

    def style(self, sid: str, kind: str) -> LayerStyle | None:
        """The layer's style, or None when the scene or layer does not exist or cannot be read."""
        key = (sid, kind)
        if key in self._styles:
            return self._styles[key]
        entry = self._entries.get(sid)
        if entry is None or (kind != "scene" and kind not in entry.rasters) or (kind == "scene" and not entry.scene):
            return None
        with self._lock:
            lock = self._style_locks.setdefault(key, threading.Lock())
        with lock:  # one reader of the decimated view per layer, however many tiles ask at once
            if key not in self._styles:
                try:
                    self._styles[key] = style_for(entry, kind)
                except Exception as e:
                    log.warning("layer %s of %s cannot be shown: %s", kind, entry.name, e)
                    self._styles[key] = None
        return self._styles[key]

    def tile(self, sid: str, kind: str, z: int, x: int, y: int) -> bytes | None:
        """One PNG tile; :func:`empty_tile` where the layer has nothing there; None for an unknown layer."""
        style = self.style(sid, kind)
        if style is None:
            return None
        return render_tile(style, z, x, y)


def render_tile(style: LayerStyle, z: int, x: int, y: int) -> bytes:
    """Read and draw one Web Mercator tile of a layer.

    Args:
        style: the layer.
        z, x, y: the tile (XYZ scheme, as Leaflet asks for it).

    Returns:
        PNG bytes (transparent where there is no data or the tile is outside the raster).
    """
    n = 2**z
    if not (0 <= x < n and 0 <= y < n) or z < style.minzoom - MAX_LEVELS_BELOW_OVERVIEWS:
        return empty_tile()
    left, bottom, right, top = _tile_bounds(z, x, y)
    b = style.bounds
    if right <= b[0] or left >= b[2] or top <= b[1] or bottom >= b[3]:
        return empty_tile()
    # The coarsest overview still at least as fine as the tile, warped straight to the tile's
    # 256 x 256 grid. rio-tiler's Reader.tile warps to the raster's own resolution and lets
    # GDAL decimate; on a warped dataset that builds implicit overviews, each with its own
    # coordinate transformation: 1.1 s a tile on a 20480^2 raster in NC's NAD83(HARN), which
    # needs a datum shift, against 40 ms this way (docs/benchmarks.md).
    out_res = (right - left) / TILE_SIZE
    level = max((i for i, r in enumerate(style.levels) if r <= out_res * 1.001), default=0)
    with (
        capped_gdal_cache(GDAL_CACHE_BYTES),
        rasterio.open(style.path, **({"OVERVIEW_LEVEL": level - 1} if level else {})) as ds,
    ):
        vrt = {
            "crs": _WEB_MERCATOR,
            "transform": from_bounds(left, bottom, right, top, TILE_SIZE, TILE_SIZE),
            "width": TILE_SIZE,
            "height": TILE_SIZE,
            "dtype": ds.dtypes[0],
        }
        img = read(ds, indexes=style.indexes, width=TILE_SIZE, height=TILE_SIZE, nodata=style.nodata, vrt_options=vrt)
        if style.colormap == "table":
            try:
                table = ds.colormap(1)
            except ValueError:
                table = None
            return img.render(img_format="PNG", colormap=table, ZLEVEL=1)
    assert style.ranges is not None
    img = img.rescale(in_range=style.ranges)
    if style.colormap:
        return img.render(img_format="PNG", colormap=cmap.get(style.colormap), ZLEVEL=1)
    return img.render(img_format="PNG", ZLEVEL=1)


def _tile_bounds(z: int, x: int, y: int) -> tuple[float, float, float, float]:
    """(left, bottom, right, top) of an XYZ tile in Web Mercator metres."""
    size = 2 * _ORIGIN / 2**z
    left, top = -_ORIGIN + x * size, _ORIGIN - y * size
    return left, top - size, left + size, top
