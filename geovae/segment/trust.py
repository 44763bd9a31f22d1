"""Is this scene something the model can read? Checked before any tile runs, and during the run.

A model trained on one sensor, dtype and scale turns a scene from another into a confident,
wrong map: every pixel is "far out" in the model's normalised units, the softmax saturates,
and nothing in the class raster says so. Two checks guard against that:

* **Before the run** (:func:`check_scene`): a sparse sample of the scene
  (:func:`scene_sample`: 64 windows of 128², never a full read) is compared
  with the per-band quantiles of the training pixels recorded in the model file
  (``ModelInfo.training``). When most pixels of a band lie far outside the training range
  (another dtype, scale or sensor), the run is refused with one line saying what differs,
  unless ``force``. Model files without recorded quantiles are compared with their
  normalisation (mean and std) instead; a TorchGeo checkpoint without either is not checked.
* **During the run**: a model with a reconstruction decoder rebuilds every pixel; the run
  counts the pixels whose reconstruction error is above the training's 99.5th percentile
  (:func:`anomaly_threshold`). The report gives that flagged fraction per class and for the
  scene, the polygons an ``anomaly_fraction``, and the CLI warns when it is large.
"""

from __future__ import annotations

import math
from typing import Any, TypedDict

import numpy as np

from geovae.errors import ModelMismatchError
from geovae.model.base import ModelInfo
from geovae.scene import Scene

__all__ = ["FAR_OUTSIDE", "THRESHOLD_QUANTILE", "WARN_FLAGGED", "anomaly_threshold", "check_scene", "scene_sample"]

#: A band is "far outside" when more than this share of its sampled pixels lie outside the
#: training range widened by half its width on each side (or beyond 6 standard deviations).
FAR_OUTSIDE = 0.5
#: The CLI warns when more than this share of the scene's pixels is flagged as anomalous.
WARN_FLAGGED = 0.1
#: Quantile of the training pixels' reconstruction error above which a pixel is flagged.
THRESHOLD_QUANTILE = "0.995"
#: The sample :func:`check_scene` reads: 64 windows of 128 x 128, about a million pixels. A
#: "far outside" verdict is a share above one half, which a million pixels in 64 places
#: settle many times over; windows of 256 would read the whole of a 2048² scene, 0.36 s of a
#: 6.4 s run on 2 cores, four times what 128 costs.
SAMPLE_WINDOWS, SAMPLE_SIZE = 64, 128


def scene_sample(scene: Scene) -> np.ndarray:
    """The valid pixels :func:`check_scene` compares, float32 (count, n); read it once and pass
    it to ``check_scene`` when the caller wants it too (``segment`` checks it for any valid pixel)."""
    return scene.sample(SAMPLE_WINDOWS, SAMPLE_SIZE)


def anomaly_threshold(info: ModelInfo) -> float | None:
    """The reconstruction error above which a pixel is unlike the training data, or None."""
    q = (info.training or {}).get("reconstruction_error_quantiles") or {}
    v = q.get(THRESHOLD_QUANTILE)
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


class _BandCheck(TypedDict):
    """One band's entry in :func:`check_scene`'s report."""

    band: int
    scene_median: float
    training_median: float
    training_range: list[float]
    outside: float


def _band_name(info: ModelInfo, b: int) -> str:
    names = info.band_names or []
    return f"band {b + 1}" + (f" ({names[b]})" if b < len(names) and names[b] else "")


def _fmt(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def check_scene(
    scene: Scene, info: ModelInfo, *, force: bool = False, sample: np.ndarray | None = None
) -> dict[str, Any]:
    """Compare a sample of the scene with what the model was trained on.

    Args:
        scene: the scene.
        info: the model's description (``training`` quantiles, else ``mean``/``std``).
        force: report but do not refuse a scene far outside the training data.
        sample: :func:`scene_sample` of the scene, when the caller has read it already.

    Returns:
        The report's ``trust.scene`` entry: how the scene was checked, per band the scene's
        median and the share of sampled pixels outside the training range, and whether it
        was judged far outside (``far_outside``).

    Raises:
        ModelMismatchError: the scene is far outside the training data and ``force`` is off.
    """
    training = info.training or {}
    quant = training.get("quantiles") or {}
    found = [quant.get(k) for k in ("0.005", "0.5", "0.995")]
    have_q = all(isinstance(q, list) and len(q) == info.in_channels for q in found)
    lo_q, med_q, hi_q = (q if isinstance(q, list) else [] for q in found)
    default_norm = all(m == 0.0 for m in info.mean) and all(s == 1.0 for s in info.std)
    if not have_q and default_norm:
        return {"checked": False, "reason": "the model file records no training statistics"}
    x = scene_sample(scene) if sample is None else sample
    if x.shape[1] == 0:
        return {"checked": False, "reason": "no valid pixel in the sample"}
    bands: list[_BandCheck] = []
    for b in range(info.in_channels):
        v = x[b]
        if have_q:
            lo, hi = float(lo_q[b]), float(hi_q[b])
            span = max(hi - lo, 1e-6 * max(abs(hi), 1.0))
            allowed = (lo - span / 2, hi + span / 2)
            ref_median = float(med_q[b])
        else:
            m, s = float(info.mean[b]), float(info.std[b])
            allowed = (m - 6 * s, m + 6 * s)
            lo, hi, ref_median = m - 3 * s, m + 3 * s, m
        outside = float(((v < allowed[0]) | (v > allowed[1])).mean())
        bands.append(
            {
                "band": b + 1,
                "scene_median": float(np.median(v)),
                "training_median": ref_median,
                "training_range": [lo, hi],
                "outside": round(outside, 4),
            }
        )
    worst = max(bands, key=lambda d: d["outside"])
    far = worst["outside"] > FAR_OUTSIDE
    result = {
        "checked": True,
        "by": "training quantiles" if have_q else "normalisation (mean, std)",
        "sampled_pixels": int(x.shape[1]),
        "bands": bands,
        "far_outside": far,
        "forced": bool(force and far),
    }
    if far and not force:
        b = worst["band"] - 1
        tdt = training.get("dtype")
        sdt = scene.dtypes[0]
        dtypes = f"; scene {sdt}, training {tdt}" if tdt and tdt != sdt else ""
        raise ModelMismatchError(
            f"scene {scene.name} does not look like the model's training data: {worst['outside']:.0%} of the "
            f"sampled pixels of {_band_name(info, b)} lie outside the training range "
            f"{_fmt(worst['training_range'][0])}..{_fmt(worst['training_range'][1])} (scene median "
            f"{_fmt(worst['scene_median'])}, training {_fmt(worst['training_median'])}{dtypes}); it may come from "
            "another sensor or be scaled differently: rescale it to the training units or use a model trained on "
            "such scenes, or pass --force to segment it anyway"
        )
    return result
