"""``geovae info``: everything about a raster's header, JSON-serialisable."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rasterio.enums import MaskFlags

from geovae.scene.raster import alpha_index, check_transform, open_raster

__all__ = ["describe_scene"]


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
        check_transform(ds.transform, shown)
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
        alpha = alpha_index(ds)
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
