"""evaluate(): IoU, accuracy, ECE and AUROC on the real NC land-class map, and bad grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from torchmetrics.functional.classification import binary_auroc

import geovae.metrics.evaluation as evaluation_module
from geovae.errors import LabelsError, SceneError
from geovae.metrics import evaluate, format_report


def _as_prediction(labels: Path, out: Path, values: np.ndarray | None = None) -> Path:
    """Write a geovae-style class raster (uint8, nodata 255) on the labels' grid."""
    with rasterio.open(labels) as src:
        a = src.read(1) if values is None else values
        profile = src.profile
        valid = src.read_masks(1) > 0
    a = np.where(valid, a, 255).astype(np.uint8)
    profile.update(dtype="uint8", nodata=255, count=1)
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(a, 1)
    return out


def _float_like(labels: Path, out: Path, values: np.ndarray, **kw) -> Path:
    with rasterio.open(labels) as src:
        profile = src.profile
    profile.update(dtype="float32", nodata=float("nan"), count=values.shape[0] if values.ndim == 3 else 1, **kw)
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(values.astype(np.float32) if values.ndim == 3 else values.astype(np.float32)[None])
    return out


def test_labels_against_themselves_give_miou_one(nc_labels: Path, tmp_path: Path) -> None:
    pred = _as_prediction(nc_labels, tmp_path / "nc.classes.tif")
    d = evaluate(pred, nc_labels)
    with rasterio.open(nc_labels) as src:
        n_valid = int((src.read(1) != 0).sum())
    assert d["pixels"] == n_valid
    assert d["miou"] == 1.0 and d["overall_accuracy"] == 1.0
    assert sorted(d["per_class_iou"]) == [1, 2, 3, 4, 5, 6, 7]
    assert d["ece"] is None and d["auroc_uncertainty"] is None
    assert "mIoU" in format_report(d)


def test_perturbed_labels_give_the_independently_computed_iou(
    nc_labels: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with rasterio.open(nc_labels) as src:
        y = src.read(1)
    rng = np.random.default_rng(0)
    p = y.copy()
    # Forest (5) -> developed (1) in the top third; random noise on 10 % of pixels;
    # a class the labels never hold (9) in a patch; a nodata hole in the prediction.
    top = np.zeros_like(y, bool)
    top[: y.shape[0] // 3] = True
    p[top & (y == 5)] = 1
    noise = rng.random(y.shape) < 0.1
    p[noise] = rng.integers(1, 8, noise.sum())
    p[100:120, 100:140] = 9
    p[y == 0] = 0
    hole = np.zeros_like(y, bool)
    hole[50:80, 50:90] = True
    pred_vals = np.where(hole, 255, p)
    pred = _as_prediction(nc_labels, tmp_path / "p.classes.tif", pred_vals)
    # Stream in many small strips to exercise the accumulation across blocks.
    monkeypatch.setattr(evaluation_module, "_STRIP_PIXELS", 5000)
    d = evaluate(pred, nc_labels)

    valid = (y != 0) & ~hole
    expect = {}
    for c in range(1, 8):
        a, b = (y == c) & valid, (p == c) & valid
        expect[c] = (a & b).sum() / (a | b).sum()
    assert d["pixels"] == valid.sum()
    for c in range(1, 8):
        assert d["per_class_iou"][c] == pytest.approx(expect[c], abs=1e-12)
    assert d["miou"] == pytest.approx(np.mean(list(expect.values())), abs=1e-12)
    assert d["overall_accuracy"] == pytest.approx((p == y)[valid].mean(), abs=1e-12)
    extra = next(c for c in d["classes"] if c["id"] == 9)
    assert extra["iou"] == 0.0 and not extra["present_in_labels"] and 9 not in d["per_class_iou"]
    assert d["miou"] < 1.0
    assert "not in labels" in format_report(d)


def test_ece_and_auroc_match_direct_computations(nc_labels: Path, tmp_path: Path) -> None:
    with rasterio.open(nc_labels) as src:
        y = src.read(1)
    rng = np.random.default_rng(1)
    conf = rng.uniform(0.2, 1.0, y.shape)
    # Errors are more likely where confidence is low, so AUROC is well above 0.5.
    wrong = rng.random(y.shape) > conf
    p = np.where(wrong, (y % 7) + 1, y)
    p[y == 0] = 0
    pred = _as_prediction(nc_labels, tmp_path / "p.classes.tif", p)
    conf_nan = conf.copy()
    conf_nan[0:10] = np.nan  # invalid confidence excludes those pixels
    cpath = _float_like(nc_labels, tmp_path / "p.confidence.tif", conf_nan)
    entropy = -np.log(conf) + rng.normal(0, 0.01, y.shape).clip(0)
    upath = _float_like(nc_labels, tmp_path / "p.uncertainty.tif", np.stack([entropy, entropy * 0]))
    d = evaluate(pred, nc_labels, confidence=cpath, num_bins=10)

    valid = (y != 0) & np.isfinite(conf_nan)
    cv, ok = conf[valid], (p == y)[valid]
    bins = np.minimum((cv * 10).astype(int), 9)
    ece = sum(
        (bins == b).sum() / cv.size * abs(ok[bins == b].mean() - cv[bins == b].mean())
        for b in range(10)
        if (bins == b).any()
    )
    assert d["pixels"] == valid.sum()
    assert d["ece"] == pytest.approx(ece, abs=1e-9)
    ref = binary_auroc(torch.from_numpy(1 - cv), torch.from_numpy(~ok).long()).item()
    assert d["uncertainty_source"] == "1 - confidence"
    assert d["auroc_uncertainty"] == pytest.approx(ref, abs=2e-3)
    assert d["auroc_uncertainty"] > 0.6

    d2 = evaluate(pred, nc_labels, confidence=cpath, uncertainty=upath)
    ref2 = binary_auroc(torch.from_numpy(entropy[valid]), torch.from_numpy(~ok).long()).item()
    assert d2["uncertainty_source"].startswith("entropy")
    assert d2["auroc_uncertainty"] == pytest.approx(ref2, abs=2e-3)
    # A confidence that equals the accuracy of its bin is calibrated: ECE 0.
    perfect = np.where(p == y, 1.0, 0.0)
    ppath = _float_like(nc_labels, tmp_path / "perfect.confidence.tif", perfect)
    assert evaluate(pred, nc_labels, confidence=ppath)["ece"] == pytest.approx(0.0, abs=1e-12)


def test_grid_mismatch_and_bad_files(nc_labels: Path, tmp_path: Path) -> None:
    pred = _as_prediction(nc_labels, tmp_path / "p.classes.tif")
    with rasterio.open(nc_labels) as src:
        profile, a = src.profile, src.read(1)
    shifted = tmp_path / "shifted.tif"
    t = profile["transform"]
    with rasterio.open(shifted, "w", **{**profile, "transform": t @ Affine.translation(1, 0)}) as dst:
        dst.write(a, 1)
    with pytest.raises(LabelsError, match=r"not on the prediction's grid .*transform") as ei:
        evaluate(pred, shifted)
    assert "\n" not in str(ei.value)
    other_crs = tmp_path / "crs.tif"
    with rasterio.open(other_crs, "w", **{**profile, "crs": "EPSG:32617"}) as dst:
        dst.write(a, 1)
    with pytest.raises(LabelsError, match="CRS"):
        evaluate(pred, other_crs)
    cropped = tmp_path / "crop.tif"
    with rasterio.open(cropped, "w", **{**profile, "height": 100}) as dst:
        dst.write(a[:100], 1)
    with pytest.raises(LabelsError, match="shape"):
        evaluate(pred, cropped)
    with pytest.raises(LabelsError, match="confidence"):
        evaluate(pred, nc_labels, confidence=cropped)
    floaty = _float_like(nc_labels, tmp_path / "float.tif", a.astype(float))
    with pytest.raises(LabelsError, match="integer class raster"):
        evaluate(pred, floaty)
    with pytest.raises(SceneError, match="does not exist"):
        evaluate(tmp_path / "missing.tif", nc_labels)
    with pytest.raises(SceneError, match="does not exist"):
        evaluate(pred, tmp_path / "missing.tif")
    text = tmp_path / "labels.txt"
    text.write_text("not a raster")
    with pytest.raises(SceneError, match="not a raster GDAL can read"):
        evaluate(pred, text)
    empty = _as_prediction(nc_labels, tmp_path / "empty.classes.tif", np.full_like(a, 255))
    with pytest.raises(LabelsError, match="no pixel is valid"):
        evaluate(empty, nc_labels)


def test_an_unknown_object_class_is_named_not_scored_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--object-classes parcelz` filtered every polygon out and reported F1 0 with exit 0;
    a class the prediction does not have is now one line naming it and the classes there."""
    import json

    from geovae.cli import main
    from geovae.products import write_class_table

    a = np.full((64, 64), 2, np.uint8)
    a[8:24, 8:24] = 1
    a[36:56, 30:60] = 1
    pred = tmp_path / "p.classes.tif"
    with rasterio.open(
        pred,
        "w",
        driver="GTiff",
        width=64,
        height=64,
        count=1,
        dtype="uint8",
        crs="EPSG:32617",
        transform=Affine(10, 0, 500000, 0, -10, 4000000),
    ) as d:
        d.write(a, 1)
        write_class_table(d, [1, 2], ["parcel", "background"], [(200, 0, 0), (0, 0, 0)])
    objects = tmp_path / "p.objects.gpkg"
    assert main(["vectorize", str(pred), "-o", str(objects), "--objects", "parcel"]) == 0
    capsys.readouterr()
    base = ["evaluate", str(pred), "--objects", str(objects), "--json", "--object-classes"]
    assert main([*base, "parcel"]) == 0
    assert json.loads(capsys.readouterr().out)["objects"]["f1"] == 1.0
    code = main([*base, "parcel,parcelz"])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert "--object-classes parcelz: no such class" in err and "1:parcel, 2:background" in err
    assert main([*base, "1"]) == 0  # an id works as well as a name
