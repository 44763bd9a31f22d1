"""TorchGeo's pretrained weight sets as geovae models (``torchgeo:NAME``), offline.

No test downloads. Each writes the weights of the weight set's real architecture, randomly
initialised (TorchGeo's own builder without weights, ``torch.save`` of its state dict), at
the path torch.hub reads them from, ``$TORCH_HOME/hub/checkpoints/<file name of the URL>``,
in a temporary ``TORCH_HOME``. ``torch.hub.load_state_dict_from_url`` checks the hash in
that file name (``unet-resnet18-829a85c5.pth``) only when it downloads, so a file already in
the cache goes through TorchGeo's whole loading path unchanged: its builder
(``torchgeo.models.unet(weights=...)``), ``load_state_dict_from_url`` with ``check_hash=True``
and ``weights_only=True``, and the strict ``load_state_dict``.
"""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import torch
from conftest import one_line, run
from rasterio.windows import Window

from geovae.errors import DownloadError, ModelFileError, OptionError, SceneError
from geovae.model.pretrained import catalogue, model_info, weight_set

NAIP = "Unet_Weights.NAIP_RGBN_RESNET18_CHESAPEAKERSC"
FTW3 = "Unet_Weights.SENTINEL2_3CLASS_FTW"
ENCODER = "ResNet18_Weights.LANDSAT_ETM_SR_MOCO"


def write_weights(name: str, seed: int) -> Path:
    """Random weights of the weight set's architecture where torch.hub finds them.

    Built by TorchGeo's own builder without weights; BatchNorm running statistics are
    randomised too, so that geovae's folded BatchNorm differs in arithmetic from TorchGeo's
    network and the comparison below means something.
    """
    import torchgeo.models as tgm

    ws = weight_set(name)
    arch = ws.segmentation_arch
    assert arch is not None
    torch.manual_seed(seed)
    net = tgm.unet(weights=None, classes=arch["num_classes"], encoder_name=arch["backbone"], in_channels=ws.in_channels)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    ws.file.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), ws.file)
    return ws.file


@pytest.fixture(scope="module")
def torch_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A torch.hub cache of its own, holding the NAIP and 3-class FTW weights."""
    home = tmp_path_factory.mktemp("torch_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(home))
        write_weights(NAIP, 0)
        write_weights(FTW3, 1)
        yield home


# ----------------------------------------------------------------------- the catalogue
def test_every_unet_weight_set_is_a_segmentation_model() -> None:
    from torchgeo.models import Unet_Weights

    seg = {w.name for w in catalogue("segmentation")}
    assert seg == {f"Unet_Weights.{m.name}" for m in Unet_Weights}


def test_encoders_are_listed_with_their_bands_and_normalisation() -> None:
    from torchgeo.models import ResNet18_Weights

    ws = weight_set(ENCODER)
    assert ws.kind == "encoder"
    assert ws.member is ResNet18_Weights.LANDSAT_ETM_SR_MOCO  # what TorchGeo's builder takes
    assert ws.builder == "resnet18"
    assert ws.in_channels == 6
    assert ws.bands == ("SR_B1", "SR_B2", "SR_B3", "SR_B4", "SR_B5", "SR_B7")
    assert ws.normalisation == "x / 255"
    assert ws.expected_range == ((0.0, 255.0),) * 6


def test_weight_sets_without_a_band_layout_are_not_listed() -> None:
    names = {w.name for w in catalogue()}
    assert "Aurora_Weights.HRES_T0_AURORA" not in names  # a weather model: no in_chans
    assert "SatCLIP_Weights.SATCLIP_VIT16_L40" not in names  # a location encoder


def test_classes_from_meta_and_from_the_ftw_dataset() -> None:
    assert weight_set(NAIP).class_names == ("background", "road")
    assert weight_set(FTW3).class_names == ("background", "field", "boundary")
    assert weight_set("Unet_Weights.SENTINEL2_2CLASS_FTW").class_names == ("background", "field")


def test_normalisation_read_from_the_transforms() -> None:
    naip, ftw = weight_set(NAIP), weight_set(FTW3)
    assert (naip.mean, naip.std) == ((0.0,) * 4, (255.0,) * 4)
    assert (ftw.mean, ftw.std) == ((0.0,) * 8, (3000.0,) * 8)
    tcd = weight_set("Unet_Weights.OAM_RGB_RESNET50_TCD")  # a resize only: pixels go in as they are
    assert (tcd.mean, tcd.std, tcd.expected_range) == ((0.0,) * 3, (1.0,) * 3, None)


def test_geovae_normalisation_equals_the_transforms_on_real_pixels(nc_stack: Path) -> None:
    """Every weight set whose transforms keep a tile's shape: TorchGeo's transforms and
    geovae's ``(x - mean) / std`` agree on real pixels (the NC window's bands, repeated to
    the weight set's band count and tile size, scaled by 7 to span 16-bit values too)."""
    from torch import nn

    from geovae.model.base import ModelInfo, SegmentationModel

    with rasterio.open(nc_stack) as src:
        scene = src.read().astype(np.float32)
    checked = []
    for ws in catalogue():
        if ws.mean is None or ws.std is None:
            continue
        size = ws.tile_size or 256
        bands = np.resize(np.arange(scene.shape[0]), ws.in_channels)
        reps = (1, -(-size // scene.shape[1]), -(-size // scene.shape[2]))
        pix = np.tile(scene[bands], reps)[:, :size, :size]
        x = torch.from_numpy(np.ascontiguousarray(pix))[None] * 7.0  # uint8 -> a 0..1785 range
        ref = ws.member.transforms(x.clone())
        if ref.shape != x.shape:  # a crop or resize to another size: not a per-tile map
            continue
        info = ModelInfo(in_channels=ws.in_channels, num_classes=1, mean=list(ws.mean), std=list(ws.std))
        ours = SegmentationModel(nn.Identity(), info, device="cpu").normalise(x)
        torch.testing.assert_close(ours.contiguous(), ref.float(), rtol=2e-6, atol=2e-6, msg=ws.name)
        checked.append(ws.name)
    assert {NAIP, FTW3, "Unet_Weights.OAM_RGB_RESNET50_TCD"} <= set(checked)
    assert len(checked) >= 20


def test_unknown_and_encoder_references_are_refused_in_one_line() -> None:
    from geovae.model.io import load_model

    with pytest.raises(ModelFileError, match=re.escape(f"did you mean torchgeo:{NAIP}?")):
        load_model("torchgeo:Unet_Weights.NAIP_RGBN_RESNET18_CHESAPEAKERSCC")
    with pytest.raises(ModelFileError, match="an encoder"):  # refused before any download
        load_model(f"torchgeo:{ENCODER}")


# ------------------------------------------------------------------ segment = TorchGeo
def test_segment_equals_torchgeo_forward(
    torch_home: Path, nc_stack: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """geovae segment with the NAIP weights (R, G, B, NIR picked with --bands) gives the
    classes and probabilities of TorchGeo's own network and transforms on the same pixels.

    One 256-px tile covers the 256 x 144 window; geovae pads it with the model's mean (0 for
    x / 255), the pixel value of the window's nodata too, so TorchGeo gets the window padded
    with zeros: the same input."""
    from torchgeo.models import Unet_Weights, unet

    out = tmp_path / "out"
    code, _, err = run(
        capsys, "segment", str(nc_stack), "-m", f"torchgeo:{NAIP}", "-o", str(out), "--bands", "3,2,1,4",
        "--tile", "256", "--overlap", "0", "--device", "cpu", "-q",
    )  # fmt: skip
    assert code == 0, err
    stem = nc_stack.stem
    with rasterio.open(out / f"{stem}.classes.tif") as ds:
        classes, valid = ds.read(1), ds.read_masks(1) > 0
    with rasterio.open(out / f"{stem}.confidence.tif") as ds:
        confidence = ds.read(1)
    assert valid.mean() > 0.5

    weights = Unet_Weights.NAIP_RGBN_RESNET18_CHESAPEAKERSC
    net = unet(weights=weights).eval()  # loads the same cached file
    with rasterio.open(nc_stack) as ds:
        pixels = ds.read([3, 2, 1, 4]).astype(np.float32)
    h, w = pixels.shape[1:]
    x = torch.zeros((1, 4, 256, 256))
    x[0, :, :h, :w] = torch.from_numpy(pixels)
    with torch.no_grad():
        probs = net(weights.transforms(x)).softmax(1)[0, :, :h, :w].numpy()
    expected = probs.argmax(0)
    assert set(np.unique(expected[valid])) == {0, 1}, "both classes must occur for the comparison to mean something"
    decided = valid & (np.abs(probs[1] - probs[0]) > 1e-4)
    np.testing.assert_array_equal(classes[decided], expected[decided])
    np.testing.assert_allclose(confidence[valid], probs.max(0)[valid], atol=1e-5)

    report = json.loads((out / f"{stem}.json").read_text())
    assert report["model"]["weights"]["name"] == NAIP
    assert report["model"]["weights"]["license"] == "MIT"
    assert report["model"]["class_names"] == ["background", "road"]
    assert report["trust"]["scene"]["by"] == "the range the weights expect"
    assert report["trust"]["scene"]["resolution"] == {"weights_m": 1.0, "scene_m": 28.5}
    stac = json.loads((out / f"{stem}.stac.json").read_text())
    links = [ln for ln in stac["links"] if ln["rel"] == "ml-model"]
    assert links[0]["href"] == weight_set(NAIP).url


def test_ftw_three_classes_go_into_objects_field(
    torch_home: Path, nc_stack: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The 3-class FTW U-Net (two dates of B4, B3, B2, B8: here one date twice) splits fields
    along its boundary class."""
    out = tmp_path / "out"
    code, _, err = run(
        capsys, "segment", str(nc_stack), "-m", f"torchgeo:{FTW3}", "-o", str(out), "--bands", "3,2,1,4,3,2,1,4",
        "--objects", "field", "--formats", "gpkg", "--device", "cpu", "-q",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads((out / f"{nc_stack.stem}.json").read_text())
    assert report["objects"]["classes"] == [1]
    assert report["objects"]["boundary_class"] == 2
    assert (out / f"{nc_stack.stem}.objects.gpkg").is_file()


# ------------------------------------------------------------------ scenes that do not fit
def test_band_count_refused_naming_the_bands(
    torch_home: Path, nc_stack: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "segment", str(nc_stack), "-m", f"torchgeo:{NAIP}", "-o", str(tmp_path / "o"))
    assert code == 1
    line = one_line(err)
    assert "has 6 bands but the model expects 4 (R, G, B, N)" in line
    assert "--bands" in line
    assert not (tmp_path / "o").exists()


def test_value_range_refused_saying_what_the_weights_expect(
    torch_home: Path, parana: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Landsat-8 window in 16-bit digital numbers is not the 8-bit pixels the NAIP weights read."""
    code, _, err = run(
        capsys, "segment", str(parana), "-m", f"torchgeo:{NAIP}", "-o", str(tmp_path / "o"), "--bands", "3,2,1,1",
    )  # fmt: skip
    assert code == 1
    line = one_line(err)
    assert f"does not fit {NAIP}" in line
    assert "outside 0..255, the range the weights expect (its transforms compute x / 255)" in line
    assert "--force" in line
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------ --bands
def test_bands_reads_only_the_chosen_bands_in_order(nc_stack: Path) -> None:
    from geovae.scene import open_scene

    sc = open_scene(nc_stack, bands=(4, 3, 2, 4))
    assert (sc.count, sc.bands) == (4, [4, 3, 2, 4])
    data, _ = sc.read(Window(0, 0, 64, 64))
    with rasterio.open(nc_stack) as ds:
        np.testing.assert_array_equal(data, ds.read([4, 3, 2, 4], window=Window(0, 0, 64, 64)).astype(np.float32))
    assert sc.descriptions == ["B4_nir", "B3_red", "B2_green", "B4_nir"]


def test_bands_refused_in_one_line(nc_stack: Path, rgba_byte: Path) -> None:
    from geovae.scene import open_scene
    from geovae.segment import SegmentOptions

    with pytest.raises(SceneError, match="has no data band 7; its data bands are 1, 2, 3, 4, 5, 6"):
        open_scene(nc_stack, bands=(1, 7))
    with pytest.raises(SceneError, match=r"band 4 of scene .* is its alpha band"):
        open_scene(rgba_byte, bands=(1, 2, 4))
    with pytest.raises(OptionError, match="give band numbers of the file"):
        SegmentOptions(bands="4,three")
    assert "bands" not in SegmentOptions().fingerprint()  # markers from before --bands still match


# ---------------------------------------------------------------------------- downloads
def _refused_urlopen(url: Any, *args: Any, **kwargs: Any) -> Any:
    """A real request through a proxy on a closed local port: what a machine without network gets."""
    proxy = urllib.request.ProxyHandler({"http": "http://127.0.0.1:9", "https": "http://127.0.0.1:9"})
    return urllib.request.build_opener(proxy).open(url, timeout=5)


def test_offline_download_fails_in_one_line_and_writes_nothing(
    nc_stack: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch.hub

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_home"))
    monkeypatch.setattr(torch.hub, "urlopen", _refused_urlopen)
    target = weight_set(NAIP).file
    code, out, err = run(
        capsys, "segment", str(nc_stack), "-m", f"torchgeo:{NAIP}", "-o", str(tmp_path / "o"), "--bands", "3,2,1,4"
    )
    assert code == 1
    line = one_line(err)
    assert weight_set(NAIP).url in line
    assert f"put it at {target}" in line
    assert not (tmp_path / "o").exists()
    assert not target.exists()
    assert list(target.parent.iterdir()) == []  # no partial download left behind
    assert out == ""  # torch.hub's "Downloading" line does not reach the command's output
    code, _, err = run(capsys, "export", f"torchgeo:{NAIP}", "--out", str(tmp_path / "m.safetensors"))
    assert code == 1 and "put it at" in err
    assert not (tmp_path / "m.safetensors").exists()


def test_download_error_is_a_connection_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.hub

    from geovae.model.pretrained import load_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "urlopen", _refused_urlopen)
    with pytest.raises(ConnectionError) as info:
        load_weights(f"torchgeo:{NAIP}")
    assert isinstance(info.value, DownloadError)


# ------------------------------------------------------------------------------- export
def test_export_round_trip(
    torch_home: Path, nc_stack: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from geovae.model.io import load_model, read_model_info

    path = tmp_path / "naip.safetensors"
    code, out, err = run(capsys, "export", f"torchgeo:{NAIP}", "--out", str(path))
    assert code == 0, err
    assert out.strip() == str(path)
    info = read_model_info(path)
    assert info.extra["weights"]["name"] == NAIP
    assert info.extra["weights"]["license"] == "MIT"
    assert (info.mean, info.std) == ([0.0] * 4, [255.0] * 4)
    assert info.band_names == ["R", "G", "B", "N"]
    assert info.class_names == ["background", "road"]
    assert info.training["expected_range"] == [[0.0, 255.0]] * 4
    assert info.halo is not None
    with rasterio.open(nc_stack) as ds:
        x = ds.read([3, 2, 1, 4], window=Window(0, 0, 256, 128)).astype(np.float32)[None]
    exported = load_model(path, device="cpu").predict(x)["probs"]
    direct = load_model(f"torchgeo:{NAIP}", device="cpu").predict(x)["probs"]
    np.testing.assert_allclose(exported, direct, atol=1e-6)


# ------------------------------------------------------------------------------- models
def test_models_json(torch_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "models", "--json")
    assert code == 0, err
    rows = {r["name"]: r for r in json.loads(out)}
    naip = rows[NAIP]
    assert naip["kind"] == "segmentation"
    assert naip["cached"] is True
    assert naip["size_bytes"] == weight_set(NAIP).file.stat().st_size
    assert naip["bands"] == ["R", "G", "B", "N"]
    assert naip["classes"] == ["background", "road"]
    assert naip["resolution_m"] == 1.0
    assert naip["license"] == "MIT"
    tcd = rows["Unet_Weights.OAM_RGB_RESNET50_TCD"]
    assert (tcd["cached"], tcd["size_bytes"], tcd["license"]) == (False, None, "CC-BY-NC-4.0")
    enc = rows[ENCODER]
    assert enc["use"] == "encoder (for train)"
    assert enc["in_channels"] == 6
    code, out, _ = run(capsys, "models", "--kind", "segmentation")
    assert code == 0
    assert NAIP in out and ENCODER not in out


def test_batch_workers_load_a_weight_set_by_reference(torch_home: Path) -> None:
    """What a batch worker does with ``-m torchgeo:NAME``: fingerprint the cached file, load the reference."""
    from geovae.batch.cluster import ModelCache
    from geovae.batch.manifest import model_fingerprint

    fp = model_fingerprint(f"torchgeo:{NAIP}")
    assert fp["path"] == f"torchgeo:{NAIP}"
    assert fp["size"] == weight_set(NAIP).file.stat().st_size
    cache = ModelCache()
    model = cache.get(f"torchgeo:{NAIP}", "cpu")
    assert model.info.extra["weights"]["name"] == NAIP
    assert cache.get(f"torchgeo:{NAIP}", "cpu") is model
    assert cache.loads == 1


def test_model_info_records_the_weight_set() -> None:
    info = model_info(weight_set(FTW3))
    assert info.kind == "torchgeo"
    assert info.arch == {"model": "unet", "backbone": "efficientnet-b3", "in_channels": 8, "num_classes": 3}
    assert info.stride == 32
    assert info.band_names == ["B4", "B3", "B2", "B8", "B4", "B3", "B2", "B8"]
    assert info.extra["weights"]["license"] == "CC-BY-4.0"
