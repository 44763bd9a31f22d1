"""ONNX export and the onnxruntime backend: the same answers as the torch backend on the NC
scene, self-describing files, no code run from a file, one-line errors.

Every comparison runs the same model file through both backends on the committed NC window:
the default VAE (the architecture ``geovae train`` builds, random weights with BatchNorm
statistics taken from the scene) with latent samples and the reconstruction error, a
TorchGeo checkpoint and a TorchGeo weight set (written offline into a temporary torch.hub
cache, as tests/test_pretrained.py does).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="onnxruntime not installed: pip install geovae[onnx]")

import onnx
import rasterio
import torch
from conftest import batchnorm_statistics, one_line, run
from rasterio.windows import Window

from geovae.cli import main
from geovae.errors import ModelFileError, OptionError
from geovae.model.base import ModelInfo, SegmentationModel
from geovae.model.io import load_model, read_model_info, save_model
from geovae.model.onnx import OnnxModel, load_onnx, read_onnx_info
from geovae.scene import open_scene
from geovae.segment import segment_scene

#: What "the same answers" means (issue 28): classes on this share of the valid pixels,
#: probabilities (and the uncertainty and reconstruction rasters) within this.
AGREEMENT = 0.999
ATOL = 1e-4
RANDOM_OPS = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}


def _scene_stats(path: Path) -> tuple[torch.Tensor, list[float], list[float]]:
    s = open_scene(path)
    d, v = s.read(Window(0, 0, s.width, s.height))
    s.close()
    mean, std = d[:, v].mean(1), d[:, v].std(1).clip(1e-6)
    x = (torch.from_numpy(d) - torch.from_numpy(mean)[:, None, None]) / torch.from_numpy(std)[:, None, None]
    return x, mean.tolist(), std.tolist()


def default_vae(path: Path) -> tuple[torch.nn.Module, ModelInfo]:
    """The default VAE on the scene's 6 bands, 7 classes: BatchNorm statistics from the scene and
    each class's logit centred on its scene median, so that several classes occur."""
    from geovae.model.vae import VAESegmenter
    from geovae.training.task import default_architecture

    x, mean, std = _scene_stats(path)
    torch.manual_seed(0)
    net = VAESegmenter(6, 7, **default_architecture())
    s = net.stride
    x = x[None, :, : x.shape[1] // s * s, : x.shape[2] // s * s]
    with batchnorm_statistics(net):
        net(x)
    with torch.no_grad():
        net.head.out.bias[:7] -= net(x).flatten(2).median(-1).values[0]
    info = ModelInfo(
        in_channels=6,
        num_classes=7,
        class_ids=[1, 2, 3, 4, 5, 6, 7],
        class_names=["developed", "agriculture", "herbaceous", "shrubland", "forest", "water", "sediment"],
        mean=mean,
        std=std,
        tile_size=64,
        band_names=[f"B{i}" for i in (1, 2, 3, 4, 5, 7)],
        extra={"note": "test model"},
    )
    return net, info


@pytest.fixture(scope="module")
def vae_files(tmp_path_factory: pytest.TempPathFactory, nc_stack_path: Path) -> tuple[Path, Path]:
    """The default VAE as a model file and its ONNX export (checked on the NC window)."""
    folder = tmp_path_factory.mktemp("vae")
    net, info = default_vae(nc_stack_path)
    st = save_model(folder / "vae.safetensors", net, info)
    onnx_path = folder / "vae.onnx"
    code = main(["export", str(st), "--onnx", "-o", str(onnx_path), "--check-with", str(nc_stack_path)])
    assert code == 0
    return st, onnx_path


@pytest.fixture(scope="module")
def nc_stack_path() -> Path:
    from conftest import NC, fixture_path

    return fixture_path(NC, "nc_lsat7_2000_6band_uint8.tif")


def segment_both(
    scene: Path, torch_model: Any, onnx_model: Any, out: Path, **options: Any
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, Any]]:
    """The rasters of one run with each backend (the same options), and the onnxruntime run's report."""
    kw = dict(progress=False, quicklook=False, formats=(), device="cpu") | options
    a = segment_scene(scene, torch_model, out / "torch", **kw)
    b = segment_scene(scene, onnx_model, out / "onnx", **kw)
    rasters = []
    for res in (a, b):
        arrays = {}
        for kind, path in res.outputs.items():
            if str(path).endswith(".tif"):
                with rasterio.open(path) as ds:
                    arrays[kind] = ds.read(1, masked=True)
        rasters.append(arrays)
    return rasters[0], rasters[1], b.report


def assert_same_answers(a: dict[str, np.ma.MaskedArray], b: dict[str, np.ma.MaskedArray]) -> float:
    """Classes agree on >= 99.9 % of the valid pixels; every float raster within 1e-4."""
    assert set(a) == set(b)
    valid = ~np.ma.getmaskarray(a["classes"])
    assert valid.mean() > 0.5
    np.testing.assert_array_equal(np.ma.getmaskarray(b["classes"]), ~valid)
    agreement = float((a["classes"].data[valid] == b["classes"].data[valid]).mean())
    assert agreement >= AGREEMENT
    for kind in set(a) - {"classes"}:
        np.testing.assert_allclose(b[kind].data[valid], a[kind].data[valid], atol=ATOL, err_msg=kind)
    return agreement


# ------------------------------------------------------------------- the default VAE
def test_default_vae_same_answers_with_samples_and_reconstruction(
    vae_files: tuple[Path, Path], nc_stack_path: Path, tmp_path: Path
) -> None:
    st, onnx_path = vae_files
    a, b, report = segment_both(nc_stack_path, st, onnx_path, tmp_path, samples=4, reconstruction=True)
    assert {"classes", "confidence", "uncertainty", "reconstruction_error"} <= set(a)
    assert len(np.unique(a["classes"].compressed())) >= 3, "several classes, or the agreement means little"
    assert_same_answers(a, b)
    assert report["model"]["backend"] == "onnxruntime"
    assert report["options"]["backend"] == "onnxruntime"
    assert report["model"]["supports_samples"] and report["model"]["supports_reconstruction"]


def test_default_vae_probabilities_within_1e4(vae_files: tuple[Path, Path], nc_stack_path: Path) -> None:
    """Every class probability, the samples' expected entropy and the reconstruction error of
    tiles of the scene, through both backends' predict (different batch and tile sizes: the
    graph's dimensions are dynamic)."""
    st, onnx_path = vae_files
    tm, om = load_model(st, device="cpu"), load_model(onnx_path, device="cpu")
    assert isinstance(om, OnnxModel) and om.backend == "onnxruntime"
    sc = open_scene(nc_stack_path)
    for side, batch in ((64, 3), (128, 1), (96, 2)):
        d, v = sc.read(Window(0, 0, side * batch, side))
        sc.fill_missing(d, v, np.asarray(tm.info.mean, np.float32))
        x = np.stack([d[:, :, i * side : (i + 1) * side] for i in range(batch)])
        outs = []
        for m in (tm, om):
            with torch.random.fork_rng():
                torch.manual_seed(7)
                outs.append(m.predict(x, samples=3, reconstruction=True))
        assert set(outs[0]) == set(outs[1]) == {"probs", "expected_entropy", "reconstruction_error"}
        for k in outs[0]:
            assert outs[1][k].shape == outs[0][k].shape
            np.testing.assert_allclose(outs[1][k], outs[0][k], atol=ATOL, err_msg=f"{k} at {batch}x{side}")
    sc.close()


def test_samples_are_reproducible_and_differ_with_the_seed(vae_files: tuple[Path, Path]) -> None:
    """The noise is an input drawn from torch's generator: one seed, one answer; another seed, another."""
    _, onnx_path = vae_files
    om = load_model(onnx_path, device="cpu")
    x = np.random.default_rng(0).normal(80, 20, (2, 6, 64, 64)).astype(np.float32)
    runs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        runs.append(om.predict(x, samples=2)["expected_entropy"])
    np.testing.assert_array_equal(runs[0], runs[1])
    assert np.abs(runs[0] - runs[2]).max() > 1e-4


def test_exported_file_describes_itself(vae_files: tuple[Path, Path]) -> None:
    st, onnx_path = vae_files
    proto = onnx.load(str(onnx_path))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["format"] == "geovae-onnx"
    assert meta["format_version"] == "1"
    src, got = read_model_info(st).to_dict(), read_onnx_info(onnx_path).to_dict()
    for key in ("in_channels", "num_classes", "class_ids", "class_names", "class_colors", "mean", "std"):
        assert got[key] == src[key], key
    for key in ("band_names", "tile_size", "stride", "kind", "arch", "halo", "training"):
        assert got[key] == src[key], key
    assert got["extra"]["note"] == "test model"
    assert read_model_info(onnx_path).to_dict() == got  # the generic reader takes .onnx files too
    check = json.loads(meta["check"])
    assert "nc_lsat7_2000_6band_uint8.tif" in check["on"]
    assert max(check["max_abs_diff"].values()) < 1e-3
    assert {"x", "noise"} == {i.name for i in proto.graph.input}
    assert {"probs", "sample_probs", "expected_entropy", "reconstruction_error"} == {o.name for o in proto.graph.output}


def test_graph_has_dynamic_shapes_and_no_random_ops(vae_files: tuple[Path, Path]) -> None:
    proto = onnx.load(str(vae_files[1]))
    ops = {n.op_type for n in proto.graph.node} | {n.op_type for f in proto.functions for n in f.node}
    assert not ops & RANDOM_OPS
    x = next(i for i in proto.graph.input if i.name == "x").type.tensor_type.shape.dim
    assert [d.dim_param != "" for d in x] == [True, False, True, True]  # batch, bands, height, width
    noise = next(i for i in proto.graph.input if i.name == "noise").type.tensor_type.shape.dim
    assert [d.dim_param != "" for d in noise] == [True, True, False, True, True]


def test_graph_has_no_softmax_over_the_class_axis(vae_files: tuple[Path, Path]) -> None:
    """onnxruntime's CPU Softmax over an axis that is not the last transposes there and back:
    over the samples' (S, B, K, H, W) logits it was 63 % of a run with 8 samples, which ran
    slower than PyTorch (x0.96 end to end); the export writes it out (max, exp, sum)."""
    proto = onnx.load(str(vae_files[1]))
    assert "Softmax" not in {n.op_type for n in proto.graph.node} | {n.op_type for f in proto.functions for n in f.node}


def test_backend_onnxruntime_for_a_safetensors_model(
    vae_files: tuple[Path, Path], nc_stack_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--backend onnxruntime exports a torch model file in memory and runs it; the same classes."""
    st, _ = vae_files
    out = tmp_path / "o"
    code, _, err = run(
        capsys, "-q", "segment", str(nc_stack_path), "-m", str(st), "-o", str(out), "--backend", "onnxruntime",
        "--no-quicklook", "--formats", "gpkg", "--device", "cpu",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads((out / f"{nc_stack_path.stem}.json").read_text())
    assert report["model"]["backend"] == "onnxruntime"
    ref = segment_scene(nc_stack_path, st, tmp_path / "t", progress=False, quicklook=False, formats=(), device="cpu")
    with rasterio.open(ref.outputs["classes"]) as a, rasterio.open(next(out.glob("*.classes.tif"))) as b:
        x, y = a.read(1), b.read(1)
    assert (x == y).mean() >= AGREEMENT


# ------------------------------------------------------------------ TorchGeo models
@pytest.fixture(scope="module")
def fcn_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TorchGeo SemanticSegmentation(model="fcn") checkpoint as Lightning writes one."""
    from torchgeo.tasks import SemanticSegmentation

    torch.manual_seed(0)
    task = SemanticSegmentation(model="fcn", weights=None, in_channels=6, num_classes=7, num_filters=16)
    path = tmp_path_factory.mktemp("fcn") / "fcn.ckpt"
    torch.save({"hyper_parameters": dict(task.hparams), "state_dict": task.state_dict(), "epoch": 0}, path)
    return path


def test_torchgeo_checkpoint_same_answers(
    fcn_checkpoint: Path, nc_stack_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    onnx_path = tmp_path / "fcn.onnx"
    code, out, err = run(
        capsys, "export", str(fcn_checkpoint), "--onnx", "-o", str(onnx_path), "--mean", "80", "--std", "30",
        "--classes", "1:a,2:b,3:c,4:d,5:e,6:f,7:g", "--check-with", str(nc_stack_path),
    )  # fmt: skip
    assert code == 0, err
    assert "checked against the torch model on 4 windows" in out
    info = read_onnx_info(onnx_path)
    assert info.kind == "torchgeo" and info.mean == [80.0] * 6 and info.class_ids == [1, 2, 3, 4, 5, 6, 7]
    tm = load_model(fcn_checkpoint, device="cpu", mean=[80.0] * 6, std=[30.0] * 6, class_ids=[1, 2, 3, 4, 5, 6, 7])
    a, b, report = segment_both(nc_stack_path, tm, onnx_path, tmp_path, tile=128, overlap=32)
    assert_same_answers(a, b)
    assert report["model"]["kind"] == "torchgeo" and report["model"]["backend"] == "onnxruntime"


@pytest.fixture(scope="module")
def naip_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    from test_pretrained import NAIP, write_weights

    home = tmp_path_factory.mktemp("torch_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(home))
        write_weights(NAIP, 0)
        yield home


def test_weight_set_same_answers(
    naip_home: Path, nc_stack_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """torchgeo:NAME exported with its own normalisation, bands, classes and licence."""
    from test_pretrained import NAIP

    onnx_path = tmp_path / "naip.onnx"
    code, _, err = run(capsys, "export", f"torchgeo:{NAIP}", "--onnx", "-o", str(onnx_path))
    assert code == 0, err
    info = read_onnx_info(onnx_path)
    assert info.extra["weights"]["name"] == NAIP
    assert info.training["expected_range"]
    a, b, report = segment_both(
        nc_stack_path, f"torchgeo:{NAIP}", onnx_path, tmp_path, bands=(3, 2, 1, 4), tile=256, overlap=0
    )
    assert_same_answers(a, b)
    assert report["model"]["weights"]["name"] == NAIP
    assert report["trust"]["scene"]["by"] == "the range the weights expect"


# ------------------------------------------------------------------ safety and errors
def _tiny_onnx(tmp_path: Path) -> Path:
    from geovae.model.onnx_export import export_onnx

    net = torch.nn.Conv2d(6, 3, 1)
    model = SegmentationModel(net, ModelInfo(in_channels=6, num_classes=3, kind="torchgeo"), "cpu")
    return export_onnx(model, tmp_path / "tiny.onnx")[0]


def test_custom_operators_are_refused(tmp_path: Path) -> None:
    path = _tiny_onnx(tmp_path)
    proto = onnx.load(str(path))
    node = proto.graph.node[-1]
    node.domain = "evil.ops"
    bad = tmp_path / "bad.onnx"
    onnx.save(proto, str(bad))
    with pytest.raises(ModelFileError, match="custom operator library"):
        load_onnx(bad)


def test_foreign_and_broken_onnx_files_are_refused(
    tmp_path: Path, nc_stack_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    proto = onnx.load(str(_tiny_onnx(tmp_path)))
    del proto.metadata_props[:]
    foreign = tmp_path / "foreign.onnx"
    onnx.save(proto, str(foreign))
    code, _, err = run(capsys, "segment", str(nc_stack_path), "-m", str(foreign), "-o", str(tmp_path / "o"))
    assert code == 1
    assert "without geovae metadata" in one_line(err)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08\x07garbage that is not protobuf")
    with pytest.raises(ModelFileError, match="not a readable ONNX file"):
        load_model(broken)
    assert not (tmp_path / "o").exists()


def test_backend_torch_for_an_onnx_file_and_bf16_are_refused(
    tmp_path: Path, nc_stack_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _tiny_onnx(tmp_path)
    out = tmp_path / "o"
    code, _, err = run(capsys, "segment", str(nc_stack_path), "-m", str(path), "-o", str(out), "--backend", "torch")
    assert code == 2
    assert "runs with onnxruntime" in one_line(err)
    code, _, err = run(capsys, "segment", str(nc_stack_path), "-m", str(path), "-o", str(out), "--precision", "bf16")
    assert code == 2
    assert "fp32" in one_line(err)
    assert not out.exists()
    with pytest.raises(OptionError, match="ONNX graph already"):
        from geovae.model.onnx_export import export_graph

        export_graph(load_onnx(path))


def test_a_failed_check_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import geovae.model.onnx_export as mo

    monkeypatch.setattr(mo, "CHECK_TOLERANCE", -1.0)
    with pytest.raises(ModelFileError, match="differs from the torch model"):
        _tiny_onnx(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_intra_op_threads_follow_torch(tmp_path: Path) -> None:
    """The run's CPU budget is torch's thread count (OMP_NUM_THREADS, torch.set_num_threads)."""
    m = load_onnx(_tiny_onnx(tmp_path), device="cpu")
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert m.session_options().intra_op_num_threads == 1
        torch.set_num_threads(2)
        assert m.session_options().intra_op_num_threads == 2
    finally:
        torch.set_num_threads(n)
    assert OnnxModel(m.proto, m.info, "cpu", threads=3).session_options().intra_op_num_threads == 3


def test_session_threads_sleep_between_operators_unless_configured(tmp_path: Path) -> None:
    """geovae's sessions do not spin-wait (onnxruntime's own default does); a caller's
    session_config still wins."""
    key = "session.intra_op.allow_spinning"
    m = load_onnx(_tiny_onnx(tmp_path), device="cpu")
    assert m.session_options().get_session_config_entry(key) == "0"
    spin = OnnxModel(m.proto, m.info, "cpu", session_config={key: "1"})
    assert spin.session_options().get_session_config_entry(key) == "1"
    assert m.predict(np.zeros((1, m.info.in_channels, 32, 32), np.float32))["probs"].shape[0] == 1


def test_non_finite_weights_are_refused(
    tmp_path: Path, nc_stack_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An ONNX file whose weights hold NaN or infinity (exported from a diverged model, or
    edited) is refused with one line naming the tensor, as a .safetensors file is."""
    from onnx import numpy_helper

    proto = onnx.load(str(_tiny_onnx(tmp_path)))
    weights = [t for t in proto.graph.initializer if numpy_helper.to_array(t).ndim > 1]
    assert weights
    for value, name in ((np.nan, "nan.onnx"), (np.inf, "inf.onnx")):
        edited = onnx.ModelProto()
        edited.CopyFrom(proto)
        t = next(t for t in edited.graph.initializer if t.name == weights[0].name)
        arr = numpy_helper.to_array(t).copy()
        arr.flat[0] = value
        t.CopyFrom(numpy_helper.from_array(arr, t.name))
        bad = tmp_path / name
        onnx.save(edited, str(bad))
        code, _, err = run(capsys, "segment", str(nc_stack_path), "-m", str(bad), "-o", str(tmp_path / "o"))
        assert code == 1
        assert f"tensor {t.name} holds non-finite numbers (NaN or infinity)" in one_line(err)
        assert not (tmp_path / "o").exists()
    # The unedited file still loads.
    good = tmp_path / "good.onnx"
    onnx.save(proto, str(good))
    load_onnx(good)
