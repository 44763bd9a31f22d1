"""A trained model file records what the model was trained on (ModelInfo.training)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
import torch

from geovae.bands import band_statistics
from geovae.model.io import load_model
from geovae.training import train_model

NC_CLASSES = "1:developed,2:agriculture,3:herbaceous,4:shrubland,5:forest,6:water,7:sediment"


def test_model_file_records_what_the_model_was_trained_on(nc_stack: Path, nc_labels: Path, tmp_path: Path) -> None:
    """ModelInfo.training: the image's dtype and band quantiles, and the trained model's own
    reconstruction error on training pixels, as SegmentationModel.predict measures it."""
    out = tmp_path / "facts.safetensors"
    res = train_model(
        nc_stack,
        nc_labels,
        out,
        classes=NC_CLASSES,
        epochs=1,
        tile=64,
        batch_size=8,
        samples_per_epoch=16,
        base_channels=8,
        depth=3,
        latent_channels=4,
        val_fraction=0.5,
        device="cpu",
        progress=False,
        seed=0,
    )
    model = load_model(out, "cpu")
    t = model.info.training
    assert t == res.info.training
    assert t["dtype"] == "uint8" and t["quantiles"] == band_statistics(nc_stack).quantiles
    q = t["reconstruction_error_quantiles"]
    assert list(q) == ["0.5", "0.9", "0.99", "0.995", "0.999"]
    assert 0 < q["0.5"] < q["0.9"] < q["0.99"] <= q["0.995"] <= q["0.999"]
    # Independently: every whole 64-px tile of the west (training) half, read with rasterio,
    # per-band nodata filled with the mean as prediction fills it, valid pixels only.
    with rasterio.open(nc_stack) as s:
        img = s.read().astype(np.float32)
    width = img.shape[2] - round(img.shape[2] * 0.5)
    mean = np.asarray(model.info.mean, np.float32)[:, None, None]
    errors = []
    for r in range(0, img.shape[1] - 63, 64):
        for c in range(0, width - 63, 64):
            x = img[:, r : r + 64, c : c + 64]
            valid = (x != 0).any(0)
            x = np.where((x == 0) | ~valid, mean, x)
            e = model.predict(torch.from_numpy(x)[None], reconstruction=True)["reconstruction_error"][0].numpy()
            errors.append(e[valid])
    ref = np.quantile(np.concatenate(errors).astype(np.float64), [0.5, 0.9, 0.99, 0.995, 0.999])
    assert np.allclose(list(q.values()), ref, rtol=1e-5)
