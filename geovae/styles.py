"""How GIS tools show the outputs: GDAL's class table sidecar and QGIS styles.

* The class raster's **PAM sidecar** ``<stem>.classes.tif.aux.xml``: GDAL category names, a
  raster attribute table (value, class name, colour, pixel count) and a colour table exactly
  as long as the classes. rasterio has no API for category names or attribute tables, and a
  GeoTIFF's own palette (the TIFF ``ColorMap`` tag) always holds 256 entries: GDAL reads the
  unused ones as opaque black (``gdalinfo`` lists 256 colours, QGIS's paletted renderer 256
  classes). GDAL prefers the sidecar's colour table to the TIFF's, so GDAL and QGIS see the
  classes only; a reader of the TIFF alone (no sidecar) still gets the palette and the
  ``CLASSES`` tag.
* **QML** files (QGIS's style format), which QGIS loads by itself when it opens a file with a
  ``.qml`` of the same base name beside it: a paletted style for the class raster (each class
  named, in the model's colour), pseudocolour ramps for confidence, uncertainty and
  reconstruction error, and a categorised style on ``class_name`` for the polygons.
* A GeoPackage's ``layer_styles`` table (the layout QGIS writes), whose default row QGIS
  applies when it opens the layer, with the polygons' QML and an SLD of the same rules.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

__all__ = [
    "QGIS_VERSION",
    "RAMPS",
    "class_aux_xml",
    "class_raster_qml",
    "polygon_qml",
    "polygon_sld",
    "ramp_qml",
    "write_class_aux",
    "write_layer_style",
]

#: The QGIS version the QML files declare (their layout is read by QGIS 3.16 and later).
QGIS_VERSION = "3.28.0-Firenze"

# GDAL's raster attribute table codes (gdal.h: GDALRATFieldType, GDALRATFieldUsage).
_GFT_INTEGER, _GFT_STRING = 0, 2
_GFU_PIXELCOUNT, _GFU_NAME, _GFU_MINMAX, _GFU_RED, _GFU_GREEN, _GFU_BLUE = 1, 2, 5, 6, 7, 8

#: Colour ramps (stops from 0 to 1, RGB): viridis for confidence (dark = doubtful), inferno
#: for uncertainty and reconstruction error (bright = doubtful), sampled from matplotlib.
RAMPS: dict[str, list[tuple[float, tuple[int, int, int]]]] = {
    "viridis": [
        (0.0, (68, 1, 84)),
        (0.25, (59, 82, 139)),
        (0.5, (33, 145, 140)),
        (0.75, (94, 201, 98)),
        (1.0, (253, 231, 37)),
    ],
    "inferno": [
        (0.0, (0, 0, 4)),
        (0.25, (87, 16, 110)),
        (0.5, (188, 55, 84)),
        (0.75, (249, 142, 9)),
        (1.0, (252, 255, 164)),
    ],
}


def _rgb(c: Sequence[int]) -> tuple[int, int, int]:
    return int(c[0]), int(c[1]), int(c[2])


def _hex(c: Sequence[int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*_rgb(c))


# -- the class raster's GDAL sidecar ---------------------------------------------------------


def class_aux_xml(
    ids: Sequence[int], names: Sequence[str], colors: Sequence[Sequence[int]], pixels: Sequence[int] | None = None
) -> str:
    """The PAM ``.aux.xml`` of a class raster: category names, attribute table, colour table.

    Args:
        ids: class ids (raster values, 0..254).
        names: class names, one per id.
        colors: RGB colours, one per id.
        pixels: pixel count per class, for the attribute table's ``pixels`` column.

    Returns:
        The XML text, as GDAL writes it for a GeoTIFF.
    """
    counts: Sequence[int | None] = pixels if pixels is not None else [None] * len(ids)
    table = dict(zip((int(i) for i in ids), zip(names, colors, counts)))
    top = max(table) + 1 if table else 0
    cats = "".join(f"      <Category>{escape(str(table[v][0])) if v in table else ''}</Category>\n" for v in range(top))
    ct = "".join(
        '      <Entry c1="{}" c2="{}" c3="{}" c4="{}"/>\n'.format(*_rgb(table[v][1]), 255)
        if v in table
        else '      <Entry c1="0" c2="0" c3="0" c4="0"/>\n'
        for v in range(top)
    )
    fields = [
        ("value", _GFT_INTEGER, _GFU_MINMAX),
        ("class_name", _GFT_STRING, _GFU_NAME),
        ("red", _GFT_INTEGER, _GFU_RED),
        ("green", _GFT_INTEGER, _GFU_GREEN),
        ("blue", _GFT_INTEGER, _GFU_BLUE),
    ]
    if pixels is not None:
        fields.append(("pixels", _GFT_INTEGER, _GFU_PIXELCOUNT))
    fdefs = "".join(
        f'      <FieldDefn index="{i}">\n        <Name>{n}</Name>\n        <Type>{t}</Type>\n'
        f"        <Usage>{u}</Usage>\n      </FieldDefn>\n"
        for i, (n, t, u) in enumerate(fields)
    )
    rows = []
    for r, (v, (name, col, px)) in enumerate(sorted(table.items())):
        cells = [str(v), escape(str(name)), *map(str, _rgb(col))] + ([str(int(px))] if px is not None else [])
        rows.append(f'      <Row index="{r}">' + "".join(f"<F>{c}</F>" for c in cells) + "</Row>\n")
    return (
        '<PAMDataset>\n  <PAMRasterBand band="1">\n    <CategoryNames>\n' + cats + "    </CategoryNames>\n"
        "    <ColorInterp>Palette</ColorInterp>\n    <ColorTable>\n" + ct + "    </ColorTable>\n"
        '    <GDALRasterAttributeTable tableType="thematic">\n'
        + fdefs
        + "".join(rows)
        + "    </GDALRasterAttributeTable>\n  </PAMRasterBand>\n</PAMDataset>\n"
    )


def write_class_aux(
    raster: str | Path,
    ids: Sequence[int],
    names: Sequence[str],
    colors: Sequence[Sequence[int]],
    pixels: Sequence[int] | None = None,
) -> Path:
    """Write ``<raster>.aux.xml`` (:func:`class_aux_xml`) beside a class raster; returns its path.

    Written once the raster is closed for good: GDAL rewrites a sidecar when it closes a
    dataset whose PAM information changed, so nothing may have the raster open for update.
    """
    path = Path(f"{raster}.aux.xml")
    path.write_text(class_aux_xml(ids, names, colors, pixels), encoding="utf-8")
    return path


# -- QML: raster styles ------------------------------------------------------------------------


def _qml(body: str, categories: str = "AllStyleCategories") -> str:
    return (
        f"<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n"
        f'<qgis version="{QGIS_VERSION}" styleCategories="{categories}">\n{body}</qgis>\n'
    )


def _raster_pipe(renderer: str) -> str:
    return (
        "  <pipe>\n"
        + renderer
        + '    <brightnesscontrast brightness="0" contrast="0" gamma="1"/>\n'
        + '    <huesaturation saturation="0" colorizeOn="0" grayscaleMode="0" invertColors="0"/>\n'
        + '    <rasterresampler maxOversampling="2"/>\n'
        + "  </pipe>\n  <blendMode>0</blendMode>\n"
    )


def class_raster_qml(ids: Sequence[int], names: Sequence[str], colors: Sequence[Sequence[int]]) -> str:
    """A QGIS paletted (unique values) style for the class raster: each class named, in its colour."""
    entries = "".join(
        f'        <paletteEntry value="{int(i)}" color="{_hex(c)}" alpha="255" label={quoteattr(str(n))}/>\n'
        for i, n, c in zip(ids, names, colors)
    )
    renderer = (
        '    <rasterrenderer type="paletted" band="1" opacity="1" alphaBand="-1" nodataColor="">\n'
        "      <rasterTransparency/>\n      <colorPalette>\n" + entries + "      </colorPalette>\n"
        "    </rasterrenderer>\n"
    )
    return _qml(_raster_pipe(renderer))


def ramp_qml(vmin: float, vmax: float, ramp: str = "viridis", band: int = 1, label_precision: int = 2) -> str:
    """A QGIS single-band pseudocolour style: ``ramp`` (a key of :data:`RAMPS`) from vmin to vmax."""
    stops = RAMPS[ramp]
    if not (math.isfinite(vmin) and math.isfinite(vmax)) or vmax <= vmin:
        vmin, vmax = 0.0, 1.0
    c1, c2 = stops[0][1], stops[-1][1]
    inner = ":".join(f"{p:g};{r},{g},{b},255" for p, (r, g, b) in stops[1:-1])
    items = "".join(
        f'          <item value="{vmin + p * (vmax - vmin):.6g}" color="{_hex(c)}" alpha="255" '
        f'label="{vmin + p * (vmax - vmin):.{label_precision}f}"/>\n'
        for p, c in stops
    )
    # QGIS reads the ramp from the new <Option> map and older versions from <prop> lines.
    ramp_props = (
        ("color1", "{},{},{},255".format(*c1)),
        ("color2", "{},{},{},255".format(*c2)),
        ("discrete", "0"),
        ("rampType", "gradient"),
        ("stops", inner),
    )
    opts = "".join(f'              <Option type="QString" name="{k}" value="{v}"/>\n' for k, v in ramp_props)
    props = "".join(f'            <prop k="{k}" v="{v}"/>\n' for k, v in ramp_props)
    renderer = (
        f'    <rasterrenderer type="singlebandpseudocolor" band="{band}" opacity="1" alphaBand="-1" '
        f'classificationMin="{vmin:.6g}" classificationMax="{vmax:.6g}" nodataColor="">\n'
        "      <rasterTransparency/>\n"
        "      <minMaxOrigin>\n        <limits>None</limits>\n        <extent>WholeRaster</extent>\n"
        "        <statAccuracy>Estimated</statAccuracy>\n      </minMaxOrigin>\n"
        "      <rastershader>\n"
        f'        <colorrampshader colorRampType="INTERPOLATED" classificationMode="1" minimumValue="{vmin:.6g}" '
        f'maximumValue="{vmax:.6g}" clip="0" labelPrecision="{label_precision}">\n'
        f'          <colorramp type="gradient" name="[source]">\n            <Option type="Map">\n{opts}'
        f"            </Option>\n{props}          </colorramp>\n{items}"
        "        </colorrampshader>\n      </rastershader>\n    </rasterrenderer>\n"
    )
    return _qml(_raster_pipe(renderer))


# -- QML / SLD: the polygons --------------------------------------------------------------------


def _fill_layer(color: Sequence[int]) -> str:
    props = (
        ("color", "{},{},{},255".format(*_rgb(color))),
        ("outline_color", "35,35,35,255"),
        ("outline_style", "solid"),
        ("outline_width", "0.1"),
        ("outline_width_unit", "MM"),
        ("style", "solid"),
        ("joinstyle", "bevel"),
    )
    opts = "".join(f'            <Option type="QString" name="{k}" value="{v}"/>\n' for k, v in props)
    legacy = "".join(f'          <prop k="{k}" v="{v}"/>\n' for k, v in props)
    return (
        '        <layer class="SimpleFill" enabled="1" locked="0" pass="0">\n'
        f'          <Option type="Map">\n{opts}          </Option>\n{legacy}        </layer>\n'
    )


def polygon_qml(names: Sequence[str], colors: Sequence[Sequence[int]], attribute: str = "class_name") -> str:
    """A QGIS categorised style on ``attribute`` (the class name), one fill per class in its colour."""
    cats = "".join(
        f'      <category value={quoteattr(str(n))} symbol="{i}" label={quoteattr(str(n))} render="true"/>\n'
        for i, n in enumerate(names)
    )
    syms = "".join(
        f'      <symbol type="fill" name="{i}" alpha="1" clip_to_extent="1" force_rhr="0">\n'
        + _fill_layer(c)
        + "      </symbol>\n"
        for i, c in enumerate(colors)
    )
    body = (
        f'  <renderer-v2 type="categorizedSymbol" attr={quoteattr(attribute)} symbollevels="0" enableorderby="0" '
        'forceraster="0">\n'
        f"    <categories>\n{cats}    </categories>\n    <symbols>\n{syms}    </symbols>\n"
        "  </renderer-v2>\n  <blendMode>0</blendMode>\n  <featureBlendMode>0</featureBlendMode>\n"
        "  <layerGeometryType>2</layerGeometryType>\n"
    )
    return _qml(body, "Symbology")


def polygon_sld(
    layer: str, names: Sequence[str], colors: Sequence[Sequence[int]], attribute: str = "class_name"
) -> str:
    """The same rules as :func:`polygon_qml` as an OGC SLD 1.1 (for tools that read SLD)."""
    rules = "".join(
        f"        <se:Rule>\n          <se:Name>{escape(str(n))}</se:Name>\n"
        f"          <ogc:Filter><ogc:PropertyIsEqualTo><ogc:PropertyName>{escape(attribute)}</ogc:PropertyName>"
        f"<ogc:Literal>{escape(str(n))}</ogc:Literal></ogc:PropertyIsEqualTo></ogc:Filter>\n"
        f'          <se:PolygonSymbolizer><se:Fill><se:SvgParameter name="fill">{_hex(c)}</se:SvgParameter></se:Fill>'
        '<se:Stroke><se:SvgParameter name="stroke">#232323</se:SvgParameter>'
        '<se:SvgParameter name="stroke-width">0.5</se:SvgParameter></se:Stroke></se:PolygonSymbolizer>\n'
        "        </se:Rule>\n"
        for n, c in zip(names, colors)
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<StyledLayerDescriptor xmlns="http://www.opengis.net/sld" xmlns:ogc="http://www.opengis.net/ogc" '
        'xmlns:se="http://www.opengis.net/se" xmlns:xlink="http://www.w3.org/1999/xlink" '
        'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" version="1.1.0" '
        'xsi:schemaLocation="http://www.opengis.net/sld http://schemas.opengis.net/sld/1.1.0/StyledLayerDescriptor.xsd">\n'
        f"  <NamedLayer>\n    <se:Name>{escape(layer)}</se:Name>\n    <UserStyle>\n"
        f"      <se:Name>{escape(layer)}</se:Name>\n      <se:FeatureTypeStyle>\n{rules}"
        "      </se:FeatureTypeStyle>\n    </UserStyle>\n  </NamedLayer>\n</StyledLayerDescriptor>\n"
    )


#: Columns of QGIS's ``layer_styles`` table, in QGIS's order (the ``id`` key comes first).
LAYER_STYLES_COLUMNS = (
    "f_table_catalog",
    "f_table_schema",
    "f_table_name",
    "f_geometry_column",
    "styleName",
    "styleQML",
    "styleSLD",
    "useAsDefault",
    "description",
    "owner",
    "ui",
    "update_time",
)


def write_layer_style(
    gpkg: str | Path,
    layer: str,
    geometry_column: str,
    names: Sequence[str],
    colors: Sequence[Sequence[int]],
    style_name: str | None = None,
) -> None:
    """Store the polygons' style in a GeoPackage's ``layer_styles`` table as QGIS does.

    The table is created through GDAL like QGIS creates it (an attributes table registered
    in ``gpkg_contents``, key ``id``) when missing; rows of other layers (a user's styles in a
    GeoPackage that holds other layers) are kept, an earlier row for ``layer`` is replaced.
    The row is the layer's default style, so QGIS applies it when it opens the layer.

    Args:
        gpkg: the GeoPackage (already holding ``layer``).
        layer: the polygon layer.
        geometry_column: its geometry column.
        names, colors: class names and RGB colours, in the same order.
        style_name: the style's name (default: the layer's name).
    """
    import pandas as pd
    import pyogrio

    name = style_name or layer
    exists = any(n == "layer_styles" for n, _ in pyogrio.list_layers(gpkg))
    if exists:
        with sqlite3.connect(gpkg) as con:
            con.execute("DELETE FROM layer_styles WHERE f_table_name = ? AND styleName = ?", (layer, name))
            con.execute("UPDATE layer_styles SET useAsDefault = 0 WHERE f_table_name = ?", (layer,))
        con.close()
    row = {
        "f_table_catalog": "",
        "f_table_schema": "",
        "f_table_name": layer,
        "f_geometry_column": geometry_column,
        "styleName": name,
        "styleQML": polygon_qml(names, colors),
        "styleSLD": polygon_sld(layer, names, colors),
        "useAsDefault": True,
        "description": "geovae: polygons by class, in the model's colours",
        "owner": "",
        "ui": "",
        "update_time": pd.Timestamp(datetime.now(UTC).replace(tzinfo=None)),
    }
    df = pd.DataFrame([row], columns=list(LAYER_STYLES_COLUMNS))
    pyogrio.write_dataframe(
        df, gpkg, layer="layer_styles", driver="GPKG", append=exists, layer_options=None if exists else {"FID": "id"}
    )


def read_layer_styles(gpkg: str | Path) -> list[dict[str, Any]]:
    """The rows of a GeoPackage's ``layer_styles`` table (empty when it has none)."""
    with sqlite3.connect(gpkg) as con:
        con.row_factory = sqlite3.Row
        try:
            rows = [dict(r) for r in con.execute("SELECT * FROM layer_styles")]
        except sqlite3.OperationalError:
            rows = []
    con.close()
    return rows
