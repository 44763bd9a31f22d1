"""The class polygons of a ``segment`` run, traced while the model runs: a block sink.

:class:`PolygonStream` takes each output block as the run writes it (:class:`geovae.blocks.Block`,
the arrays the run already holds, nothing read back); a worker thread traces every finished
row of blocks with the engine :func:`~geovae.vector.write_polygons` uses, so the polygons
are those of vectorising the finished raster, while the model computes the next rows.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from rasterio.windows import Window

from geovae import signals
from geovae.blocks import Block
from geovae.cpu import lower_priority
from geovae.errors import OptionError
from geovae.products import CLASS_NODATA, area_column
from geovae.vector.engine import LayerOptions, OpenState, VectorizeResult, check_options, trace_layer
from geovae.vector.formats import Stopped, load_lazy_imports, put_checked, style_geopackages, wake
from geovae.vector.regions import BlockValues, anomaly_flags, class_layer

__all__ = ["PolygonStream"]

_Bands = dict[str, np.ndarray]


class PolygonStream:
    """Class polygons traced while the class raster is being written; a
    :class:`~geovae.blocks.BlockSink`.

    ``segment`` feeds each output block to :meth:`add` in write order; a worker thread
    traces every finished row of blocks with the same engine as
    :func:`~geovae.vector.write_polygons`, so the polygons are those of vectorising the
    finished raster. On a GPU the CPU is otherwise idle then; on a CPU the model's threads
    rarely keep every core busy. At most ``queue_blocks`` blocks wait for the worker, however
    wide the scene: a slower worker holds the run back rather than letting memory grow.

    The worker and the format writers import nothing once started (every module they use is
    imported with this one, and pyarrow's lazy imports are made first, see
    :mod:`geovae.vector.formats`; with ``simplify`` the worker still calls geopandas, which
    is not checked): Ctrl-C or SIGTERM raised in the main thread at the wrong moment of an
    import can leave the interpreter's import lock held, and a thread importing after that
    waits forever (pyarrow imports ``pyarrow.pandas_compat`` on its first pandas conversion).

    Args:
        options: the outputs, the class raster's grid (``crs`` None: pixel coordinates, as
            :func:`~geovae.vector.write_polygons` does for a raster without CRS), the run's
            block side (the rows' height, for progress) and how to trace.
        classes: the class table, ``{id: {"name": str, "color": [r, g, b] | None}}`` (the
            model's classes): the polygons' ``class_name`` and the GeoPackages' style.
        confidence, uncertainty: whether the blocks carry these bands (averaged per polygon).
        anomaly_threshold: with a reconstruction-error band, the error above which a pixel
            counts toward ``anomaly_fraction``; None for none.
        queue_blocks: how many blocks may wait for the worker.

    Raises:
        OptionError: an option out of range, or GeoJSON asked for pixel coordinates.
    """

    def __init__(
        self,
        options: LayerOptions,
        *,
        classes: Mapping[int, Mapping[str, Any]],
        confidence: bool = True,
        uncertainty: bool = False,
        anomaly_threshold: float | None = None,
        queue_blocks: int = 2,
    ):
        check_options(options.block, options.connectivity, options.min_area, options.simplify)
        if options.crs is None and any(Path(f).suffix.lower() == ".geojson" for f, _ in options.targets):
            raise OptionError("GeoJSON needs a CRS and this raster has none; use .gpkg or .parquet")
        self.options = replace(options, targets=tuple((Path(f), Path(d)) for f, d in options.targets))
        self.table = {int(k): dict(v) for k, v in classes.items()}
        self.names = {k: str(v["name"]) for k, v in self.table.items()}
        self.threshold = anomaly_threshold
        self.rows_done = 0
        self.rows_total = math.ceil(options.height / options.block)
        self.result: VectorizeResult | None = None
        #: The pieces the engine holds open between rows of blocks, updated as it goes.
        self.open_state = OpenState()
        self._error: BaseException | None = None
        self._aborted = False
        self._open_row = False  # add is inside a row of blocks
        self._current: BlockValues | None = None
        self._queue: queue.Queue[tuple[Window, _Bands] | None] = queue.Queue(maxsize=queue_blocks)
        # Made here, on the caller's thread: their first use imports (see the class docstring).
        load_lazy_imports()
        _ = self.options.measure
        layer = class_layer(
            lambda win: self._current,
            np.dtype(np.uint8),
            self.names,
            area_column(options.crs is None),
            options.connectivity,
            conf=confidence,
            unc=uncertainty,
            anom=anomaly_threshold is not None,
        )
        self._thread = threading.Thread(
            target=self._work, args=(layer, self.options), name="geovae-polygons", daemon=True
        )
        self._thread.start()

    # -- the run's side ------------------------------------------------------------------
    def add(self, block: Block) -> None:
        """Take one written block (scene coordinates, blocks in row-major order) with the
        arrays the run wrote (``classes``, ``confidence``, ``uncertainty``,
        ``reconstruction_error``: ``(bands, h, w)``).

        Raises:
            whatever stopped the worker (a full disk, ...), in the caller's thread.
        """
        window, arrays = block.window, block.arrays
        # Only the bands the polygons use, and the entropy band alone (a view would keep the
        # mutual-information band alive in the queue too); the rest is the worker's work.
        bands = {"classes": arrays["classes"][0], "confidence": arrays["confidence"][0]}
        if "uncertainty" in arrays:
            bands["uncertainty"] = arrays["uncertainty"][0].copy()
        if self.threshold is not None:
            bands["reconstruction_error"] = arrays["reconstruction_error"][0]
        self._open_row = window.col_off + window.width < self.options.width
        put_checked(self._queue, (window, bands), self._check)

    def _values(self, bands: _Bands) -> BlockValues | None:
        classes = bands["classes"]
        valid = classes != CLASS_NODATA
        if not valid.any():
            return None
        anom = None if self.threshold is None else anomaly_flags(bands["reconstruction_error"], self.threshold)
        return BlockValues(classes, valid, bands["confidence"], bands.get("uncertainty"), anom)

    def _check(self) -> None:
        self._raise()
        if not self._thread.is_alive():
            raise RuntimeError("the polygon worker stopped unexpectedly")

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    # -- the worker's side ---------------------------------------------------------------
    def _next(self) -> tuple[Window, _Bands] | None:
        item = self._queue.get()
        if self._aborted:
            raise Stopped
        return item

    def _rows(self) -> Iterator[Iterator[Window]]:
        """Rows of blocks as they arrive; each block's values in ``_current`` while traced."""
        first = self._next()
        while first is not None:
            yield self._row(first)
            first = self._next()

    def _row(self, first: tuple[Window, _Bands]) -> Iterator[Window]:
        item: tuple[Window, _Bands] | None = first
        while item is not None:
            win, bands = item
            self._current = self._values(bands)
            yield win
            self._current = None
            if win.col_off + win.width >= self.options.width:
                return
            item = self._next()
        raise ValueError("the stream ended inside a row of blocks")

    def _progress(self, done: int, total: int) -> None:
        self.rows_done = done

    def _work(self, layer: Any, options: LayerOptions) -> None:
        lower_priority()  # the model's threads first (geovae.cpu)
        try:
            self.result = trace_layer(
                layer, options, rows=self._rows(), progress=self._progress, open_state=self.open_state
            )
        except Stopped:
            pass
        except BaseException as exc:
            self._error = exc
        finally:
            self._current = None

    # -- the end -------------------------------------------------------------------------
    def close(self, progress: Callable[[int, int], None] | None = None) -> VectorizeResult:
        """Wait for the last rows, write every format, style the GeoPackages; the result.

        Args:
            progress: an optional ``progress(done_rows, total_rows)``, called while waiting.

        Raises:
            ValueError: the last row of blocks is incomplete.
            whatever stopped the worker (a full disk, ...).
        """
        if self._open_row:
            raise ValueError("the last row of blocks is incomplete")
        put_checked(self._queue, None, self._check)
        while self._thread.is_alive():
            self._thread.join(0.2)
            signals.check()
            if progress is not None:
                progress(self.rows_done, self.rows_total)
        self._raise()
        assert self.result is not None
        style_geopackages(self.options.targets, self.options.layer, self.table, self.names)
        return self.result

    def abort(self) -> None:
        """Stop the worker and wait for it (its temporary files are removed): after an error."""
        self._aborted = True
        wake(self._queue, None)
        self._thread.join()
