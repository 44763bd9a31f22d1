"""TorchGeo's own command line (``torchgeo fit``) trains geovae's task on geovae's data module,
and geovae segments, exports and loads the checkpoint it writes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from conftest import config_on_fixtures

from geovae.bands import band_statistics
from geovae.cli import main
from geovae.model.io import load_model, read_model_info

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_torchgeo_fit_checkpoint_segments_exports_and_loads(nc_stack: Path, tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "torchgeo"
    if not exe.exists():
        pytest.skip(f"TorchGeo's command line is not installed next to {sys.executable}")
    # The subprocess imports this checkout's geovae, whatever the environment's install points at.
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    # The shipped config on the committed NC window, with a short run given on the command line.
    config = config_on_fixtures("nc_landsat7_torchgeo.yaml", tmp_path)
    cmd = [
        str(exe),
        "fit",
        "--config",
        str(config),
        "--data.init_args.samples_per_epoch=24",
        "--trainer.max_epochs=1",
        "--trainer.accelerator=cpu",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    (ckpt,) = tmp_path.glob("lightning_logs/version_*/checkpoints/*.ckpt")

    # No band or class counts in the YAML: they, the classes and the scene's normalisation came
    # from the data module, and the task trained on normalised input (its buffers).
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    hp = raw["hyper_parameters"]
    stats = band_statistics(nc_stack)
    assert hp["in_channels"] == 6 and hp["num_classes"] == 7 and hp["class_ids"] == [1, 2, 3, 4, 5, 6, 7]
    assert np.allclose(hp["mean"], stats.mean) and np.allclose(hp["std"], stats.std) and hp["nodata"] == 0.0
    assert np.allclose(raw["state_dict"]["band_mean"].flatten(), stats.mean)
    assert np.allclose(raw["state_dict"]["band_std"].flatten(), stats.std)
    assert raw["global_step"] == 3  # 24 samples in batches of 8

    model = load_model(ckpt, device="cpu")
    info = model.info
    assert info.kind == "geovae-vae" and info.in_channels == 6 and info.class_names[4] == "forest"
    assert info.class_colors[0] == (230, 0, 0) and info.tile_size == 64 and info.stride == 8
    assert np.allclose(info.mean, stats.mean) and np.allclose(info.std, stats.std)
    assert info.training["dtype"] == "uint8" and info.training["quantiles"] == stats.quantiles

    exported = tmp_path / "exported.safetensors"
    assert main(["export", str(ckpt), "-o", str(exported)]) == 0
    again = read_model_info(exported)
    assert again.kind == "geovae-vae" and again.mean == info.mean and again.class_ids == info.class_ids

    out_ckpt, out_file = tmp_path / "seg_ckpt", tmp_path / "seg_file"
    assert main(["-q", "segment", str(nc_stack), "--model", str(ckpt), "--out", str(out_ckpt), "--no-quicklook"]) == 0
    assert (
        main(["-q", "segment", str(nc_stack), "--model", str(exported), "--out", str(out_file), "--no-quicklook"]) == 0
    )
    (classes,) = out_ckpt.glob("*.classes.tif")
    with rasterio.open(classes) as a, rasterio.open(out_file / classes.name) as b, rasterio.open(nc_stack) as s:
        got = a.read(1)
        assert a.crs == s.crs and a.transform == s.transform and got.shape == (s.height, s.width)
        assert np.array_equal(got, b.read(1))  # the checkpoint and its export give the same map
    assert set(np.unique(got).tolist()) <= {1, 2, 3, 4, 5, 6, 7, 255}
