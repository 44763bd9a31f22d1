"""Scene-wide band statistics, streamed block by block over valid pixels.

Training normalises with these numbers and the model file keeps them, together with the
percentiles of the training pixels, so that prediction normalises every tile of every scene
the same way and can tell when a scene lies far outside what the model saw
(:mod:`geovae.segment.trust`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np

from geovae import signals
from geovae.errors import SceneError
from geovae.scene import open_raster

__all__ = ["QUANTILES", "BandStats", "band_statistics"]

#: Quantiles of the training pixels a model file records, per band: the bulk (0.5 %..99.5 %)
#: and the median are what the trust check compares a scene with.
QUANTILES = (0.005, 0.5, 0.995)

#: Most values per band kept for the quantiles of a raster whose dtype has no small
#: exact histogram (32-bit and float data): a strided subsample of the valid pixels.
_SAMPLE_VALUES = 2_000_000


@dataclass(frozen=True)
class BandStats:
    """Per-band statistics of a raster's valid pixels.

    Attributes:
        mean: per-band mean.
        std: per-band standard deviation (at least 1e-6, so it can divide).
        n_valid: number of valid pixels.
        dtype: the raster's data type.
        quantiles: ``{"0.005": [...], "0.5": [...], "0.995": [...]}``, one value per band.
    """

    mean: list[float]
    std: list[float]
    n_valid: int
    dtype: str
    quantiles: dict[str, list[float]] = field(default_factory=dict)


class _Quantiles:
    """Exact histograms for 8- and 16-bit bands, a strided subsample for the rest."""

    def __init__(self, dtype: np.dtype, bands: int, pixels: int):
        self.exact = dtype in (np.uint8, np.int8, np.uint16, np.int16)
        self.offset = int(np.iinfo(dtype).min) if self.exact else 0
        self.hist = np.zeros((bands, 1 << (8 * dtype.itemsize)), np.int64) if self.exact else None
        self.stride = max(1, math.ceil(pixels / _SAMPLE_VALUES))
        self.samples: list[list[np.ndarray]] = [[] for _ in range(bands)]

    def add(self, b: int, values: np.ndarray) -> None:
        if self.hist is not None:
            self.hist[b] += np.bincount((values.astype(np.int64) - self.offset), minlength=self.hist.shape[1])
        else:
            self.samples[b].append(values[:: self.stride].astype(np.float64))

    def result(self) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {str(q): [] for q in QUANTILES}
        for b in range(len(self.samples)):
            for q in QUANTILES:
                if self.hist is not None:
                    cum = np.cumsum(self.hist[b])
                    v = float(np.searchsorted(cum, q * (cum[-1] - 1), side="right") + self.offset)
                else:
                    v = float(np.quantile(np.concatenate(self.samples[b]), q))
                out[str(q)].append(v)
        return out


def band_statistics(path: str | os.PathLike[str], nodata: float | None = None) -> BandStats:
    """Scene-wide per-band mean, standard deviation and quantiles over valid pixels.

    Memory stays at one block whatever the raster's size. A pixel is valid where GDAL's
    dataset mask says so (at least one band differs from nodata, or the alpha/mask band is
    set); within a valid pixel a band equal to ``nodata`` is left out of that band's sums.

    Args:
        path: the raster (any path :func:`geovae.scene.open_raster` takes).
        nodata: override of the raster's nodata value (None: use the file's).

    Returns:
        The :class:`BandStats`.

    Raises:
        SceneError: if the raster cannot be read or has no valid pixel in some band.
    """
    p = str(path)
    with open_raster(p, "image") as src:
        nd = src.nodata if nodata is None else nodata
        c = src.count
        dtype = np.dtype(src.dtypes[0])
        s = np.zeros(c, np.float64)
        ss = np.zeros(c, np.float64)
        n = np.zeros(c, np.float64)
        n_valid = 0
        quant = _Quantiles(dtype, c, src.width * src.height)
        for _, win in src.block_windows(1):
            signals.check()
            raw = src.read(window=win)
            data = raw.astype(np.float64)
            valid = src.dataset_mask(window=win) > 0
            if nd is not None and not math.isnan(nd):
                band_ok = (data != nd) & valid[None]
            else:
                band_ok = np.isfinite(data) & valid[None]
            n_valid += int(valid.sum())
            d = np.where(band_ok, data, 0.0)
            s += d.sum(axis=(1, 2))
            ss += (d * d).sum(axis=(1, 2))
            n += band_ok.sum(axis=(1, 2))
            for b in range(c):
                quant.add(b, raw[b][band_ok[b]])
    if n_valid == 0 or (n == 0).any():
        raise SceneError(f"image {p}: has no valid pixels (all nodata) in some band; check its nodata value")
    mean = s / n
    # Sum of squares in float64 is exact enough for 8- to 16-bit imagery at any scene size.
    var = np.maximum(ss / n - mean * mean, 0.0)
    std = np.maximum(np.sqrt(var), 1e-6)
    return BandStats(
        mean=[float(v) for v in mean],
        std=[float(v) for v in std],
        n_valid=n_valid,
        dtype=str(dtype),
        quantiles=quant.result(),
    )
