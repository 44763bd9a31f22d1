"""STAC metadata of the outputs: one Item per segmented scene, a Collection and a Catalog per batch.

Every ``segment`` run writes ``<stem>.stac.json`` beside its outputs (committed with them,
before the report): a STAC 1.1 Item whose assets are the run's files, with

* roles and media types (the rasters are ``image/tiff; application=geotiff;
  profile=cloud-optimized``);
* the **projection** extension (code, WKT2, shape, transform, native bbox);
* the **raster** extension per raster asset (nodata, data type, exact statistics gathered
  while the blocks were written, spatial resolution, unit);
* the **file** extension (size, and checksum as a multihash: ``1220`` + the SHA-256 hex);
* the **classification** extension on the class raster (value, machine name, title, colour
  hint, pixel count; the nodata value flagged);
* the **processing** extension (software and version, lineage, when);
* the footprint in WGS84 (the scene's outline, densified and reprojected) as ``geometry``
  and ``bbox``; the model file as an ``ml-model`` link with its SHA-256, the scene as a
  ``derived_from`` link;
* for a scene stacked from a STAC Item's assets (:mod:`geovae.sources`), the source Item as
  the ``derived_from`` link, its acquisition time as the Item's ``datetime``, and in
  ``geovae:source`` the assets read (key, href, bands), the band names, the pixel size, the
  area and its pixel window; for ``--stack``, each stacked raster as a ``derived_from`` link.

Asset hrefs are relative to the Item (``./<stem>.classes.tif``), so a folder of outputs can
be moved or uploaded as it is. Every local href is a valid URI reference whatever the file
names (:func:`href`: a scene named ``scène v1.tif`` gives ``./sc%C3%A8ne%20v1.classes.tif``);
read them back with ``urllib.parse.unquote``. :func:`write_batch_catalog` makes ``OUT/catalog.json`` and
``OUT/collection.json`` over the Items of a batch, without rewriting the Items (a batch's
markers vouch for their checksums).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from geovae._version import __version__
from geovae.atomic import sha256, write_text
from geovae.classes import CLASS_NODATA
from geovae.sources.filters import stac_datetime

__all__ = [
    "CATALOG_NAME",
    "COLLECTION_NAME",
    "EXTENSIONS",
    "MEDIA_TYPES",
    "ROLES",
    "build_item",
    "href",
    "multihash",
    "write_batch_catalog",
    "write_item",
]

#: Media type of each output kind.
MEDIA_TYPES: dict[str, str] = {
    **dict.fromkeys(
        ("classes", "confidence", "uncertainty", "reconstruction_error", "object_probability"),
        "image/tiff; application=geotiff; profile=cloud-optimized",
    ),
    "classes_aux": "application/xml",
    **dict.fromkeys(
        (
            "classes_style",
            "confidence_style",
            "uncertainty_style",
            "reconstruction_error_style",
            "object_probability_style",
            "polygons_style",
            "objects_style",
        ),
        "application/xml",
    ),
    "geojson": "application/geo+json",
    "gpkg": "application/geopackage+sqlite3",
    "parquet": "application/vnd.apache.parquet",
    "objects_geojson": "application/geo+json",
    "objects_gpkg": "application/geopackage+sqlite3",
    "objects_parquet": "application/vnd.apache.parquet",
    "quicklook": "image/png",
    "report": "application/json",
}

#: Asset roles of each output kind.
ROLES: dict[str, list[str]] = {
    "classes": ["data"],
    "confidence": ["data", "quality"],
    "uncertainty": ["data", "quality"],
    "reconstruction_error": ["data", "quality"],
    "classes_aux": ["metadata"],
    "classes_style": ["style"],
    "confidence_style": ["style"],
    "uncertainty_style": ["style"],
    "reconstruction_error_style": ["style"],
    "polygons_style": ["style"],
    "object_probability": ["data"],
    "object_probability_style": ["style"],
    "objects_style": ["style"],
    "objects_geojson": ["data"],
    "objects_gpkg": ["data"],
    "objects_parquet": ["data"],
    "geojson": ["data"],
    "gpkg": ["data"],
    "parquet": ["data"],
    "quicklook": ["overview", "visual"],
    "report": ["metadata"],
}

#: Schema URIs of the extensions an Item uses.
EXTENSIONS: dict[str, str] = {
    "projection": "https://stac-extensions.github.io/projection/v2.0.0/schema.json",
    "raster": "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
    "file": "https://stac-extensions.github.io/file/v2.1.0/schema.json",
    "classification": "https://stac-extensions.github.io/classification/v2.0.0/schema.json",
    "processing": "https://stac-extensions.github.io/processing/v1.2.0/schema.json",
}

_TITLES = {
    "classes": "Class raster",
    "confidence": "Confidence (largest class probability)",
    "uncertainty": "Uncertainty (predictive entropy, mutual information; nats)",
    "reconstruction_error": "Reconstruction error (anomaly score)",
    "classes_aux": "GDAL class table sidecar",
    "classes_style": "QGIS style of the class raster",
    "confidence_style": "QGIS style of the confidence raster",
    "uncertainty_style": "QGIS style of the uncertainty raster",
    "reconstruction_error_style": "QGIS style of the reconstruction-error raster",
    "polygons_style": "QGIS style of the polygons",
    "geojson": "Polygons (GeoJSON, WGS84)",
    "gpkg": "Polygons (GeoPackage)",
    "parquet": "Polygons (GeoParquet)",
    "quicklook": "Quicklook",
    "object_probability": "Probabilities of the object classes and the boundary class",
    "object_probability_style": "QGIS style of the object-probability raster",
    "objects_geojson": "Objects (GeoJSON, WGS84)",
    "objects_gpkg": "Objects (GeoPackage)",
    "objects_parquet": "Objects (GeoParquet)",
    "objects_style": "QGIS style of the objects",
    "report": "Run report",
}

_UNITS = {"uncertainty": "nat"}

COLLECTION_NAME = "collection.json"
CATALOG_NAME = "catalog.json"


def multihash(path: str | Path) -> str:
    """The file's SHA-256 as a multihash hex string (``12`` sha2-256, ``20`` 32 bytes)."""
    return "1220" + sha256(path)


def _slug(name: str) -> str:
    """A class name as the classification extension's machine name (letters, digits, - and _)."""
    return re.sub(r"[^0-9A-Za-z_-]+", "_", name.strip()).strip("_") or "class"


def _footprint(scene: Any) -> dict[str, Any] | None:
    """The scene's outline in WGS84, densified (21 points per edge) so a curved edge stays true."""
    if scene.crs is None:
        return None
    from rasterio.warp import transform_geom

    w, s, e, n = scene.bounds
    k = 20
    ring = (
        [(w + (e - w) * i / k, s) for i in range(k)]
        + [(e, s + (n - s) * i / k) for i in range(k)]
        + [(e - (e - w) * i / k, n) for i in range(k)]
        + [(w, n - (n - s) * i / k) for i in range(k)]
    )
    ring.append(ring[0])
    try:
        return dict(transform_geom(scene.crs, "EPSG:4326", {"type": "Polygon", "coordinates": [ring]}, precision=7))
    except Exception:
        return None


def _bbox(geom: dict[str, Any]) -> list[float]:
    import shapely.geometry

    return [round(v, 7) for v in shapely.geometry.shape(geom).bounds]


def _raster_bands(
    kind: str, bands: Sequence[Mapping[str, Any]], stats: list[dict[str, Any]] | None
) -> list[dict[str, Any]]:
    out = []
    for b, facts in enumerate(bands):
        band: dict[str, Any] = {"data_type": facts["data_type"], "nodata": facts["nodata"]}
        if "spatial_resolution" in facts:
            band["spatial_resolution"] = facts["spatial_resolution"]
        if kind in _UNITS:
            band["unit"] = _UNITS[kind]
        if facts.get("name"):
            band["name"] = facts["name"]
        if stats is not None and b < len(stats):
            st = {k: v for k, v in stats[b].items() if v is not None}
            if st:
                band["statistics"] = st
        out.append(band)
    return out


def build_item(
    *,
    stem: str,
    scene: Any,
    report: dict[str, Any],
    files: dict[str, Path],
    finals: dict[str, Path],
    bands: Mapping[str, Sequence[Mapping[str, Any]]],
    statistics: Mapping[str, list[dict[str, Any]]] | None = None,
    checksums: Mapping[str, str] | None = None,
    model_path: str | None = None,
) -> Any:
    """The STAC Item of one run.

    Args:
        stem: the scene's stem (the Item's id).
        scene: the :class:`~geovae.scene.Scene`.
        report: the run report (classes, model, options, versions, created).
        files: where each asset's file is now (the staging folder), by kind: sizes are read
            from them, and checksums for the files ``checksums`` lacks.
        finals: where each file will be, by kind (hrefs are relative to the Item's final path).
        bands: per raster kind, each band's ``data_type``, ``nodata``, ``name`` and
            ``spatial_resolution`` (:meth:`geovae.sinks.rasters.RasterSpec.band_info`).
        statistics: per raster kind, per band statistics (:class:`geovae.sinks.statistics.StatisticsSink`).
        checksums: SHA-256 (hex) of files already hashed when they were written, by kind.
        model_path: the model file, linked as ``ml-model`` (a ``torchgeo:NAME`` weight set by
            the URL of its weights).

    Returns:
        A ``pystac.Item`` whose self href is its final path.
    """
    import pystac

    created = report.get("created") or datetime.now(UTC).isoformat(timespec="seconds")
    geom = _footprint(scene)
    source = report.get("scene", {}).get("source")
    when = _source_datetime(source) or _scene_datetime(scene) or datetime.fromisoformat(created)
    item = pystac.Item(
        id=stem,
        geometry=geom,
        bbox=_bbox(geom) if geom else None,
        datetime=when,
        properties={"created": created, "title": f"geovae land cover of {stem}"},
    )
    item.stac_extensions = [EXTENSIONS[k] for k in ("projection", "raster", "file", "classification", "processing")]
    if scene.crs is not None:
        epsg = scene.crs.to_epsg()
        item.properties["proj:code"] = f"EPSG:{epsg}" if epsg else None
        if not epsg:
            item.properties["proj:wkt2"] = scene.crs.to_wkt()
        item.properties["proj:bbox"] = [float(v) for v in scene.bounds]
    else:
        item.properties["proj:code"] = None
    item.properties["proj:shape"] = [int(scene.height), int(scene.width)]
    t = scene.transform
    item.properties["proj:transform"] = [t.a, t.b, t.c, t.d, t.e, t.f]
    item.properties.update(
        {
            "processing:software": {
                "geovae": __version__,
                **{k: v for k, v in report.get("versions", {}).items() if k != "geovae"},
            },
            "processing:lineage": "segmented by geovae's tiled VAE segmenter (model "
            f"{report.get('model', {}).get('kind', '?')}), blended, vectorised",
            "processing:datetime": created,
            "processing:level": "L4",
        }
    )
    self_href = str(finals["stac"])
    item.set_self_href(self_href)
    folder = Path(self_href).parent
    classes = report.get("classes", [])
    for kind, path in files.items():
        if kind in ("stac",) or kind not in MEDIA_TYPES:
            continue
        rel = "./" + href(Path(os.path.relpath(finals[kind], folder)).as_posix())
        digest = (checksums or {}).get(kind) or sha256(path)
        extra: dict[str, Any] = {"file:size": Path(path).stat().st_size, "file:checksum": "1220" + digest}
        if kind in bands:
            extra["raster:bands"] = _raster_bands(kind, bands[kind], (statistics or {}).get(kind))
        if kind == "classes":
            colors = dict(zip(report.get("model", {}).get("class_ids", []), _colors(report)))
            extra["classification:classes"] = [
                {
                    "value": int(c["id"]),
                    "name": _slug(str(c["name"])),
                    "title": str(c["name"]),
                    **({"color_hint": "{:02X}{:02X}{:02X}".format(*colors[c["id"]])} if c["id"] in colors else {}),
                    "count": int(c["pixels"]),
                }
                for c in classes
            ] + [{"value": CLASS_NODATA, "name": "nodata", "title": "no data", "nodata": True}]
        item.add_asset(
            kind,
            pystac.Asset(
                href=rel, media_type=MEDIA_TYPES[kind], roles=ROLES[kind], title=_TITLES.get(kind), extra_fields=extra
            ),
        )
    model = report.get("model", {})
    if model_path:
        weights = model.get("weights") or {}
        pretrained = model_path.startswith("torchgeo:") and weights.get("url")
        link = pystac.Link(
            rel="ml-model",
            # a weight set has no file of the user's: its weights are where TorchGeo downloads them
            target=str(weights["url"]) if pretrained else href(Path(model_path).resolve().as_posix()),
            media_type="application/octet-stream",
            title=f"TorchGeo weights {weights.get('name')}"
            if pretrained
            else f"geovae model ({model.get('kind', '?')})",
        )
        if model.get("sha256"):
            link.extra_fields["file:checksum"] = "1220" + model["sha256"]
        item.add_link(link)
    src = report.get("scene", {}).get("path")
    if source is not None:
        _add_source(item, source)
    elif src:
        target = src if "://" in src or src.startswith("/vsi") else href(Path(src).resolve().as_posix())
        item.add_link(pystac.Link(rel="derived_from", target=target, title="the segmented scene"))
    return item


def _add_source(item: Any, source: dict[str, Any]) -> None:
    """Provenance of a stacked scene: the source Item (or the stacked rasters) and what was read."""
    import pystac

    src_item = source.get("item")
    if src_item and src_item.get("href"):
        given = str(src_item["href"])
        path, sep, frag = given.partition("#")  # an Item of a file of several: FILE#ID
        local = href(Path(path).resolve().as_posix()) + sep + quote(frag, safe=_HREF_SAFE + "?")
        target = given if "://" in given or given.startswith("/vsi") else local
        link = pystac.Link(
            rel="derived_from",
            target=target,
            media_type="application/geo+json",
            title=f"the source STAC Item {src_item.get('id')}",
        )
        item.add_link(link)
        if src_item.get("collection"):
            item.properties["geovae:source_collection"] = src_item["collection"]
    else:
        for a in source.get("assets", []):
            h = str(a["href"])
            target = h if "://" in h or h.startswith("/vsi") else href(Path(h).resolve().as_posix())
            item.add_link(pystac.Link(rel="derived_from", target=target, title="a stacked raster"))
    item.properties["geovae:source"] = source


def _source_datetime(source: dict[str, Any] | None) -> datetime | None:
    """The acquisition time of a source STAC Item."""
    return stac_datetime(((source or {}).get("item") or {}).get("datetime"))


#: Characters a path keeps as they are in an href: RFC 3986's unreserved characters (quote
#: keeps letters, digits and ``-._~``), sub-delimiters, ``:``, ``@`` and the separator ``/``.
_HREF_SAFE = "/!$&'()*+,;=:@"


def href(path: str) -> str:
    """A local path (relative with ``/`` separators, or absolute) as a URI reference: every
    other character percent-encoded as UTF-8 (a space, ``#``, ``?``, ``%``, non-ASCII letters).

    STAC hrefs must be IRI references: a raw space is not one.
    """
    return quote(path, safe=_HREF_SAFE)


def _colors(report: dict[str, Any]) -> list[list[int]]:
    return [list(c) for c in report.get("model", {}).get("class_colors", [])]


def _scene_datetime(scene: Any) -> datetime | None:
    """The acquisition time a scene's tags give (``TIFFTAG_DATETIME``, ``ACQUISITIONDATETIME``...),
    read through the scene's open handle (:meth:`geovae.scene.Scene.dataset`)."""
    try:
        tags = scene.dataset().tags()
    except Exception:
        return None
    for key in ("ACQUISITIONDATETIME", "ACQUISITION_DATETIME", "DATETIME", "TIFFTAG_DATETIME"):
        v = tags.get(key)
        if not v:
            continue
        for fmt in ("%Y:%m:%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%SZ"):
            try:
                return datetime.strptime(v.strip(), fmt).replace(tzinfo=UTC)
            except ValueError:
                continue
    return None


def write_item(item: Any, path: str | Path) -> Path:
    """Write ``item`` (asset hrefs relative, no self link) as JSON to ``path``."""
    d = item.to_dict(include_self_link=False, transform_hrefs=False)
    Path(path).write_text(json.dumps(d, indent=2), encoding="utf-8")
    return Path(path)


def write_batch_catalog(
    out: str | Path,
    items: Sequence[str | Path],
    *,
    title: str | None = None,
    search: dict[str, Any] | None = None,
) -> tuple[Path, Path]:
    """A STAC Catalog (``OUT/catalog.json``) and Collection (``OUT/collection.json``) over Items.

    The Collection's extent is the union of the Items' bboxes and datetimes; it links each
    Item by a relative href, and the Items are not rewritten (their checksums stay valid).

    Args:
        out: the batch output folder.
        items: the Items' files (``OUT/<scene>/<stem>.stac.json``).
        title: the Collection's title.
        search: the STAC search the batch's scenes came from (source, collections, area,
            dates, query), recorded as the Collection's ``geovae:search``.

    Returns:
        The catalog's and the collection's paths.
    """
    import pystac

    out = Path(out)
    loaded = [(Path(p), pystac.Item.from_file(str(p))) for p in items]
    boxes = [it.bbox for _, it in loaded if it.bbox]
    bbox = (
        [min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)]
        if boxes
        else [-180.0, -90.0, 180.0, 90.0]
    )
    times = [it.datetime for _, it in loaded if it.datetime is not None]
    interval: list[list[datetime | None]] = [[min(times), max(times)]] if times else [[None, None]]
    coll = pystac.Collection(
        id=f"geovae-{out.name or 'batch'}",
        title=title or f"geovae land cover: {out.name}",
        description="Land-cover rasters (COG) and polygons segmented by geovae, one Item per scene. The outputs "
        "carry the licence of the scenes they were derived from.",
        extent=pystac.Extent(pystac.SpatialExtent([bbox]), pystac.TemporalExtent(interval)),
        license="other",
    )
    coll.stac_extensions = [EXTENSIONS["processing"]]
    coll.extra_fields["processing:software"] = {"geovae": __version__}
    if search is not None:
        coll.extra_fields["geovae:search"] = search
    coll.set_self_href(str(out / COLLECTION_NAME))
    for path, it in loaded:
        coll.add_link(
            pystac.Link(
                rel="item",
                target="./" + href(Path(os.path.relpath(path, out)).as_posix()),
                media_type="application/geo+json",
                title=it.id,
            )
        )
    cat = pystac.Catalog(
        id=f"geovae-{out.name or 'batch'}-catalog",
        description="geovae batch outputs",
        title=title or f"geovae batch: {out.name}",
    )
    cat.set_self_href(str(out / CATALOG_NAME))
    cat.add_link(
        pystac.Link(rel="child", target="./" + COLLECTION_NAME, media_type="application/json", title=coll.title)
    )
    cd = coll.to_dict(include_self_link=False, transform_hrefs=False)
    cd["links"] = [ln for ln in cd["links"] if ln["rel"] not in ("root", "parent")] + [
        {"rel": "root", "href": "./" + CATALOG_NAME, "type": "application/json"},
        {"rel": "parent", "href": "./" + CATALOG_NAME, "type": "application/json"},
    ]
    catd = cat.to_dict(include_self_link=False, transform_hrefs=False)
    catd["links"] = [ln for ln in catd["links"] if ln["rel"] != "root"] + [
        {"rel": "root", "href": "./" + CATALOG_NAME, "type": "application/json"}
    ]
    write_text(out / COLLECTION_NAME, json.dumps(cd, indent=2))
    write_text(out / CATALOG_NAME, json.dumps(catd, indent=2))
    return out / CATALOG_NAME, out / COLLECTION_NAME
