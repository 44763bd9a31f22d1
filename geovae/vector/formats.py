"""The output formats: GeoJSON, GeoPackage and GeoParquet writers fed Arrow batches.

Without simplification every format is written while the polygons are traced: one thread
per format takes Arrow record batches (WKB geometry) from a queue (:class:`FormatWriters`).
With simplification the finished polygons are gathered in a private GeoPackage first
(:class:`PartsWriter`), then streamed into each format (:func:`write_output`).

The writer threads import nothing once started: every module they use is imported with this
one and pyarrow's lazy imports are made first (:func:`load_lazy_imports`). Ctrl-C or SIGTERM
raised in the main thread at the wrong moment of an import can leave the interpreter's import
lock held, and a thread importing after that waits forever.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from itertools import chain
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pyogrio
import shapely
from pyproj import CRS as ProjCRS

from geovae.atomic import OutputSet, check_not_inputs, check_output_file
from geovae.cpu import lower_priority
from geovae.errors import OptionError
from geovae.products import POLYGON_FORMATS

__all__ = [
    "PARTS_LAYER",
    "ColumnType",
    "FormatWriters",
    "PartsWriter",
    "Stopped",
    "load_lazy_imports",
    "output_paths",
    "put_checked",
    "style_geopackages",
    "wake",
    "write_files",
    "write_format",
    "write_output",
]

#: Finished polygons are flushed in chunks of this many (20,000 holds ~45 MiB more at peak
#: for no measurable speed-up).
_FLUSH_EVERY = 5_000
#: Polygons per batch when streaming the parts file into GeoJSON / GeoParquet.
_STREAM_BATCH = 20_000

#: A layer column's pandas dtype: a dtype name, or ``object`` for text.
ColumnType = str | type[object]

#: The layer of the private parts GeoPackage.
PARTS_LAYER = "polygons"


class PartsWriter:
    """Appends finished polygons (scene CRS) to a private GeoPackage in chunks."""

    def __init__(self, path: Path, crs: Any, geometry_type: str, columns: list[str], dtypes: dict[str, ColumnType]):
        self.path = path
        self.crs = crs
        self.geometry_type = geometry_type
        self.columns = columns
        self.dtypes = dtypes
        self.buffer: list[dict[str, Any]] = []
        self.n = 0
        self.started = False

    def add(self, rows: dict[str, Any]) -> None:
        if len(rows["geometry"]):
            self.buffer.append(rows)
            if sum(len(r["geometry"]) for r in self.buffer) >= _FLUSH_EVERY:
                self.flush()

    def flush(self, force: bool = False) -> None:

        if not self.buffer and (self.started or not force):
            return
        cols = self.columns
        if self.buffer:
            df = pd.concat([pd.DataFrame(r) for r in self.buffer], ignore_index=True)
        else:
            df = pd.DataFrame({c: [] for c in [*cols, "geometry"]})
        df = df[[*cols, "geometry"]]
        for col in cols:
            df[col] = df[col].astype(self.dtypes[col])
        gdf = gpd.GeoDataFrame(df, geometry="geometry", crs=self.crs)
        with warnings.catch_warnings():
            # Pixel-coordinates mode has no CRS on purpose.
            warnings.filterwarnings("ignore", "'crs' was not provided", UserWarning)
            pyogrio.write_dataframe(
                gdf,
                self.path,
                driver="GPKG",
                layer=PARTS_LAYER,
                append=self.started,
                geometry_type=self.geometry_type,
                promote_to_multi=self.geometry_type == "MultiPolygon",
            )
        self.n += len(gdf)
        self.started = True
        self.buffer = []


def _geoparquet_schema(schema: Any, geom_col: str, crs: Any, geometry_type: str) -> Any:
    """``schema`` with its WKB column named ``geometry`` and GeoParquet 1.1 ``geo`` metadata."""

    i = schema.get_field_index(geom_col)
    schema = schema.set(i, pa.field("geometry", pa.binary()))
    geo = {
        "version": "1.1.0",
        "primary_column": "geometry",
        "columns": {
            "geometry": {
                "encoding": "WKB",
                "geometry_types": [geometry_type],
                # PROJJSON, as GeoParquet asks; null means "unknown" (pixel coordinates).
                "crs": None if crs is None else json.loads(ProjCRS.from_wkt(crs.to_wkt()).to_json()),
            }
        },
    }
    return schema.with_metadata({b"geo": json.dumps(geo).encode()})


def write_output(parts_path: Path, final: Path, dest: Path, crs: Any, geometry_type: str, layer: str) -> None:
    """Copy the parts GeoPackage into ``dest`` in the format ``final``'s suffix names, in
    Arrow record batches (WKB geometry) of ``_STREAM_BATCH`` polygons."""
    with pyogrio.raw.open_arrow(parts_path, layer=PARTS_LAYER, batch_size=_STREAM_BATCH, use_pyarrow=True) as (
        meta,
        reader,
    ):
        write_format(reader, meta.get("geometry_name") or "wkb_geometry", final, dest, crs, geometry_type, layer)


def _keep_other_layers(final: Path, dest: Path, layer: str) -> None:
    """A GeoPackage that already exists at ``final`` keeps its other layers (a user's basemap,
    another scene's polygons): it is copied to ``dest`` first and only ``layer`` is replaced
    in the copy."""

    if final.suffix.lower() == ".gpkg" and final.is_file() and final.resolve() != dest.resolve():
        try:
            others = [name for name, _ in pyogrio.list_layers(final) if name != layer]
        except Exception:
            others = []
        if others:
            shutil.copyfile(final, dest)


def write_format(reader: Any, geom_col: str, final: Path, dest: Path, crs: Any, geometry_type: str, layer: str) -> None:
    """Write the Arrow record batches of ``reader`` (a WKB geometry column ``geom_col`` and
    the attribute columns) into ``dest`` in the format ``final``'s suffix names."""
    suffix = final.suffix.lower()
    _keep_other_layers(final, dest, layer)
    if suffix == ".geojson":
        # RFC7946=YES makes GDAL reproject to WGS84 lon/lat itself (given the layer's CRS),
        # write right-hand (CCW exterior) rings and cut polygons at the antimeridian.
        pyogrio.write_arrow(
            reader,
            dest,
            driver="GeoJSON",
            layer=layer,
            geometry_name=geom_col,
            geometry_type=geometry_type,
            crs=crs.to_wkt(),
            layer_options={"RFC7946": "YES"},
        )
    elif suffix == ".gpkg":
        if crs is None:
            # A layer in pixel coordinates (--pixel-coords) has no CRS by design. pyogrio's
            # warning about it is attributed to this module (stacklevel 2), so the filter
            # silences only geovae's own writes. Set here, before each such write: a filter
            # made at import would be lost to a caller's catch_warnings block that ended.
            warnings.filterwarnings(
                "ignore", message="'crs' was not provided", category=UserWarning, module=r"geovae\.vector\.formats$"
            )
        # Into an existing GeoPackage (the copy above) GDAL replaces just this layer.
        pyogrio.write_arrow(
            reader,
            dest,
            driver="GPKG",
            layer=layer,
            geometry_name=geom_col,
            geometry_type=geometry_type,
            crs=None if crs is None else crs.to_wkt(),
        )
    else:
        schema = _geoparquet_schema(reader.schema, geom_col, crs, geometry_type)
        with pq.ParquetWriter(dest, schema) as w:
            for batch in reader:
                w.write_batch(pa.RecordBatch.from_arrays(batch.columns, schema=schema))


def load_lazy_imports() -> None:
    """Make, on the calling thread, the conversions whose first use imports modules
    (``pa.array(..., from_pandas=True)`` imports pyarrow.pandas_compat and what it needs),
    so the polygon threads never import (see the module docstring). Cheap after the first."""
    pa.array(np.array([np.nan]), type=pa.float64(), from_pandas=True)
    pa.array(["x"], type=pa.string(), from_pandas=True)


#: The Arrow type of each pandas dtype the layers' columns use.
_ARROW_TYPES: dict[ColumnType, str] = {"int32": "int32", "int64": "int64", "float64": "float64", object: "string"}


class FormatWriters:
    """Every output format written while the polygons are traced (no simplification).

    One thread per format runs :func:`_write_format` on an Arrow stream fed from a queue:
    GDAL formats the polygons (GeoJSON's text is slow: 1.5 s for 5,000 polygons of 290,000
    vertices) while the rest of the run goes on, instead of after it. Finished polygons go
    out in a batch after every block (and every ``_FLUSH_EVERY``); at most 2 batches wait per
    format, so a slow writer holds the tracing back rather than letting memory grow.
    """

    def __init__(
        self,
        targets: Sequence[tuple[Path, Path]],
        crs: Any,
        geometry_type: str,
        columns: list[str],
        dtypes: dict[str, ColumnType],
        layer: str,
    ):

        load_lazy_imports()
        self.columns = columns
        self.multi = geometry_type == "MultiPolygon"
        self.schema = pa.schema(
            [*(pa.field(c, _ARROW_TYPES[dtypes[c]]) for c in columns), pa.field("geometry", pa.binary())]
        )
        self.buffer: list[dict[str, Any]] = []
        self.n = 0
        self.errors: list[BaseException] = []
        self._stop = False
        self.queues: list[Any] = []
        self.threads: list[Any] = []
        for final, dest in targets:
            q: Any = queue.Queue(maxsize=2)
            t = threading.Thread(
                target=self._write,
                args=(q, Path(final), Path(dest), crs, geometry_type, layer),
                name="geovae-polygon-writer",
                daemon=True,
            )
            self.queues.append(q)
            self.threads.append(t)
            t.start()

    def _write(self, q: Any, final: Path, dest: Path, crs: Any, geometry_type: str, layer: str) -> None:
        lower_priority()  # the model's threads first (geovae.cpu)

        def batches() -> Iterator[Any]:
            while True:
                item = q.get()
                if item is None:
                    return
                if item is _ABORT or self._stop:
                    raise Stopped
                yield item

        try:
            reader = pa.RecordBatchReader.from_batches(self.schema, batches())
            write_format(reader, "geometry", final, dest, crs, geometry_type, layer)
        except BaseException as exc:
            if not self._stop:
                self.errors.append(exc)

    def add(self, rows: dict[str, Any]) -> None:
        if len(rows["geometry"]):
            self.buffer.append(rows)
            if sum(len(r["geometry"]) for r in self.buffer) >= _FLUSH_EVERY:
                self.flush()

    def flush(self) -> None:

        if not self.buffer:
            return
        cols = {
            c: list(chain.from_iterable(r[c] for r in self.buffer))
            if self.schema.field(c).type == pa.string()
            else np.concatenate([np.asarray(r[c]) for r in self.buffer])
            for c in self.columns
        }
        geoms = np.concatenate([np.asarray(r["geometry"], dtype=object) for r in self.buffer])
        if self.multi:
            single = shapely.get_type_id(geoms) == shapely.GeometryType.POLYGON
            geoms[single] = shapely.multipolygons(geoms[single, None])
        arrays = [pa.array(cols[c], type=self.schema.field(c).type, from_pandas=True) for c in self.columns]
        batch = pa.RecordBatch.from_arrays([*arrays, pa.array(shapely.to_wkb(geoms), pa.binary())], schema=self.schema)
        self.buffer = []
        self.n += len(geoms)
        for q in self.queues:
            put_checked(q, batch, self._check)

    def _check(self) -> None:
        if self.errors:
            raise self.errors[0]
        if not any(t.is_alive() for t in self.threads):
            raise RuntimeError("the polygon writers stopped unexpectedly")

    def close(self) -> None:
        """Write what is buffered, end every stream and wait for the writers."""
        self.flush()
        for q in self.queues:
            put_checked(q, None, self._check)
        for t in self.threads:
            t.join()
        if self.errors:
            raise self.errors[0]

    def abort(self) -> None:
        self._stop = True
        for q in self.queues:
            wake(q, _ABORT)
        for t in self.threads:
            t.join()


_ABORT = object()


class Stopped(Exception):
    """A writer or worker thread stops after an abort."""


def put_checked(q: Any, item: Any, check: Any) -> None:
    """``q.put(item)``, calling ``check()`` (which raises when the consumer has failed or
    stopped) before the first try and while the queue stays full."""

    while True:
        check()
        try:
            q.put(item, timeout=0.2)
            return
        except queue.Full:
            continue


def wake(q: Any, item: Any) -> None:
    """Empty ``q`` and leave ``item`` in it, so its consumer gets ``item`` next, whatever it was
    waiting for."""

    while True:
        try:
            q.get_nowait()
        except queue.Empty:
            break
    try:
        q.put_nowait(item)
    except queue.Full:  # refilled meanwhile: the consumer is running and sees the stop flag
        pass


def output_paths(out: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The output files a user named, checked: a known suffix each, none twice, each writable.

    Raises:
        OptionError: no output, an unknown suffix, or an output given twice.
        OutputError: an output's folder is missing or not writable.
    """
    outs = [out] if isinstance(out, (str, os.PathLike)) else list(out)
    if not outs:
        raise OptionError("no output file given; pass --out FILE.geojson, .gpkg or .parquet")
    paths = [Path(o) for o in outs]
    seen: set[Path] = set()
    for p in paths:
        if p.suffix.lower() not in _SUFFIXES:
            raise OptionError(
                f"unknown output format {p.suffix or '(no suffix)'!r} for {p}; use .geojson, .gpkg or .parquet"
            )
        key = p.expanduser().absolute()
        if key in seen:
            raise OptionError(f"output {p} is given twice; give each --out once")
        seen.add(key)
        check_output_file(p)
    return paths


_SUFFIXES = dict(POLYGON_FORMATS.values())


def write_files[R](
    out: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None,
    inputs: Sequence[Any],
    write: Callable[[list[tuple[Path, Path]]], R],
    *,
    kind: str,
    layer: str,
) -> R | gpd.GeoDataFrame:
    """Run ``write(targets)`` into the files ``out`` names, which appear together when complete.

    Each output folder gets one :class:`~geovae.atomic.OutputSet` (named ``kind``), committed
    once ``write`` returns; nothing is left under a final name when it raises.

    Args:
        out: the output file(s) (the suffix picks the format), or None to write into a
            temporary GeoPackage and return its ``layer`` as a GeoDataFrame instead.
        inputs: the files ``write`` reads, which no output may replace.
        write: ``write([(final path, path to write), ...])``, e.g. :func:`write_polygons`.
        kind: what is written (``"polygons"``, ``"objects"``): the output sets' and the
            temporary files' name.
        layer: the layer to return when ``out`` is None.

    Returns:
        What ``write`` returned, or the GeoDataFrame when ``out`` is None.

    Raises:
        OptionError, OutputError: as :func:`output_paths` and
            :func:`geovae.atomic.check_not_inputs`; and whatever ``write`` raises.
    """
    if out is None:
        with tempfile.TemporaryDirectory(prefix=f"geovae-{kind}-") as tmp:
            path = Path(tmp) / f"{kind}.gpkg"
            write([(path, path)])
            return pyogrio.read_dataframe(path, layer=layer)
    paths = output_paths(out)
    check_not_inputs(paths, inputs, fix="choose another --out file")
    with contextlib.ExitStack() as stack:
        sets: dict[Path, OutputSet] = {}
        for p in paths:
            folder = p.parent.absolute()
            if folder not in sets:
                sets[folder] = stack.enter_context(OutputSet(folder, kind, lock=False, inputs=inputs))
        res = write([(p, sets[p.parent.absolute()].path(p.name)) for p in paths])
        for folder, oset in sets.items():
            oset.commit([p.name for p in paths if p.parent.absolute() == folder])
    return res


def style_geopackages(
    targets: Sequence[tuple[Path, Path]], layer: str, table: dict[int, dict[str, Any]], names: dict[int, str]
) -> None:
    """Give every GeoPackage written QGIS's default style for ``layer`` (``layer_styles``):
    categorised on ``class_name``, in the colours of the class table ``table``
    (:func:`~geovae.products.read_class_table`; a default palette where it has none)."""
    from geovae.classes import DEFAULT_COLORS
    from geovae.styles import write_layer_style

    ids = sorted(set(table) | set(names))
    colors = [table.get(c, {}).get("color") or DEFAULT_COLORS[i % len(DEFAULT_COLORS)] for i, c in enumerate(ids)]
    labels = [names.get(c) or table.get(c, {}).get("name") or f"class {c}" for c in ids]
    for final, dest in targets:
        if Path(final).suffix.lower() == ".gpkg" and ids:
            geom = pyogrio.read_info(dest, layer=layer).get("geometry_name") or "geom"
            write_layer_style(dest, layer, geom, labels, colors)
