"""A quicklook PNG: the scene as RGB with the classes over it and a legend.

Reads a decimated view of the scene (GDAL uses overviews where the file has them) and of
the class raster, never the whole scene, so it costs the same for any scene size.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import rasterio
from rasterio.enums import Resampling

from geovae.products import CLASS_NODATA
from geovae.scene import Scene

if TYPE_CHECKING:
    from geovae.model.base import ModelInfo

__all__ = ["choose_rgb_bands", "write_quicklook"]

_COLOR_WORDS = {
    "red": ("red", r"\bred\b", r"\br\b"),
    "green": ("green", r"\bgreen\b", r"\bg\b"),
    "blue": ("blue", r"\bblue\b", r"\bb\b"),
}


def _match(name: str | None, colour: str) -> bool:
    if not name:
        return False
    s = re.sub(r"[_\-.]", " ", name.lower())
    return any(re.search(p, s) for p in _COLOR_WORDS[colour][1:])


def choose_rgb_bands(scene: Scene, band_names: list[str] | None = None) -> list[int]:
    """1-based data band numbers to show as red, green, blue (or one band as grey).

    Looks, in order, at the bands' colour interpretation, their descriptions and the model's
    band names for red/green/blue; without any, takes bands 1, 2, 3 of a 3-band scene (the
    usual RGB file) and 3, 2, 1 of a longer stack (the usual blue, green, red, NIR... order
    of Landsat and Sentinel-2 stacks); a 1- or 2-band scene is shown in grey.

    Args:
        scene: the scene.
        band_names: the model's names for the bands, when known.

    Returns:
        Three band numbers, or one.
    """
    n = scene.count
    ci = [c.lower() for c in scene.colorinterp]
    if all(c in ci for c in ("red", "green", "blue")):
        return [ci.index("red") + 1, ci.index("green") + 1, ci.index("blue") + 1]
    for names in (scene.descriptions, band_names):
        if names and len(names) == n:
            found = []
            for colour in ("red", "green", "blue"):
                hits = [i + 1 for i, nm in enumerate(names) if _match(nm, colour)]
                if hits:
                    found.append(hits[0])
            if len(found) == 3:
                return found
    if n < 3:
        return [1]
    if n == 3:
        return [1, 2, 3]
    return [3, 2, 1]


def _stretch(data: np.ndarray, valid: np.ndarray, lo: float = 2, hi: float = 98) -> np.ndarray:
    """Per-band percentile stretch to 0..1 from the valid pixels."""
    out = np.zeros(data.shape, dtype=np.float32)
    for b in range(data.shape[0]):
        vals = data[b][valid]
        if vals.size == 0:
            continue
        a, z = np.percentile(vals, [lo, hi])
        out[b] = np.clip((data[b] - a) / max(z - a, 1e-6), 0, 1)
    return out


def write_quicklook(
    scene: Scene,
    classes_path: str | Path,
    out_path: str | Path,
    info: ModelInfo,
    *,
    max_size: int = 1280,
    alpha: float = 0.45,
) -> Path:
    """Write the quicklook PNG.

    Args:
        scene: the segmented scene.
        classes_path: its class raster.
        out_path: the PNG to write (in a run, a file of its :class:`~geovae.atomic.OutputSet`).
        info: the model description (class ids, names, colours).
        max_size: longer side of the image part, in pixels (the legend adds 220 px on the
            right, so the PNG is at most 1500 px wide by default).
        alpha: opacity of the class colours over the scene.

    Returns:
        ``out_path``.
    """
    # The Agg canvas directly: no pyplot, no process-wide backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    out_path = Path(out_path)
    bands = choose_rgb_bands(scene, info.band_names)
    data, valid = scene.read_overview(max_size, bands=bands)
    h, w = valid.shape
    img = _stretch(data, valid)
    rgb = np.repeat(img, 3, axis=0) if img.shape[0] == 1 else img
    rgba = np.concatenate([np.moveaxis(rgb, 0, -1), valid[..., None].astype(np.float32)], axis=-1)
    with rasterio.open(classes_path) as ds:
        cls = ds.read(1, out_shape=(h, w), resampling=Resampling.nearest)
    lut = np.zeros((256, 4), dtype=np.float32)
    for cid, col in zip(info.class_ids, info.class_colors):
        lut[int(cid)] = (*(np.asarray(col) / 255.0), alpha)
    lut[CLASS_NODATA] = 0
    overlay = lut[cls]

    dpi = 100
    legend_w = 2.2
    fig = Figure(figsize=(w / dpi + legend_w, max(h / dpi, 2.0)), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, (w / dpi) / (w / dpi + legend_w), 1))
    ax.imshow(rgba, interpolation="nearest")
    ax.imshow(overlay, interpolation="nearest")
    ax.set_axis_off()
    present = set(np.unique(cls).tolist())
    handles = [
        Patch(facecolor=(col[0] / 255.0, col[1] / 255.0, col[2] / 255.0), edgecolor="black", label=str(name))
        for cid, name, col in zip(info.class_ids, info.class_names, info.class_colors)
        if int(cid) in present
    ]
    if handles:
        fig.legend(
            handles=handles, loc="upper right", fontsize=8, frameon=False, title=scene.stem[:30], title_fontsize=8
        )
    fig.savefig(out_path, format="png", dpi=dpi)
    return out_path
