"""What a STAC search keeps, from the command line to the Items: an area, dates, a query.

The options are parsed here once (``--bbox``, ``--intersects``, ``--datetime``, ``--query``,
``--assets``), each refused with one line; :func:`item_matches` applies them to an Item the
way a STAC API does, for Items read from a file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from geovae.errors import OptionError

__all__ = [
    "bbox_geometry",
    "interval",
    "item_matches",
    "parse_assets",
    "parse_bbox",
    "parse_query",
    "read_area",
    "stac_datetime",
]

_OPS = (("<=", "lte"), (">=", "gte"), ("!=", "neq"), ("<", "lt"), (">", "gt"), ("=", "eq"))


def parse_bbox(text: str) -> list[float]:
    """``W,S,E,N`` in WGS84 degrees.

    Raises:
        OptionError: not four numbers, or not a box on the globe.
    """
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        vals = []
    if len(vals) != 4 or not all(math.isfinite(v) for v in vals):
        raise OptionError(f"--bbox {text}: give four numbers W,S,E,N in degrees, e.g. 7.0,46.0,7.5,46.3")
    w, s, e, n = vals
    if not (-180 <= w <= 180 and -180 <= e <= 180 and -90 <= s < n <= 90) or w == e:
        raise OptionError(f"--bbox {text}: W,S,E,N must be longitudes and latitudes in degrees, with S < N")
    return vals


def bbox_geometry(bbox: list[float]) -> dict[str, Any]:
    w, s, e, n = bbox
    return {"type": "Polygon", "coordinates": [[[w, s], [e, s], [e, n], [w, n], [w, s]]]}


def read_area(path: str) -> dict[str, Any]:
    """The area in a GeoJSON file: a geometry, a Feature or a FeatureCollection (their union).

    Raises:
        OptionError: the file cannot be read or holds no geometry.
    """
    import shapely.geometry
    from shapely.ops import unary_union

    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise OptionError(
            f"--intersects {path}: cannot read it as GeoJSON ({type(e).__name__}); give a GeoJSON file of the area"
        ) from None
    if isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
        geoms = [f.get("geometry") for f in doc.get("features", []) if isinstance(f, dict)]
    elif isinstance(doc, dict) and doc.get("type") == "Feature":
        geoms = [doc.get("geometry")]
    else:
        geoms = [doc]
    try:
        shapes = [shapely.geometry.shape(g) for g in geoms if g]
    except (AttributeError, KeyError, TypeError, ValueError, shapely.errors.GEOSException):
        shapes = []
    shapes = [s for s in shapes if not s.is_empty and s.area > 0]
    if not shapes:
        raise OptionError(f"--intersects {path}: holds no polygon; give a GeoJSON polygon of the area (WGS84)")
    area = unary_union(shapes)
    west, south, east, north = area.bounds
    if not (-180 <= west <= east <= 180 and -90 <= south <= north <= 90):
        raise OptionError(
            f"--intersects {path}: coordinates are not longitudes and latitudes; GeoJSON is in WGS84 (EPSG:4326)"
        )
    return dict(shapely.geometry.mapping(area))


def parse_query(exprs: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``--query`` expressions (``eo:cloud_cover<20``) as a STAC API query-extension object.

    Numbers become numbers (an API compares ``"20"`` as a string); several conditions on one
    property are kept together.

    Raises:
        OptionError: an expression without an operator or a property.
    """
    out: dict[str, dict[str, Any]] = {}
    for expr in exprs:
        found = next(((sym, op) for sym, op in _OPS if sym in expr), None)
        if found is None:
            raise OptionError(
                f"--query {expr}: write PROPERTY<op>VALUE with <, <=, >, >=, = or !=, e.g. eo:cloud_cover<20"
            )
        sym, op = found
        prop, _, value = expr.partition(sym)
        prop, value = prop.strip(), value.strip()
        if not prop or not value:
            raise OptionError(f"--query {expr}: name a property and a value, e.g. eo:cloud_cover<20")
        out.setdefault(prop, {})[op] = _value(value)
    return out


def _value(text: str) -> Any:
    try:
        v = float(text)
    except ValueError:
        return text.strip("'\"")
    return int(v) if v.is_integer() and "." not in text and "e" not in text.lower() else v


def parse_assets(text: str) -> list[str]:
    """``B04,B03,B02`` as a list of asset keys, in order.

    Raises:
        OptionError: no key, or a key named twice.
    """
    keys = [k.strip() for k in text.split(",") if k.strip()]
    if not keys:
        raise OptionError("--assets: name the band assets to stack, e.g. --assets red,green,blue,nir")
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise OptionError(f"--assets {text}: {', '.join(dup)} named twice; name each asset once")
    return keys


def interval(text: str) -> tuple[datetime | None, datetime | None]:
    """A STAC datetime or interval (``2024-06-01/2024-08-31``, ``../2024-08-31``) as UTC bounds;
    a date alone stands for its whole day."""

    def one(part: str, end: bool) -> datetime | None:
        part = part.strip()
        if part in ("", ".."):
            return None
        try:
            t = datetime.fromisoformat(part)
        except ValueError:
            raise OptionError(
                f"--datetime {text}: give a date, a time or an interval, e.g. 2024-06-01/2024-08-31 "
                "or 2024-06-01T00:00:00Z/.."
            ) from None
        if t.tzinfo is None:
            t = t.replace(tzinfo=UTC)
        if end and len(part) == 10:  # a date: up to the end of that day
            t = t + timedelta(days=1) - timedelta(microseconds=1)
        return t

    parts = text.split("/")
    if len(parts) == 1:
        return one(parts[0], False), one(parts[0], True)
    if len(parts) != 2:
        raise OptionError(f"--datetime {text}: give one date or time, or two joined by /")
    start, end = one(parts[0], False), one(parts[1], True)
    if start is not None and end is not None and end < start:
        raise OptionError(f"--datetime {text}: the interval ends before it starts")
    return start, end


def stac_datetime(value: Any) -> datetime | None:
    """A STAC Item's datetime (an ISO 8601 string, or a datetime as stac-geoparquet gives it)
    as an aware datetime, in UTC when it names no zone.

    Returns:
        The datetime; None for an empty value or one that is not a datetime.
    """
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if not value:
        return None
    try:
        t = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _item_interval(item: dict[str, Any]) -> tuple[datetime | None, datetime | None]:
    p = item.get("properties", {})
    t = stac_datetime(p.get("datetime"))
    if t is not None:
        return t, t
    return stac_datetime(p.get("start_datetime")), stac_datetime(p.get("end_datetime"))


def _compare(v: Any, op: str, ref: Any) -> bool:
    if v is None:
        return False
    try:
        if op == "eq":
            return bool(v == ref)
        if op == "neq":
            return bool(v != ref)
        if op == "lt":
            return bool(v < ref)
        if op == "lte":
            return bool(v <= ref)
        if op == "gt":
            return bool(v > ref)
        if op == "gte":
            return bool(v >= ref)
    except TypeError:
        return False
    return False


def item_matches(
    item: dict[str, Any],
    *,
    collections: Iterable[str] | None = None,
    area: Any = None,
    dates: tuple[datetime | None, datetime | None] | None = None,
    query: dict[str, dict[str, Any]] | None = None,
) -> bool:
    """Whether a STAC API would return ``item`` for these filters.

    Args:
        item: the STAC Item.
        collections: collection ids to keep; None for all.
        area: a shapely geometry (WGS84) the Item's geometry must intersect.
        dates: ``(start, end)`` of :func:`interval` the Item's time must meet.
        query: query-extension conditions (:func:`parse_query`) on its properties.
    """
    import shapely.geometry

    if collections and item.get("collection") not in set(collections):
        return False
    if area is not None:
        g = item.get("geometry")
        if not g or not shapely.geometry.shape(g).intersects(area):
            return False
    if dates is not None:
        a, b = _item_interval(item)
        if a is None and b is None:
            return False
        start, end = dates
        if (start is not None and (b or a) < start) or (end is not None and (a or b) > end):  # type: ignore[operator]
            return False
    if query:
        props = item.get("properties", {})
        return all(_compare(props.get(k), op, ref) for k, conds in query.items() for op, ref in conds.items())
    return True
