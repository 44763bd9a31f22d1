"""The run report (``<stem>.json``): what went in, what came out, how long it took.

Written last, it vouches for the output set: it lists exactly the files of its run, by
name relative to its own folder. A pipeline can read the scene's footprint in WGS84, the
model file's hash, the versions that made it, per-stage timings, the class areas and how
much of the scene looked unlike the training data.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from geovae._version import __version__
from geovae.model.base import SegmentationModel
from geovae.products import area_column
from geovae.scene import Scene

__all__ = ["build_report", "footprint_wgs84", "model_summary", "scene_summary", "versions"]


def versions() -> dict[str, str]:
    """Versions of geovae and the libraries that shape its outputs."""
    import rasterio
    import torch

    return {
        "geovae": __version__,
        "torch": torch.__version__,
        "gdal": rasterio.__gdal_version__,
        "rasterio": rasterio.__version__,
    }


def footprint_wgs84(scene: Scene) -> list[float] | None:
    """The scene's bounds in WGS84 (west, south, east, north), or None without a CRS."""
    if scene.crs is None:
        return None
    from rasterio.warp import transform_bounds

    try:
        return [float(v) for v in transform_bounds(scene.crs, "EPSG:4326", *scene.bounds, densify_pts=21)]
    except Exception:
        return None


def scene_summary(scene: Scene) -> dict[str, Any]:
    """The report's ``scene`` entry."""
    t = scene.transform
    epsg = None
    if scene.crs is not None:
        try:
            epsg = scene.crs.to_epsg()
        except Exception:
            epsg = None
    return {
        "path": scene.name,
        "width": scene.width,
        "height": scene.height,
        "bands": scene.count,
        "dtypes": scene.dtypes,
        "crs": None if scene.crs is None else (f"EPSG:{epsg}" if epsg else scene.crs.to_string()),
        "transform": [t.a, t.b, t.c, t.d, t.e, t.f],
        "bounds": list(scene.bounds),
        "bounds_wgs84": footprint_wgs84(scene),
        "nodata": scene.nodata,
        "mask": scene.mask_kind,
        "pixel_coords": scene.crs is None,
        **({"source": scene.source.provenance()} if scene.source is not None else {}),
    }


def model_summary(model: SegmentationModel, source: str | None, sha256: str | None = None) -> dict[str, Any]:
    """The report's ``model`` entry; a pretrained TorchGeo weight set adds ``weights`` (its name,
    URL, licence, training data), which whoever publishes the outputs needs."""
    i = model.info
    return {
        "source": source,
        "sha256": sha256,
        "kind": i.kind,
        "backend": model.backend,
        "in_channels": i.in_channels,
        "num_classes": i.num_classes,
        "class_ids": i.class_ids,
        "class_names": i.class_names,
        "class_colors": [[int(v) for v in c][:3] for c in i.class_colors],
        "tile_size": i.tile_size,
        "stride": i.stride,
        "band_names": i.band_names,
        "supports_samples": model.supports_samples,
        "supports_reconstruction": model.supports_reconstruction,
        **({"weights": i.extra["weights"]} if isinstance(i.extra.get("weights"), dict) else {}),
    }


def build_report(
    *,
    scene: Scene,
    model: SegmentationModel,
    source: str | None,
    model_sha256: str | None,
    options: dict[str, Any],
    tiles: dict[str, Any],
    timings: dict[str, float],
    class_pixels: np.ndarray,
    class_area: np.ndarray,
    class_flagged: np.ndarray | None,
    area_unit: str,
    trust: dict[str, Any],
    outputs: dict[str, Path],
    folder: Path,
    polygons: dict[str, int] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The report of one run, JSON-serialisable.

    Args:
        outputs: final paths by kind (the report's own included); written relative to
            ``folder``, the report's folder.
        polygons: polygon count per format.
        class_flagged: pixels per class above the anomaly threshold, or None when the run
            did not count them.
        area_unit: how areas were measured (:attr:`geovae.areas.AreaMeasure.unit`).

    Returns:
        The report.
    """
    info = model.info
    pixel_coords = scene.crs is None
    area_key = area_column(pixel_coords)
    total_area = float(class_area.sum())
    total_px = int(class_pixels.sum())
    classes = []
    for k, (c, n, px, a) in enumerate(zip(info.class_ids, info.class_names, class_pixels, class_area)):
        entry = {
            "id": int(c),
            "name": n,
            "pixels": int(px),
            area_key: float(a),
            "fraction": float(a / total_area) if total_area else 0.0,
        }
        if class_flagged is not None:
            entry["anomaly_fraction"] = float(class_flagged[k] / px) if px else 0.0
        classes.append(entry)
    if class_flagged is not None:
        flagged = int(class_flagged.sum())
        trust = {
            **trust,
            "anomaly": {
                **trust.get("anomaly", {}),
                "flagged_pixels": flagged,
                "fraction": flagged / total_px if total_px else 0.0,
            },
        }
    return {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "geovae_version": __version__,
        "versions": versions(),
        "scene": scene_summary(scene),
        "model": model_summary(model, source, model_sha256),
        "options": options,
        "tiles": tiles,
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
        **(extra or {}),
        "area_unit": area_unit,
        "classes": classes,
        "trust": trust,
        "polygons": polygons or {},
        "outputs": {
            k: str(Path(v).relative_to(folder)) if Path(v).is_relative_to(folder) else str(v)
            for k, v in outputs.items()
        },
    }
