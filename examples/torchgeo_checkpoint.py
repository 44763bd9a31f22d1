"""Run a TorchGeo checkpoint through geovae: streaming, blending, COGs, polygons.

    python examples/torchgeo_checkpoint.py [--checkpoint task.ckpt --scene scene.tif --classes "1:a,2:b"]
        [--out out/]

A TorchGeo ``SemanticSegmentation`` checkpoint carries no band normalisation or class
names; ``export_model`` records them (statistics from a raster, names from ``--classes``)
in a self-describing geovae file, which ``segment_scene`` then runs like any geovae model.
Without ``--checkpoint`` a U-Net task is trained briefly on the NC scene to make one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common


def make_checkpoint(scene: Path, labels: Path, path: Path, steps: int, num_classes: int = 7) -> Path:
    """Train TorchGeo's U-Net task for a few steps on patches of the scene; save the checkpoint.

    Channel k is label id k + 1 (ids 1..num_classes; 0 is unlabelled, counted as class 1).
    """
    import lightning as L
    import numpy as np
    import rasterio
    import torch
    from torchgeo.tasks import SemanticSegmentation

    torch.manual_seed(0)
    with rasterio.open(scene) as s, rasterio.open(labels) as lab:
        x, y = s.read().astype(np.float32), lab.read(1).astype(np.int64)
    x = (x - x.mean(axis=(1, 2), keepdims=True)) / x.std(axis=(1, 2), keepdims=True)
    samples = [
        {
            "image": torch.from_numpy(x[:, r : r + 64, c : c + 64].copy()),
            "mask": torch.from_numpy(np.clip(y[r : r + 64, c : c + 64] - 1, 0, num_classes - 1)),
        }
        for r in range(0, x.shape[1] - 64, 96)
        for c in range(0, x.shape[2] - 64, 96)
    ]
    dl = torch.utils.data.DataLoader(samples[: max(2, steps * 4)], batch_size=4, shuffle=True)
    task = SemanticSegmentation(
        model="unet", backbone="resnet18", weights=None, in_channels=x.shape[0], num_classes=num_classes
    )
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=steps,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=path.parent,
    )
    trainer.fit(task, dl, dl)
    trainer.save_checkpoint(path)
    return path


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="a TorchGeo SemanticSegmentation checkpoint (.ckpt)")
    ap.add_argument("--scene")
    ap.add_argument("--classes", default=_common.NC_CLASSES, help="one ID:NAME per output channel, in channel order")
    ap.add_argument("--data", help="the real-data folder (default $GEOVAE_DATA or ../shared/data)")
    ap.add_argument("--out", default="geovae-example-torchgeo")
    a = ap.parse_args(argv)
    import geovae
    from geovae.model.io import export_model

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    scene, labels = _common.nc_scene_and_labels(a.data, out / "data")
    scene = Path(a.scene) if a.scene else scene
    ckpt = (
        Path(a.checkpoint)
        if a.checkpoint
        else make_checkpoint(scene, labels, out / "task.ckpt", steps=2 if _common.FAST else 200)
    )
    # The checkpoint's task was fed per-scene standardised pixels: the same statistics here.
    model_file = export_model(ckpt, out / "torchgeo.safetensors", stats_from=scene, classes=a.classes)
    res = geovae.segment_scene(scene, model_file, out, formats=("gpkg",), force=True, **_common.segment_settings())
    print({k: str(v) for k, v in res.outputs.items()})
    print("classes:", [(c["name"], c["pixels"]) for c in res.report["classes"]])
    return {"checkpoint": ckpt, "model": model_file, "result": res}


if __name__ == "__main__":
    main()
