"""Is this scene something the model can read? Checked before any tile runs, and during the run.

A model trained on one sensor, dtype and scale turns a scene from another into a confident,
wrong map: every pixel is "far out" in the model's normalised units, the softmax saturates,
and nothing in the class raster says so. Two checks guard against that:

* **Before the run** (:func:`check_scene`): a sparse sample of the scene
  (:func:`scene_sample`: 64 windows of 128², never a full read) is compared
  with the per-band quantiles of the training pixels recorded in the model file
  (``ModelInfo.training``). When most pixels of a band lie far outside the training range
  (another dtype, scale or sensor), the run is refused with one line saying what differs,
  unless ``force``. A pretrained TorchGeo weight set records instead the pixel values its
  weights expect (``training["expected_range"]``: 0..255 for weights that divide by 255,
  :mod:`geovae.model.pretrained`), checked the same way. Model files with neither are
  compared with their normalisation (mean and std); a TorchGeo checkpoint without any is not
  checked.
* **During the run**: a model with a reconstruction decoder rebuilds every pixel; the run
  counts the pixels whose reconstruction error is above the training's 99.5th percentile
  (:func:`anomaly_threshold`). The report gives that flagged fraction per class and for the
  scene, the polygons an ``anomaly_fraction``, and the CLI warns when it is large.
"""

from __future__ import annotations

import logging
import math
from typing import Any, TypedDict

import numpy as np

from geovae.errors import AreaOutsideSceneError, ModelMismatchError, SceneError
from geovae.model.base import ModelInfo
from geovae.scene import Scene

__all__ = [
    "FAR_OUTSIDE",
    "THRESHOLD_QUANTILE",
    "WARN_FLAGGED",
    "anomaly_threshold",
    "band_mismatch",
    "check_scene",
    "resolution_note",
    "scene_sample",
    "trust_findings",
]

log = logging.getLogger("geovae.segment")

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


def trust_findings(scene: Scene, info: ModelInfo, *, force: bool = False, check: bool = True) -> dict[str, Any]:
    """The checks a run makes before any tile runs: the scene has valid pixels, and (with
    ``check``) it looks like the training data (:func:`check_scene`).

    Returns:
        The report's ``trust`` entry: ``{"scene": what check_scene found}`` (``{"checked":
        False}`` without ``check``).

    Raises:
        AreaOutsideSceneError: a stacked scene's area holds no valid pixel.
        SceneError: the scene has no valid pixel.
        ModelMismatchError: as :func:`check_scene`.
    """
    # One sparse read serves both checks: valid pixels in the sample settle any_valid, whose
    # decimated whole-scene read is then only needed for a scene the sample finds empty.
    sample = scene_sample(scene) if check else None
    if (sample is None or sample.shape[1] == 0) and not scene.any_valid():
        if scene.source is not None and scene.source.area is not None:
            raise AreaOutsideSceneError(
                f"the area holds no valid pixel of {scene.name} (all nodata there); nothing to segment"
            )
        raise SceneError(f"scene {scene.name} has no valid pixels (all nodata); check --nodata or the file")
    return {"scene": check_scene(scene, info, force=force, sample=sample) if check else {"checked": False}}


def anomaly_threshold(info: ModelInfo) -> float | None:
    """The reconstruction error above which a pixel is unlike the training data, or None."""
    q = (info.training or {}).get("reconstruction_error_quantiles") or {}
    v = q.get(THRESHOLD_QUANTILE)
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


class _BandCheck(TypedDict):
    """One band's entry in :func:`check_scene`'s report."""

    band: int
    scene_median: float
    training_median: float | None
    training_range: list[float]
    outside: float


def band_mismatch(scene: str, count: int, info: ModelInfo, picked: bool = False) -> str:
    """The one line that refuses a scene whose band count is not the model's.

    Args:
        scene: the scene's name.
        count: its band count (after ``--bands``).
        info: the model's description (its band names, when known, are named).
        picked: the bands were picked with ``--bands``.
    """
    names = info.band_names or []
    wanted = f"{info.in_channels} ({', '.join(names)})" if len(names) == info.in_channels else str(info.in_channels)
    n = f"{count} band{'' if count == 1 else 's'}"
    have = f"--bands picks {n} of scene {scene}" if picked else f"scene {scene} has {n}"
    return (
        f"{have} but the model expects {wanted}; pick the scene's bands the model was trained on, in its order, "
        "with --bands (band numbers of the file, e.g. --bands 3,2,1,4)"
    )


def _expected_range(info: ModelInfo) -> list[tuple[float, float]] | None:
    """Per band the pixel values a pretrained model's weights expect (``training["expected_range"]``), or None."""
    rng = (info.training or {}).get("expected_range")
    if not isinstance(rng, list) or len(rng) != info.in_channels:
        return None
    out = []
    for r in rng:
        if not (isinstance(r, list) and len(r) == 2 and all(isinstance(v, (int, float)) for v in r) and r[0] < r[1]):
            return None
        out.append((float(r[0]), float(r[1])))
    return out


def resolution_note(scene: Scene, info: ModelInfo) -> dict[str, float] | None:
    """The pixel sizes of a pretrained model's training data and of the scene, when they differ.

    TorchGeo weight sets give the resolution they were trained at (``extra.weights.resolution_m``).
    A scene whose pixels are more than twice as large or small (in a projected CRS) holds its
    objects at another scale than the weights learned; :func:`check_scene` warns in one line
    (the run goes on: the classes may still be useful).

    Returns:
        ``{"weights_m": r, "scene_m": s}`` when the sizes differ by more than 2x, else None.
    """
    r = (info.extra.get("weights") or {}).get("resolution_m")
    if not isinstance(r, (int, float)) or r <= 0 or scene.crs is None or not scene.crs.is_projected:
        return None
    try:
        factor = float(scene.crs.linear_units_factor[1])
    except Exception:  # a projected CRS without linear units GDAL can name
        return None
    px = math.sqrt(scene.res[0] * scene.res[1]) * factor
    if 0.5 <= px / r <= 2:
        return None
    return {"weights_m": float(r), "scene_m": round(px, 4)}


def _warn_resolution(scene: Scene, note: dict[str, float] | None) -> dict[str, Any]:
    """The warning line of :func:`resolution_note` (for a scene that is not refused), and its report entry."""
    if not note:
        return {}
    log.warning(
        "the weights were trained on %g m pixels and scene %s has %.3g m pixels: objects appear at another "
        "scale than they learned; resample the scene to about %g m (gdalwarp -tr) for results like theirs",
        note["weights_m"],
        scene.name,
        note["scene_m"],
        note["weights_m"],
    )
    return {"resolution": note}


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
        was judged far outside (``far_outside``); ``resolution`` when a pretrained model's
        training pixel size differs from the scene's (:func:`resolution_note`).

    Raises:
        ModelMismatchError: the scene is far outside the training data and ``force`` is off.
    """
    note = resolution_note(scene, info)
    training = info.training or {}
    quant = training.get("quantiles") or {}
    found = [quant.get(k) for k in ("0.005", "0.5", "0.995")]
    have_q = all(isinstance(q, list) and len(q) == info.in_channels for q in found)
    lo_q, med_q, hi_q = (q if isinstance(q, list) else [] for q in found)
    expected = _expected_range(info) if not have_q else None
    default_norm = all(m == 0.0 for m in info.mean) and all(s == 1.0 for s in info.std)
    if not have_q and expected is None and default_norm:
        return {
            "checked": False,
            "reason": "the model file records no training statistics",
            **_warn_resolution(scene, note),
        }
    x = scene_sample(scene) if sample is None else sample
    if x.shape[1] == 0:
        return {"checked": False, "reason": "no valid pixel in the sample", **_warn_resolution(scene, note)}
    bands: list[_BandCheck] = []
    for b in range(info.in_channels):
        v = x[b]
        ref_median: float | None
        if have_q or expected is not None:
            if expected is not None:
                (lo, hi), ref_median = expected[b], None
            else:
                lo, hi, ref_median = float(lo_q[b]), float(hi_q[b]), float(med_q[b])
            span = max(hi - lo, 1e-6 * max(abs(hi), 1.0))
            allowed = (lo - span / 2, hi + span / 2)
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
    by = "training quantiles" if have_q else "normalisation (mean, std)"
    if expected is not None:
        by = "the range the weights expect"
    result = {
        "checked": True,
        "by": by,
        "sampled_pixels": int(x.shape[1]),
        "bands": bands,
        "far_outside": far,
        "forced": bool(force and far),
    }
    if far and not force and expected is not None:
        b = worst["band"] - 1
        weights = (info.extra.get("weights") or {}).get("name") or "the model"
        lo, hi = worst["training_range"]
        note = training.get("expected_range_note")
        raise ModelMismatchError(
            f"scene {scene.name} does not fit {weights}: {worst['outside']:.0%} of the sampled pixels of "
            f"{_band_name(info, b)} lie outside {_fmt(lo)}..{_fmt(hi)}, the range the weights expect"
            f"{f' ({note})' if note else ''}; the scene's median is {_fmt(worst['scene_median'])}: rescale it to "
            "those units, pick other bands with --bands, or pass --force to segment it anyway"
        )
    if far and not force:
        b = worst["band"] - 1
        tdt = training.get("dtype")
        sdt = scene.dtypes[0]
        dtypes = f"; scene {sdt}, training {tdt}" if tdt and tdt != sdt else ""
        raise ModelMismatchError(
            f"scene {scene.name} does not look like the model's training data: {worst['outside']:.0%} of the "
            f"sampled pixels of {_band_name(info, b)} lie outside the training range "
            f"{_fmt(worst['training_range'][0])}..{_fmt(worst['training_range'][1])} (scene median "
            f"{_fmt(worst['scene_median'])}, training {_fmt(worst['training_median'] or 0.0)}{dtypes}); it may come from "
            "another sensor or be scaled differently: rescale it to the training units or use a model trained on "
            "such scenes, or pass --force to segment it anyway"
        )
    return {**result, **_warn_resolution(scene, note)}
