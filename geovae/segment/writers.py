"""What a run writes besides its block sinks: QGIS styles, the STAC Item, the report's
``objects`` entry and the model file's hash, all from the run spec and the sinks' results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from geovae.atomic import OutputSet, sha256, write_text
from geovae.objects import pixel_area
from geovae.products import RASTER_STYLES, output_name
from geovae.segment.spec import RunSpec
from geovae.sinks.statistics import Statistics

__all__ = ["model_sha256", "objects_entry", "write_stac", "write_styles"]

_MODEL_HASHES: dict[tuple[str, int, int], str] = {}


def model_sha256(source: str | None) -> str | None:
    """The model file's SHA-256, computed once per file version in a process."""
    if source is None or not Path(source).is_file():
        return None
    st = Path(source).stat()
    key = (str(Path(source).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _MODEL_HASHES:
        _MODEL_HASHES[key] = sha256(source)
    return _MODEL_HASHES[key]


def objects_entry(spec: RunSpec, res: Any) -> dict[str, Any]:
    """The report's ``objects`` entry (``--objects``)."""
    objects = spec.objects
    return {
        "classes": list(objects.classes),
        "boundary_class": objects.boundary,
        "seed": objects.seed,
        "seeds_from": "distance" if objects.distance else "interior",
        "min_area": objects.min_object_area(spec.options.min_area, pixel_area(spec.scene.crs, spec.scene.transform)),
        "settings_from": dict(objects.origin),
        "halo": objects.halo,
        "count": res.n_objects,
        "beyond_halo": res.beyond_halo,
        "area": {str(k): v for k, v in res.class_areas_m2.items()},
    }


def write_styles(spec: RunSpec, oset: OutputSet, rasters: list[str]) -> None:
    """QGIS styles beside the rasters (and the GeoJSON / GeoParquet polygons): see geovae.styles."""
    import math

    from geovae.styles import class_raster_qml, polygon_qml, ramp_qml

    info, stem = spec.info, spec.stem
    K = info.num_classes
    qml = {
        "classes": class_raster_qml(info.class_ids, info.class_names, info.class_colors),
        # the largest class probability is at least 1/K
        "confidence": ramp_qml(1.0 / K if K > 1 else 0.0, 1.0, "viridis"),
        "uncertainty": ramp_qml(0.0, math.log(K) if K > 1 else 1.0, "inferno"),
        # the anomaly threshold in the middle of the ramp: bright above it
        "reconstruction_error": ramp_qml(
            0.0, 2 * spec.anomaly_threshold if spec.anomaly_threshold else 1.0, "inferno", label_precision=3
        ),
        "object_probability": ramp_qml(0.0, 1.0, "viridis"),
    }
    for kind in rasters:
        write_text(oset.path(output_name(stem, RASTER_STYLES[kind])), qml[kind])
    if set(spec.formats) & {"geojson", "parquet"}:
        write_text(oset.path(output_name(stem, "polygons_style")), polygon_qml(info.class_names, info.class_colors))
        if spec.objects is not None:
            colors = dict(zip(info.class_ids, info.class_colors))
            write_text(
                oset.path(output_name(stem, "objects_style")),
                polygon_qml(list(spec.objects.names), [colors[c] for c in spec.objects.classes]),
            )


def write_stac(
    spec: RunSpec,
    oset: OutputSet,
    report: dict[str, Any],
    statistics: Statistics,
    checksums: dict[str, str],
) -> None:
    """The run's STAC Item (geovae.stac), committed before the report: the rasters' bands from
    the spec, their statistics and checksums from the sinks; the other files' checksums from
    the staged files."""
    from geovae.stac import build_item, write_item

    stem = spec.stem
    files = {k: oset.path(output_name(stem, k)) for k in spec.kinds if k != "stac"}
    finals = {k: oset.final(output_name(stem, k)) for k in spec.kinds}
    item = build_item(
        stem=stem,
        scene=spec.scene,
        report=report,
        files=files,
        finals=finals,
        bands={k: spec.rasters.band_info(k) for k in spec.rasters.kinds},
        statistics=statistics.bands,
        checksums=checksums,
        model_path=spec.model_path,
    )
    write_item(item, oset.path(output_name(stem, "stac")))
