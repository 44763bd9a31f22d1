"""The statistics sink: what a run's report and STAC Item say about its rasters, counted
block by block as the blocks go by (nothing is read back from the written files).

* pixels and areas of each class (:class:`~geovae.areas.PixelAreas`, the polygons' area
  convention), summed in write order, so a split scene's assembled outputs count exactly as
  a single run;
* with an anomaly threshold, the pixels of each class whose reconstruction error is above
  it (the trust check's flagged fraction);
* exact minimum, maximum, mean, standard deviation and valid percentage of every band of
  every raster, as the STAC raster extension names them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from affine import Affine

from geovae.areas import PixelAreas
from geovae.blocks import Block
from geovae.classes import CLASS_NODATA
from geovae.model.base import ModelInfo

__all__ = ["BandStatistics", "Statistics", "StatisticsSink"]


class BandStatistics:
    """Running minimum, maximum, sum, sum of squares and counts of each band of one raster.

    Args:
        bands: the raster's band count.
        nodata: its nodata value; None for NaN.
    """

    def __init__(self, bands: int, nodata: int | None):
        self.nodata = nodata
        self.low = np.full(bands, np.inf)
        self.high = np.full(bands, -np.inf)
        self.sum = np.zeros(bands)
        self.squares = np.zeros(bands)
        self.valid = np.zeros(bands, dtype=np.int64)
        self.total = 0

    def add(self, values: np.ndarray) -> None:
        """Count one block's ``(bands, h, w)`` values."""
        self.total += values[0].size
        for b, v in enumerate(values):
            ok = v != self.nodata if self.nodata is not None else ~np.isnan(v)
            x = v[ok].astype(np.float64)
            if x.size:
                self.low[b] = min(self.low[b], x.min())
                self.high[b] = max(self.high[b], x.max())
                self.sum[b] += x.sum()
                self.squares[b] += np.dot(x, x)
                self.valid[b] += x.size

    def result(self) -> list[dict[str, float | None]]:
        """One dict per band: ``minimum``, ``maximum``, ``mean``, ``stddev`` (None where the
        band has no valid pixel) and ``valid_percent`` (0..100)."""
        out = []
        for b in range(len(self.valid)):
            n = int(self.valid[b])
            mean = self.sum[b] / n if n else None
            std = math.sqrt(max(self.squares[b] / n - mean * mean, 0.0)) if mean is not None else None
            out.append(
                {
                    "minimum": float(self.low[b]) if n else None,
                    "maximum": float(self.high[b]) if n else None,
                    "mean": mean,
                    "stddev": std,
                    "valid_percent": 100.0 * n / self.total if self.total else 0.0,
                }
            )
        return out


@dataclass
class Statistics:
    """What a :class:`StatisticsSink` counted.

    Attributes:
        class_pixels: int64 (K,) pixels of each class, in the model's class order.
        class_area: float64 (K,) area of each class (m^2; pixels without a CRS).
        class_flagged: int64 (K,) pixels of each class above the anomaly threshold; None when
            the run has none.
        area_unit: how areas were measured (:attr:`geovae.areas.AreaMeasure.unit`).
        bands: per raster kind, per band statistics (:meth:`BandStatistics.result`).
    """

    class_pixels: np.ndarray
    class_area: np.ndarray
    class_flagged: np.ndarray | None
    area_unit: str
    bands: dict[str, list[dict[str, float | None]]]


class StatisticsSink:
    """Counts a run's blocks: class pixels and areas, anomaly-flagged pixels, band statistics.

    Args:
        info: the model description (class ids).
        crs: the scene's CRS (None in pixel coordinates).
        transform: the scene's geotransform (areas are measured on scene coordinates).
        anomaly_threshold: count the pixels whose reconstruction error is above this value,
            per class (blocks then carry ``reconstruction_error``); None for none.
    """

    def __init__(self, info: ModelInfo, crs: Any, transform: Affine, anomaly_threshold: float | None = None):
        self.num_classes = info.num_classes
        self.anomaly_threshold = anomaly_threshold
        # class raster value -> class index, -1 for nodata (and values of no class)
        self._class_index = np.full(256, -1, dtype=np.int64)
        self._class_index[np.asarray(info.class_ids, dtype=np.uint8)] = np.arange(self.num_classes)
        self.areas = PixelAreas(crs, transform)
        self.class_pixels = np.zeros(self.num_classes, dtype=np.int64)
        self.class_area = np.zeros(self.num_classes, dtype=np.float64)
        self.class_flagged = np.zeros(self.num_classes, dtype=np.int64)
        self._bands: dict[str, BandStatistics] = {}

    def add(self, block: Block) -> None:
        """Count one block (``classes`` and, with a threshold, ``reconstruction_error`` needed)."""
        for kind, values in block.arrays.items():
            if kind not in self._bands:
                self._bands[kind] = BandStatistics(values.shape[0], CLASS_NODATA if kind == "classes" else None)
            self._bands[kind].add(values)
        index = self._class_index[block.arrays["classes"][0]]
        ok = index >= 0
        self.class_pixels += np.bincount(index[ok].ravel(), minlength=self.num_classes)
        if self.anomaly_threshold is not None:
            flagged = ok & (block.arrays["reconstruction_error"][0] > self.anomaly_threshold)
            self.class_flagged += np.bincount(index[flagged].ravel(), minlength=self.num_classes)
        self.class_area += self.areas.class_areas(index, block.window, self.num_classes)

    def pixels(self) -> list[int]:
        """The pixels of each class counted so far."""
        return [int(n) for n in self.class_pixels]

    def close(self) -> Statistics:
        """The counts."""
        return Statistics(
            class_pixels=self.class_pixels,
            class_area=self.class_area,
            class_flagged=self.class_flagged if self.anomaly_threshold is not None else None,
            area_unit=self.areas.measure.unit,
            bands={k: st.result() for k, st in self._bands.items()},
        )

    def abort(self) -> None:
        """Nothing to undo: the counts live in memory."""
