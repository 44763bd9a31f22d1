"""`geovae generate`: images decoded from the latent prior, in the model's band units."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from geovae.cli import main
from geovae.errors import LabelsError, OptionError
from geovae.generate import generate_images
from geovae.model import ModelInfo, VAESegmenter
from geovae.model.io import save_model

# Tiles generated without a class map are not georeferenced, and say so when read.
pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")


def _model_file(tmp_path: Path, *, dtype: str | None = "uint8", recon_condition: str = "class") -> Path:
    torch.manual_seed(0)
    m = VAESegmenter(
        6, 3, base_channels=8, depth=2, latent_channels=4, head="lowrank", recon_condition=recon_condition
    ).eval()
    # A decoder bias far from zero: de-normalised values then reach beyond uint8's range,
    # which the writer must clip, not wrap.
    with torch.no_grad():
        out = m.recon_decoder.out if recon_condition == "class" else m.recon_decoder[-1]
        out.bias.copy_(torch.tensor([-10.0, -1.0, 0.0, 1.0, 10.0, 0.5]))
    info = ModelInfo(
        in_channels=6,
        num_classes=3,
        class_ids=[1, 5, 6],
        class_names=["developed", "forest", "water"],
        mean=[80.0] * 6,
        std=[30.0] * 6,
        band_names=[f"B{i}" for i in range(1, 7)],
        tile_size=32,
        training={"dtype": dtype} if dtype else {},
    )
    return save_model(tmp_path / "m.safetensors", m, info)


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_writes_n_images_in_the_training_dtype(tmp_path: Path) -> None:
    model = _model_file(tmp_path)
    res = generate_images(model, tmp_path / "samples.tif", n=3, size=32, seed=1)
    assert (res.count, res.bands, res.height, res.width, res.dtype) == (3, 6, 32, 32, "uint8")
    assert not res.georeferenced and not list(tmp_path.glob("*.part"))
    with rasterio.open(res.path) as ds:
        assert ds.count == 18 and ds.dtypes[0] == "uint8" and (ds.width, ds.height) == (32, 32)
        assert ds.descriptions[0] == "sample 1: B1" and ds.descriptions[17] == "sample 3: B6"
        assert ds.tags()["SAMPLES"] == "3"
        a = ds.read()
    # Band units: a decoder bias of -10 / +10 normalised units is 80 -+ 300, clipped to 0..255.
    assert (a[0] == 0).all() and (a[4] == 255).all()
    assert 0 < a[2].mean() < 255
    # Different latent samples give different images; the same seed, the same images.
    assert not np.array_equal(a[:6], a[6:12])
    again = generate_images(model, tmp_path / "again.tif", n=3, size=32, seed=1)
    with rasterio.open(again.path) as ds:
        assert np.array_equal(ds.read(), a)


def test_generate_follows_a_class_map_and_takes_its_grid(tmp_path: Path) -> None:
    model = _model_file(tmp_path, dtype=None)
    cmap = tmp_path / "classes.tif"
    ids = np.zeros((20, 36), np.uint8)  # not a multiple of the stride 4: padded, then cropped
    ids[:, :12], ids[:, 12:24], ids[:, 24:] = 1, 5, 6
    ids[0, 0] = 9  # not one of the model's classes: decoded as the class average
    transform = rasterio.transform.from_origin(500000.0, 4000000.0, 30.0, 30.0)
    with rasterio.open(
        cmap,
        "w",
        driver="GTiff",
        width=36,
        height=20,
        count=1,
        dtype="uint8",
        crs="EPSG:32617",
        transform=transform,
        nodata=0,
    ) as d:
        d.write(ids, 1)
    res = generate_images(model, tmp_path / "s.tif", n=2, classes_from=cmap)
    assert res.georeferenced and (res.height, res.width) == (20, 36) and res.dtype == "float32"
    with rasterio.open(res.path) as ds:
        assert ds.crs.to_epsg() == 32617 and ds.transform == transform and ds.count == 12
        a = ds.read(list(range(1, 7)))
    # The class layout shows in the image: each class's columns decode differently.
    means = [a[:, 4:, cols].mean() for cols in (slice(2, 10), slice(14, 22), slice(26, 34))]
    assert len({round(float(v), 1) for v in means}) == 3


def test_generate_from_a_z_only_decoder(tmp_path: Path) -> None:
    res = generate_images(_model_file(tmp_path, recon_condition="none"), tmp_path / "s.tif", n=1, size=16)
    with rasterio.open(res.path) as ds:
        assert ds.count == 6 and np.isfinite(ds.read().astype(float)).all()


def test_generate_cli_and_its_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _model_file(tmp_path)
    code, out, err = _run(
        capsys,
        "generate",
        "--model",
        str(model),
        "--out",
        str(tmp_path / "g.tif"),
        "--n",
        "2",
        "--size",
        "16",
        "--seed",
        "3",
    )
    assert code == 0, err
    assert "2 images of 16x16 px, 6 bands each (uint8, not georeferenced)" in out
    with rasterio.open(tmp_path / "g.tif") as ds:
        assert ds.count == 12
    for args, fragment, code_expected in (
        (["--size", "30"], "multiple of the model stride 4", 2),
        (["--classes-from", str(tmp_path / "nope.tif")], "nope.tif does not exist", 1),
        (["--out", str(tmp_path / "no" / "g.tif")], "does not exist", 1),
    ):
        base = ["generate", "--model", str(model), "--out", str(tmp_path / "h.tif")]
        code, _, err = _run(capsys, *(base + args))
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        assert code == code_expected and len(lines) == 1 and lines[0].startswith("geovae: error: "), err
        assert fragment in lines[0], lines[0]
    code, _, err = _run(
        capsys, "generate", "--model", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "h.tif")
    )
    assert code == 1 and len(err.strip().splitlines()) == 1 and "model file not found" in err
    assert not (tmp_path / "h.tif").exists()


def test_generate_refuses_a_class_map_of_other_classes_or_values(tmp_path: Path) -> None:
    model = _model_file(tmp_path)
    for name, data, dtype, exc, fragment in (
        ("other.tif", np.full((8, 8), 3, np.uint8), "uint8", LabelsError, "none of the model's class ids"),
        ("float.tif", np.ones((8, 8), np.float32), "float32", LabelsError, "integer class raster"),
    ):
        p = tmp_path / name
        with rasterio.open(p, "w", driver="GTiff", width=8, height=8, count=1, dtype=dtype) as d:
            d.write(data, 1)
        with pytest.raises(exc, match=fragment):
            generate_images(model, tmp_path / "x.tif", classes_from=p)
    with pytest.raises(OptionError, match="at least one"):
        generate_images(model, tmp_path / "x.tif", n=0)


def test_generate_never_overwrites_its_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`-o` naming the model file or the class map is refused before any work, with one line,
    and the input is left byte for byte; so is a hard link to the model under another name."""
    import os

    model = _model_file(tmp_path)
    cmap = tmp_path / "c.tif"
    with rasterio.open(cmap, "w", driver="GTiff", width=8, height=8, count=1, dtype="uint8") as d:
        d.write(np.ones((8, 8), np.uint8), 1)
    link = tmp_path / "link.tif"
    os.link(model, link)
    before = {p: p.read_bytes() for p in (model, cmap)}
    for out, extra in ((model, []), (cmap, ["--classes-from", str(cmap)]), (link, [])):
        code, _, err = _run(capsys, "generate", "--model", str(model), "-o", str(out), "--n", "1", *extra)
        lines = err.strip().splitlines()
        assert code == 1 and len(lines) == 1, err
        assert "would destroy the input" in lines[0] and "choose another --out file" in lines[0], err
    assert {p: p.read_bytes() for p in (model, cmap)} == before
    assert not list(tmp_path.glob(".*.part"))


def test_generate_writes_only_what_its_name_says(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An extension generate cannot write (a PNG holds 4 bands at most) is refused, not
    written as a GeoTIFF under a PNG name; more images than a GeoTIFF has bands are refused
    with the largest --n that fits, before anything is written."""
    model = _model_file(tmp_path)
    for name in ("x.png", "x.jpg", "x"):
        code, _, err = _run(capsys, "generate", "--model", str(model), "-o", str(tmp_path / name), "--n", "1")
        assert code == 2 and err.count("\n") == 1 and "generate writes a GeoTIFF" in err, err
        assert not (tmp_path / name).exists()
    code, _, err = _run(capsys, "generate", "--model", str(model), "-o", str(tmp_path / "x.TIFF"), "--n", "1")
    assert code == 0, err
    code, _, err = _run(capsys, "generate", "--model", str(model), "-o", str(tmp_path / "big.tif"), "--n", "100000000")
    assert code == 2 and err.count("\n") == 1 and "give --n 10922 or less" in err, err
    assert not (tmp_path / "big.tif").exists() and not list(tmp_path.glob(".*.part"))
