"""STAC in: find Items with a STAC API search or in an item file, and turn them into scenes.

:func:`find_items` runs a :class:`Search`: against a STAC API through pystac-client (which
follows the API's ``next`` links, GET or POST), or over the Items of a file (a stac-geoparquet
file read with stac-geoparquet, a GeoJSON Item or FeatureCollection, newline-delimited JSON),
where the same filters are applied here. :func:`item_source` turns one Item into a
:class:`~geovae.sources.stack.StackedSource` of the asked assets, in the order given, which
:func:`geovae.scene.open_scene` opens as one multi-band scene.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from geovae.errors import OptionError, SourceError, one_line
from geovae.sources.filters import bbox_geometry, interval, item_matches
from geovae.sources.stack import Raster, StackedSource

__all__ = [
    "Search",
    "find_items",
    "item_source",
    "item_sources",
    "read_items",
    "scene_inputs",
]

#: Seconds a STAC API may take to answer one request.
API_TIMEOUT = 60
#: Extra attempts on a failed request to a STAC API (connection errors, 5xx answers).
API_RETRIES = 2
#: Characters of a library's error quoted inside a message of geovae's own.
_MESSAGE_CAUSE = 300

_PARQUET_SUFFIXES = (".parquet", ".geoparquet", ".pq")


# ------------------------------------------------------------------------------ search
@dataclass(frozen=True)
class Search:
    """Where to look for Items and which to keep.

    Attributes:
        source: a STAC API's URL (its landing page), or an item file or URL: stac-geoparquet
            (``.parquet``), a GeoJSON Item or FeatureCollection, or newline-delimited JSON.
        collections: collection ids; None for all.
        bbox: ``[W, S, E, N]`` in WGS84.
        intersects: a GeoJSON geometry in WGS84 (instead of ``bbox``).
        datetime: a STAC datetime or interval (``2024-06-01/2024-08-31``).
        query: query-extension conditions (:func:`~geovae.sources.filters.parse_query`).
        max_items: stop after this many Items.
        method: ``GET`` or ``POST`` for an API search; None lets pystac-client choose (POST).
    """

    source: str
    collections: tuple[str, ...] | None = None
    bbox: tuple[float, ...] | None = None
    intersects: dict[str, Any] | None = None
    datetime: str | None = None
    query: dict[str, dict[str, Any]] | None = None
    max_items: int | None = None
    method: str | None = None

    def __post_init__(self) -> None:
        if self.bbox is not None and self.intersects is not None:
            raise OptionError("--bbox and --intersects both name an area; give one of them")
        if self.max_items is not None and self.max_items < 1:
            raise OptionError(f"--max-items {self.max_items}: must be at least 1")
        if self.datetime is not None:
            interval(self.datetime)  # checked now: a typo must not wait for the API's answer

    @property
    def area(self) -> dict[str, Any] | None:
        """The area as a GeoJSON geometry in WGS84, or None."""
        if self.intersects is not None:
            return self.intersects
        return bbox_geometry(list(self.bbox)) if self.bbox is not None else None

    @property
    def is_file(self) -> bool:
        """Whether the source is an item file rather than an API."""
        s = self.source
        if "://" not in s:
            return True
        return s.split("?")[0].lower().endswith((*_PARQUET_SUFFIXES, ".json", ".geojson", ".ndjson", ".jsonl"))

    def filters(self) -> dict[str, Any]:
        """The filters as JSON values, keyed as pystac-client's search takes them (None: unset)."""
        return {
            "collections": list(self.collections) if self.collections else None,
            "bbox": list(self.bbox) if self.bbox is not None else None,
            "intersects": self.intersects,
            "datetime": self.datetime,
            "query": self.query,
            "max_items": self.max_items,
        }

    def describe(self) -> dict[str, Any]:
        """The search as recorded in the batch's STAC Collection."""
        src = self.source if "://" in self.source else str(Path(self.source).absolute())
        return {"source": src, "kind": "item file" if self.is_file else "STAC API", **self.filters()}

    def text(self) -> str:
        """The search's filters in a few words, for messages."""
        parts = [f"collections {','.join(self.collections)}" if self.collections else "all collections"]
        if self.bbox is not None:
            parts.append("bbox " + ",".join(f"{v:g}" for v in self.bbox))
        if self.intersects is not None:
            parts.append("the --intersects area")
        if self.datetime:
            parts.append(f"datetime {self.datetime}")
        if self.query:
            parts.append(f"query {json.dumps(self.query, separators=(',', ':'))}")
        return ", ".join(parts)


def find_items(search: Search) -> list[dict[str, Any]]:
    """The Items a search finds, as STAC dicts (each with its ``self`` link where known).

    Args:
        search: where to look and which Items to keep.

    Returns:
        The Items, in the API's or the file's order.

    Raises:
        SourceError: the API cannot be reached or answers with an error, the file cannot be
            read, or nothing matches.
    """
    if search.is_file:
        items = list(_filtered(read_items(search.source), search))
    else:
        items = _api_items(search)
    if not items:
        raise SourceError(
            f"the search of {search.source} matched no items ({search.text()}); "
            "widen the area or the dates, or check the collection names"
        )
    return items


def _api_items(search: Search) -> list[dict[str, Any]]:
    import requests
    from pystac_client import Client
    from pystac_client.exceptions import APIError
    from pystac_client.stac_api_io import StacApiIO

    where = search.source
    try:
        client = Client.open(where, stac_io=StacApiIO(timeout=API_TIMEOUT, max_retries=API_RETRIES))
    except (requests.RequestException, APIError, OSError) as e:
        raise SourceError(
            f"cannot reach the STAC API at {where} ({one_line(e, _MESSAGE_CAUSE)}); check the URL and your network"
        ) from None
    except Exception as e:  # pystac: the answer is not a STAC catalog
        raise SourceError(
            f"{where} did not answer as a STAC API ({one_line(e, _MESSAGE_CAUSE)}); give the API's landing page URL"
        ) from None
    kwargs = search.filters()
    if search.method:
        kwargs["method"] = search.method
    try:
        results = client.search(**{k: v for k, v in kwargs.items() if v is not None})
        return list(results.items_as_dicts())
    except NotImplementedError:
        raise SourceError(f"{where} is a STAC catalog without item search; give a STAC API that has /search") from None
    except (requests.RequestException, APIError, OSError) as e:
        raise SourceError(
            f"the search at {where} failed ({one_line(e, _MESSAGE_CAUSE)}); check the filters and the API"
        ) from None


def read_items(path: str) -> list[dict[str, Any]]:
    """The Items in a file or at a URL: stac-geoparquet, a GeoJSON Item or FeatureCollection,
    or newline-delimited JSON Items.

    Items without a ``self`` link get one naming where they came from (the file), so their
    relative asset hrefs resolve and every Item has a name.

    Raises:
        SourceError: the file cannot be read or holds no STAC Item.
    """
    if path.split("?")[0].lower().endswith(_PARQUET_SUFFIXES):
        items = _parquet_items(path)
    else:
        items = _json_items(path)
    base = path if "://" in path else str(Path(path).absolute())
    for it in items:
        if not _self_href(it):
            # A file of several Items: each is named by the file and its id.
            it.setdefault("links", []).append(
                {"rel": "self", "href": base if len(items) == 1 else f"{base}#{it.get('id')}"}
            )
    return items


def _open_text(path: str) -> str:

    try:
        if "://" in path:
            import fsspec

            with fsspec.open(path, "rt", encoding="utf-8") as f:
                return str(f.read())
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise SourceError(
            f"cannot read STAC items from {path} ({one_line(e, _MESSAGE_CAUSE)}); check the path or URL"
        ) from None


def _json_items(path: str) -> list[dict[str, Any]]:
    text = _open_text(path)
    docs: list[Any]
    try:
        doc = json.loads(text)
        docs = doc.get("features", []) if isinstance(doc, dict) and doc.get("type") == "FeatureCollection" else [doc]
    except ValueError:
        try:
            docs = [json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError:
            raise SourceError(f"{path} is not JSON; give a STAC Item, an ItemCollection or stac-geoparquet") from None
    items = [d for d in docs if isinstance(d, dict) and d.get("type") == "Feature" and "assets" in d]
    if not items:
        what = docs[0].get("type") if docs and isinstance(docs[0], dict) else None
        hint = (
            " (a Collection or Catalog: search it with --stac API-URL or name an Item)"
            if what
            in (
                "Collection",
                "Catalog",
            )
            else ""
        )
        raise SourceError(f"{path} holds no STAC Item{hint}; give a STAC Item, an ItemCollection or stac-geoparquet")
    return items


def _parquet_items(path: str) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq
    from stac_geoparquet.arrow import stac_table_to_items

    try:
        if "://" in path:
            import fsspec

            with fsspec.open(path, "rb") as f:
                table = pq.read_table(f)
        else:
            table = pq.read_table(path)
        return [dict(it) for it in stac_table_to_items(table)]
    except Exception as e:
        raise SourceError(
            f"cannot read {path} as stac-geoparquet ({one_line(e, _MESSAGE_CAUSE)}); give a file written by stac-geoparquet"
        ) from None


def _filtered(items: Iterable[dict[str, Any]], search: Search) -> Iterator[dict[str, Any]]:
    """The Items of a file that a search keeps: the filters an API would apply."""
    import shapely.geometry

    area = search.area
    shape = shapely.geometry.shape(area) if area is not None else None
    dates = interval(search.datetime) if search.datetime else None
    n = 0
    for it in items:
        if item_matches(it, collections=search.collections, area=shape, dates=dates, query=search.query):
            yield it
            n += 1
            if search.max_items is not None and n >= search.max_items:
                return


# ------------------------------------------------------------------------ items -> scenes
def _self_href(item: dict[str, Any]) -> str | None:
    for link in item.get("links", []) or []:
        if isinstance(link, dict) and link.get("rel") == "self" and link.get("href"):
            return str(link["href"])
    return None


def _absolute(href: str, base: str | None) -> str:
    """An asset href made absolute against its Item's location."""
    from urllib.parse import urljoin

    if "://" in href or href.startswith("/"):
        return href
    if base is None:
        return str(Path(href).absolute())
    base = base.split("#")[0]
    if "://" in base:
        return urljoin(base, href)
    return str((Path(base).parent / href).resolve())


def _band_info(asset: dict[str, Any]) -> list[dict[str, Any]]:
    """An asset's bands as its metadata gives them (STAC 1.1 ``bands`` or ``eo:bands``)."""
    bands = asset.get("bands") or asset.get("eo:bands") or []
    return [dict(b) for b in bands if isinstance(b, dict)]


def item_source(
    item: dict[str, Any],
    assets: list[str],
    *,
    resolution: float | None = None,
    area: dict[str, Any] | None = None,
    href: str | None = None,
) -> StackedSource:
    """One Item's assets, in the order asked, as a stacked scene.

    An Item that lacks an asset asked for gives a source that fails when opened, with the
    Item's keys in the message, so a batch records that scene as failed and goes on.

    Args:
        item: the STAC Item (a dict).
        assets: asset keys, in band order.
        resolution: pixel size of the stack (the first asset's CRS units); None for the finest.
        area: GeoJSON geometry (WGS84) to clip to.
        href: where the Item is (default: its ``self`` link).

    Returns:
        The :class:`StackedSource`, named by the Item's URL, with the Item's id as stem.
    """
    item_id = str(item.get("id") or "item")
    where = href or _self_href(item) or item_id
    have = item.get("assets") or {}
    missing = [k for k in assets if k not in have]
    error = None
    if missing:
        error = (
            f"item {item_id} has no asset {', '.join(missing)}; its assets are "
            f"{', '.join(sorted(have)) or 'none'} (pick them with --assets)"
        )
    rasters = []
    for k in assets:
        a = have.get(k)
        if not isinstance(a, dict) or not a.get("href"):
            continue
        info = _band_info(a)
        names = tuple(str(b.get("name") or b.get("common_name") or f"{k}_{i + 1}") for i, b in enumerate(info))
        rasters.append(
            Raster(
                href=_absolute(str(a["href"]), where if where != item_id else None),
                key=k,
                band_names=names if len(names) > 1 else (),
                bands=tuple(info),
            )
        )
    props = item.get("properties", {}) or {}
    when = props.get("datetime") or props.get("start_datetime")
    return StackedSource(
        rasters=tuple(rasters),
        name=where,
        stem=_safe_stem(item_id),
        resolution=resolution,
        area=area,
        item={
            "id": item_id,
            "collection": item.get("collection"),
            "href": where,
            "datetime": str(when) if when else None,
        },
        error=error,
    )


def _safe_stem(item_id: str) -> str:
    """An Item id as a file stem: path separators and other unsafe characters replaced."""
    import re

    stem = re.sub(r"[^0-9A-Za-z._+-]+", "_", item_id).strip("._") or "item"
    return stem[:200]


def item_sources(
    items: list[dict[str, Any]],
    assets: list[str],
    *,
    resolution: float | None = None,
    area: dict[str, Any] | None = None,
) -> list[StackedSource]:
    """Every Item as a stacked scene (:func:`item_source`).

    Raises:
        OptionError: no Item has one of the asset keys (a typo), naming the first Item's keys.
    """
    for k in assets:
        if items and not any(k in (it.get("assets") or {}) for it in items):
            keys = sorted((items[0].get("assets") or {}).keys())
            raise OptionError(
                f"--assets: no item has an asset {k!r}; the assets of item {items[0].get('id')} are "
                f"{', '.join(keys) or 'none'}"
            )
    return [item_source(it, assets, resolution=resolution, area=area) for it in items]


def is_item_file(path: str) -> bool:
    """Whether a scene argument names STAC Items rather than a raster (by its suffix)."""
    p = path.split("?")[0].lower()
    return p.endswith((".json", ".geojson", ".ndjson", ".jsonl", *_PARQUET_SUFFIXES)) and not p.endswith(".vrt")


def scene_inputs(
    paths: list[str],
    *,
    assets: list[str] | None = None,
    stack: bool = False,
    resolution: float | None = None,
    area: dict[str, Any] | None = None,
) -> list[str | StackedSource]:
    """The scenes that command-line arguments name: rasters, a stack of them, or STAC Items.

    Args:
        paths: raster paths or URLs; with ``assets``, STAC Item files or URLs (an Item, an
            ItemCollection, stac-geoparquet).
        assets: asset keys to stack from each Item, in band order.
        stack: stack the rasters band-wise into one scene.
        resolution: pixel size of a stack or Item scene.
        area: GeoJSON geometry (WGS84) to clip every scene to.

    Returns:
        Raster paths as given (when nothing is stacked or clipped) and stacked sources.

    Raises:
        OptionError: ``--stack`` with ``--assets`` or with one raster, an Item file without
            ``--assets`` (the message lists its asset keys).
        SourceError: an Item file cannot be read.
    """
    from geovae.sources.stack import stack_rasters

    if stack and assets:
        raise OptionError("--stack stacks raster files and --assets picks a STAC Item's assets; give one of them")
    if stack:
        if len(paths) < 2:
            raise OptionError("--stack: give two rasters or more to stack band-wise into one scene")
        return [stack_rasters(paths, resolution=resolution, area=area)]
    if assets:
        out: list[str | StackedSource] = []
        for p in paths:
            out += item_sources(read_items(p), assets, resolution=resolution, area=area)
        return out
    for p in paths:
        if is_item_file(p):
            items = read_items(p)
            keys = sorted((items[0].get("assets") or {}).keys())
            raise OptionError(
                f"{p} holds STAC Items: pick the band assets to stack with --assets, e.g. --assets "
                f"{','.join(keys[:4]) or 'KEY'} (the assets of {items[0].get('id')}: {', '.join(keys) or 'none'})"
            )
    if resolution is not None or area is not None:
        return [stack_rasters([p], resolution=resolution, area=area) for p in paths]
    return list(paths)
