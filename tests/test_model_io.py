"""Model files: exact round trips, refusal of unsafe/foreign/newer files, TorchGeo checkpoints."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path
from typing import Any

import pytest
import torch

from geovae.errors import ModelFileError
from geovae.model import ModelInfo, VAESegmenter
from geovae.model.halo import HALO_METHOD
from geovae.model.io import FORMAT_VERSION, load_model, read_model_info, save_model


class Boom:
    """A pickled object whose unpickling would run code: it must never be constructed."""

    def __reduce__(self) -> tuple:
        return (exec, ("import pathlib; pathlib.Path(__import__('os').environ['BOOM_FILE']).write_text('pwned')",))


def _trained_ish(seed: int = 0, head: str = "mlp") -> VAESegmenter:
    torch.manual_seed(seed)
    m = VAESegmenter(6, 3, base_channels=8, depth=2, latent_channels=4, head=head)
    # Move BatchNorm statistics away from their defaults so a lost buffer would show.
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m.forward_all(torch.randn(4, 6, 16, 16) * 3 + 1)
    return m.eval()


def _info() -> ModelInfo:
    return ModelInfo(
        in_channels=6,
        num_classes=3,
        class_ids=[1, 3, 5],
        class_names=["developed", "water", "forest"],
        class_colors=[(255, 0, 0), (0, 0, 255), (0, 128, 0)],
        mean=[10.0] * 6,
        std=[4.0] * 6,
        band_names=[f"B{i}" for i in range(1, 7)],
        tile_size=64,
        extra={"trained_on": "nc"},
    )


def _cl(x: torch.Tensor) -> torch.Tensor:
    """The memory layout SegmentationModel feeds its module (channels_last: faster kernels)."""
    return x.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("head", ["mlp", "lowrank"])
def test_round_trip_reproduces_predictions_exactly(tmp_path: Path, head: str) -> None:
    m = _trained_ish(head=head)
    info = _info()
    p = save_model(tmp_path / "m.safetensors", m, info)
    assert p.exists() and not list(tmp_path.glob("*.part"))
    # fold_batchnorm=False: the saved arithmetic, bit for bit (the default folds, see below).
    loaded = load_model(p, device="cpu", fold_batchnorm=False)
    assert loaded.info.kind == "geovae-vae"
    assert loaded.info.arch == m.hparams and loaded.info.stride == m.stride
    assert loaded.info.class_ids == [1, 3, 5] and loaded.info.class_names[2] == "forest"
    assert loaded.info.class_colors[1] == (0, 0, 255)
    assert loaded.info.band_names == info.band_names and loaded.info.tile_size == 64
    assert loaded.info.extra["trained_on"] == "nc" and loaded.info.extra["geovae_version"]
    x = torch.rand(2, 6, 32, 32) * 20
    # The loaded model runs channels_last (faster kernels); the reference does the same so that
    # the comparison is of the file round trip, bit for bit, not of two kernel choices.
    m = m.eval().to(memory_format=torch.channels_last)
    xn = ((x - 10.0) / 4.0).contiguous(memory_format=torch.channels_last)
    ref = m(xn).softmax(1)
    got = loaded.predict(x, reconstruction=True)
    assert torch.equal(got["probs"], ref)
    assert torch.equal(got["reconstruction_error"], ((m.reconstruct(xn) - xn) ** 2).mean(1))
    # Same seed, same samples: the sampling path is reproduced too.
    torch.manual_seed(5)
    s1 = loaded.predict(x, samples=3)
    torch.manual_seed(5)
    s2 = m.sample(xn, 3).mean(0)
    assert torch.equal(s1["probs"], s2)
    assert read_model_info(p).class_ids == [1, 3, 5]


def test_folded_batchnorm_predicts_the_same_classes(tmp_path: Path) -> None:
    m = _trained_ish(head="lowrank")
    p = save_model(tmp_path / "m.safetensors", m, _info())
    exact = load_model(p, device="cpu", fold_batchnorm=False)
    folded = load_model(p, device="cpu")
    n_bn = sum(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())
    assert n_bn > 0 and not any(isinstance(x, torch.nn.BatchNorm2d) for x in folded.net.modules())
    # The module that gets saved or exported keeps its BatchNorms and its weights.
    assert sum(isinstance(x, torch.nn.BatchNorm2d) for x in folded.module.modules()) == n_bn
    for k, v in m.state_dict().items():
        assert torch.equal(folded.module.state_dict()[k], v), k
    x = torch.rand(2, 6, 64, 64) * 20
    a, b = exact.predict(x, reconstruction=True), folded.predict(x, reconstruction=True)
    assert not torch.equal(a["probs"], b["probs"])  # it did fold: the arithmetic changed
    assert torch.allclose(a["probs"], b["probs"], atol=1e-5)
    assert torch.equal(a["probs"].argmax(1), b["probs"].argmax(1))
    assert torch.allclose(a["reconstruction_error"], b["reconstruction_error"], rtol=1e-4, atol=1e-6)
    torch.manual_seed(3)
    sa = exact.predict(x, samples=4)
    torch.manual_seed(3)
    sb = folded.predict(x, samples=4)
    assert torch.allclose(sa["probs"], sb["probs"], atol=1e-5)
    assert torch.allclose(sa["expected_entropy"], sb["expected_entropy"], atol=1e-5)


def test_any_suffix_is_accepted(tmp_path: Path) -> None:
    p = save_model(tmp_path / "model.pt", _trained_ish(), _info())
    assert load_model(p, device="cpu").info.num_classes == 3


def test_smp_encoder_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = VAESegmenter(6, 3, encoder="smp:resnet18", depth=3).eval()
    p = save_model(tmp_path / "r18.safetensors", m, ModelInfo(in_channels=6, num_classes=3))
    x = torch.randn(1, 6, 32, 32)
    m = m.to(memory_format=torch.channels_last)  # as the loaded model runs
    assert torch.equal(load_model(p, device="cpu", fold_batchnorm=False).predict(x)["probs"], m(_cl(x)).softmax(1))


def test_pickled_object_is_refused_without_running_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    flag = tmp_path / "flag.txt"
    monkeypatch.setenv("BOOM_FILE", str(flag))
    for name, payload in {
        "zip.pt": {"state_dict": {}, "hyper_parameters": {"model": "unet"}, "x": Boom()},
        "obj.ckpt": Boom(),
    }.items():
        p = tmp_path / name
        torch.save(payload, p)
        with pytest.raises(ModelFileError, match="pickled Python objects") as ei:
            load_model(p, device="cpu")
        assert "\n" not in str(ei.value)
    # A raw (non-torch) pickle is refused as well.
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(ModelFileError):
        load_model(raw, device="cpu")
    assert not flag.exists()


def test_plain_torch_state_dict_is_foreign(tmp_path: Path) -> None:
    p = tmp_path / "weights.pt"
    torch.save(_trained_ish().state_dict(), p)
    with pytest.raises(ModelFileError, match="neither a geovae model nor a TorchGeo"):
        load_model(p, device="cpu")
    torch.save([torch.zeros(2)], p)
    with pytest.raises(ModelFileError, match="not a TorchGeo checkpoint"):
        load_model(p, device="cpu")


def _rewrite_metadata(src: Path, dst: Path, **changes: str) -> None:
    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header["__metadata__"].update(changes)
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    dst.write_bytes(struct.pack("<Q", len(hb)) + hb + raw[8 + n :])


def test_newer_format_version_is_refused(tmp_path: Path) -> None:
    p = save_model(tmp_path / "m.safetensors", _trained_ish(), _info())
    newer = tmp_path / "newer.safetensors"
    _rewrite_metadata(p, newer, format_version=str(FORMAT_VERSION + 1))
    with pytest.raises(ModelFileError, match=r"newer than this geovae .*upgrade geovae"):
        load_model(newer, device="cpu")
    odd = tmp_path / "odd.safetensors"
    _rewrite_metadata(p, odd, format_version="banana")
    with pytest.raises(ModelFileError, match="unknown model format version"):
        load_model(odd, device="cpu")
    foreign = tmp_path / "foreign.safetensors"
    _rewrite_metadata(p, foreign, format="something-else")
    with pytest.raises(ModelFileError, match="foreign"):
        load_model(foreign, device="cpu")
    bad_info = tmp_path / "bad_info.safetensors"
    _rewrite_metadata(p, bad_info, info="{not json")
    with pytest.raises(ModelFileError, match="corrupt model description"):
        load_model(bad_info, device="cpu")


def test_version_1_file_still_loads(tmp_path: Path) -> None:
    """Files written before class-conditional reconstruction (format 1, no recon_condition
    in arch) rebuild the z-only decoder they hold and predict exactly as before."""
    torch.manual_seed(0)
    m = VAESegmenter(6, 3, base_channels=8, depth=2, latent_channels=4, recon_condition="none").eval()
    p = save_model(tmp_path / "m.safetensors", m, _info())
    info = read_model_info(p).to_dict()
    del info["arch"]["recon_condition"]
    old = tmp_path / "v1.safetensors"
    _rewrite_metadata(p, old, format_version="1", info=json.dumps(info))
    loaded = load_model(old, device="cpu", fold_batchnorm=False)
    assert loaded.info.arch["recon_condition"] == "none"
    x = torch.rand(1, 6, 16, 16) * 20
    xn = _cl((x - 10.0) / 4.0)
    m = m.to(memory_format=torch.channels_last)
    got = loaded.predict(x, reconstruction=True)
    assert torch.equal(got["reconstruction_error"], ((m.reconstruct(xn) - xn) ** 2).mean(1))


def test_a_halo_from_the_older_measurement_is_measured_again_on_load(tmp_path: Path) -> None:
    """Halos measured on white noise only could fall short (geovae.model.halo): a file without
    the current halo_method gets its halo measured again; one the caller gave is kept."""
    m = _trained_ish()
    p = save_model(tmp_path / "m.safetensors", m, _info())
    stored = read_model_info(p)
    assert stored.extra["halo_method"] == HALO_METHOD and stored.halo is not None
    assert load_model(p, device="cpu").info.halo == stored.halo
    old = stored.to_dict()
    del old["extra"]["halo_method"]
    old["halo"] = stored.halo + 40  # what the older measurement recorded, say
    older = tmp_path / "older.safetensors"
    _rewrite_metadata(p, older, info=json.dumps(old))
    again = load_model(older, device="cpu")
    assert again.info.halo == stored.halo and again.info.extra["halo_method"] == HALO_METHOD
    given = _info()
    given.halo = 24
    q = save_model(tmp_path / "given.safetensors", m, given)
    assert read_model_info(q).extra["halo_method"] == "given" and load_model(q, device="cpu").info.halo == 24


def test_training_facts_round_trip_and_older_files_without_them_still_load(tmp_path: Path) -> None:
    """ModelInfo.training (what the model was trained on) is kept; files from before it load
    with an empty one and predict as before."""
    m = _trained_ish()
    info = _info()
    info.training = {
        "dtype": "uint8",
        "quantiles": {"0.005": [1.0] * 6, "0.5": [50.0] * 6, "0.995": [200.0] * 6},
        "reconstruction_error_quantiles": {"0.5": 0.4, "0.9": 1.5, "0.99": 8.0, "0.995": 13.0, "0.999": 39.0},
    }
    p = save_model(tmp_path / "m.safetensors", m, info)
    assert load_model(p, device="cpu").info.training == info.training
    older = read_model_info(p).to_dict()
    del older["training"]
    old = tmp_path / "old.safetensors"
    _rewrite_metadata(p, old, info=json.dumps(older))
    assert '"training"' not in old.read_bytes()[:4096].decode(errors="ignore")
    loaded = load_model(old, device="cpu")
    assert loaded.info.training == {}
    x = torch.rand(1, 6, 16, 16) * 20
    assert torch.equal(loaded.predict(x)["probs"], load_model(p, device="cpu").predict(x)["probs"])


def test_vae_task_checkpoint_rebuilds_from_hyperparameters_or_says_why_not(tmp_path: Path) -> None:
    """A VAESegmentationTask checkpoint (as torchgeo fit writes it) is rebuilt from its
    hyperparameters alone: architecture, normalisation and classes; one saved before the task
    knew its band count is refused with one line."""
    m = _trained_ish()
    hp = {
        "_class_path": "geovae.training.VAESegmentationTask",
        "in_channels": 6,
        "num_classes": 3,
        "labels": ["developed", "water", "forest"],
        "class_ids": [1, 3, 5],
        "class_colors": None,
        "band_names": None,
        "mean": [10.0] * 6,
        "std": [4.0] * 6,
        "nodata": 0.0,
        "base_channels": 8,
        "depth": 2,
        "latent_channels": 4,
        "encoder": "unet",
        "recon_condition": "class",
    }
    sd = {f"model.{k}": v for k, v in m.state_dict().items()}
    sd.update(band_mean=torch.full((1, 6, 1, 1), 10.0), band_std=torch.full((1, 6, 1, 1), 4.0))
    ckpt = tmp_path / "task.ckpt"
    torch.save({"hyper_parameters": hp, "state_dict": sd, "epoch": 3, "geovae": {"tile_size": 32}}, ckpt)
    loaded = load_model(ckpt, device="cpu")
    info = loaded.info
    assert info.kind == "geovae-vae" and info.class_ids == [1, 3, 5] and info.class_names[2] == "forest"
    assert info.mean == [10.0] * 6 and info.std == [4.0] * 6 and info.tile_size == 32 and info.extra["epoch"] == 3
    x = torch.rand(1, 6, 16, 16) * 20
    want = load_model(save_model(tmp_path / "m.safetensors", m, _info()), device="cpu").predict(x)["probs"]
    assert torch.equal(loaded.predict(x)["probs"], want)
    torch.save({"hyper_parameters": {**hp, "in_channels": None}, "state_dict": sd}, ckpt)
    with pytest.raises(ModelFileError, match="without an integer in_channels") as e:
        load_model(ckpt, device="cpu")
    assert "\n" not in str(e.value)


def test_foreign_corrupt_and_missing_files(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello, I am not a model\n")
    with pytest.raises(ModelFileError, match="not a model file"):
        load_model(text, device="cpu")
    with pytest.raises(ModelFileError, match="not found"):
        load_model(tmp_path / "missing.safetensors", device="cpu")
    with pytest.raises(ModelFileError, match="not a file"):
        load_model(tmp_path, device="cpu")
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(ModelFileError):
        load_model(empty, device="cpu")
    p = save_model(tmp_path / "m.safetensors", _trained_ish(), _info())
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(ModelFileError, match="corrupt"):
        load_model(cut, device="cpu")
    # Weights of another architecture under a valid description.
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    meta = {"format": "geovae-model", "format_version": "1", "info": json.dumps(read_model_info(p).to_dict())}
    save_file({"w": torch.zeros(3)}, str(other), metadata=meta)
    with pytest.raises(ModelFileError, match="do not fit"):
        load_model(other, device="cpu")


def test_save_refuses_an_undescribable_module(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError):
        save_model(tmp_path / "x.safetensors", torch.nn.Conv2d(6, 3, 1), ModelInfo(in_channels=6, num_classes=3))
    with pytest.raises(ModelFileError, match="does not exist"):
        save_model(tmp_path / "no" / "x.safetensors", _trained_ish(), _info())
    assert not list(tmp_path.glob("**/*.part"))


def test_override_lengths_are_checked(tmp_path: Path) -> None:
    p = save_model(tmp_path / "m.safetensors", _trained_ish(), _info())
    with pytest.raises(ModelFileError, match="6 bands"):
        load_model(p, device="cpu", mean=[0.0, 1.0])


@pytest.fixture(scope="module")
def torchgeo_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    import lightning as L
    from torchgeo.tasks import SemanticSegmentation

    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    task = SemanticSegmentation(model="unet", backbone="resnet18", weights=None, in_channels=6, num_classes=7)
    batch = [{"image": torch.randn(6, 64, 64), "mask": torch.randint(0, 7, (64, 64))} for _ in range(2)]
    dl = torch.utils.data.DataLoader(batch, batch_size=2)
    root = tmp_path_factory.mktemp("tg")
    trainer = L.Trainer(
        max_epochs=1,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    trainer.fit(task, dl, dl)  # the validation pass feeds TorchGeo's ReduceLROnPlateau
    ckpt = root / "task.ckpt"
    trainer.save_checkpoint(ckpt)
    torch.set_num_threads(n_threads)
    return ckpt, task.model.eval()


def test_torchgeo_checkpoint_loads_and_predicts_like_the_task(
    torchgeo_checkpoint: tuple[Path, torch.nn.Module],
) -> None:
    ckpt, model = torchgeo_checkpoint
    loaded = load_model(ckpt, device="cpu", fold_batchnorm=False)
    assert loaded.info.kind == "torchgeo" and loaded.info.in_channels == 6 and loaded.info.num_classes == 7
    assert loaded.info.class_ids == list(range(7)) and loaded.info.mean == [0.0] * 6
    assert loaded.info.stride == 32
    assert not loaded.supports_samples and not loaded.supports_reconstruction
    x = torch.rand(2, 6, 64, 64) * 255
    model = model.to(memory_format=torch.channels_last)  # as the loaded model runs
    with torch.no_grad():
        ref = model(_cl(x)).softmax(1)
    assert torch.equal(loaded.predict(x)["probs"], ref)
    # With the user's normalisation and class ids.
    named = load_model(
        ckpt, device="cpu", fold_batchnorm=False, mean=[100.0] * 6, std=[50.0] * 6, class_ids=[1, 2, 3, 4, 5, 6, 7]
    )
    assert named.info.class_ids == [1, 2, 3, 4, 5, 6, 7] and named.info.class_names[0] == "class 1"
    with torch.no_grad():
        ref2 = model(_cl((x - 100) / 50)).softmax(1)
    assert torch.equal(named.predict(x)["probs"], ref2)


def test_torchgeo_model_saved_as_geovae_file(torchgeo_checkpoint: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    ckpt, _model = torchgeo_checkpoint
    loaded = load_model(ckpt, device="cpu")
    p = save_model(tmp_path / "tg.safetensors", loaded.module, loaded.info)
    again = load_model(p, device="cpu")
    assert again.info.kind == "torchgeo"
    x = torch.rand(1, 6, 64, 64)
    assert torch.equal(again.predict(x)["probs"], loaded.predict(x)["probs"])


def test_export_torchgeo_checkpoint_with_normalisation_and_classes(
    torchgeo_checkpoint: tuple[Path, torch.nn.Module], tmp_path: Path, nc_stack: Path, capsys: pytest.CaptureFixture
) -> None:
    """`geovae export` records what a TorchGeo checkpoint lacks; the file then stands alone."""
    from geovae.bands import band_statistics
    from geovae.cli import main

    ckpt, model = torchgeo_checkpoint
    out = tmp_path / "tg.safetensors"
    classes = "1:developed,2:agriculture,3:herbaceous,4:shrubland,5:forest,6:water,7:sediment"
    assert (
        main(
            [
                "export",
                str(ckpt),
                "--out",
                str(out),
                "--mean",
                "100",
                "--std",
                "50,50,50,50,50,50",
                "--classes",
                classes,
                "--tile",
                "128",
            ]
        )
        == 0
    )
    got = load_model(out, device="cpu", fold_batchnorm=False)
    assert got.info.kind == "torchgeo" and got.info.tile_size == 128
    assert got.info.class_ids == [1, 2, 3, 4, 5, 6, 7] and got.info.class_names[4] == "forest"
    x = torch.rand(1, 6, 64, 64) * 255
    with torch.no_grad():
        ref = model.to(memory_format=torch.channels_last)(_cl((x - 100) / 50)).softmax(1)
    assert torch.equal(got.predict(x)["probs"], ref)
    # Scene-wide statistics from a real 6-band scene, as geovae train computes them.
    out2 = tmp_path / "tg2.safetensors"
    assert main(["export", str(ckpt), "-o", str(out2), "--stats-from", str(nc_stack)]) == 0
    _stats = band_statistics(str(nc_stack))
    mean, std = _stats.mean, _stats.std
    assert read_model_info(out2).mean == pytest.approx(mean) and read_model_info(out2).std == pytest.approx(std)
    capsys.readouterr()
    # Bad options: one line, exit 2, nothing written.
    for args, msg in (
        (["--mean", "1,2"], "2 values for a model with 6 bands"),
        (["--std", "0"], "must be positive"),
        (["--classes", "1:a,2:b"], "7 output channels"),
        (["--tile", "100"], "multiple of the model stride 32"),
        (["--stats-from", str(nc_stack), "--mean", "1"], "do not also give"),
    ):
        bad = tmp_path / "bad.safetensors"
        assert main(["export", str(ckpt), "-o", str(bad), *args]) == 2, args
        err = capsys.readouterr().err.strip()
        assert msg in err and "\n" not in err and not bad.exists(), (args, err)


@pytest.mark.parametrize(
    "arch",
    [
        {"model": "fcn", "num_filters": 8},
        {"model": "unet", "backbone": "resnet18"},
        {"model": "deeplabv3+", "backbone": "resnet18"},
    ],
)
def test_torchgeo_networks_built_without_the_task_are_the_task_s(arch: dict) -> None:
    """geovae rebuilds a TorchGeo network as the task's configure_models does, without importing
    the task's Lightning stack: the same layers, names and shapes."""
    from geovae.model.checkpoints import build_torchgeo_model

    arch = {**arch, "in_channels": 4, "num_classes": 5}
    direct = build_torchgeo_model(arch).state_dict()
    task = build_torchgeo_model(arch, direct=False).state_dict()
    assert type(build_torchgeo_model(arch)) is type(build_torchgeo_model(arch, direct=False))
    assert {k: v.shape for k, v in direct.items()} == {k: v.shape for k, v in task.items()}


def test_torchgeo_network_falls_back_to_the_task(
    torchgeo_checkpoint: tuple[Path, torch.nn.Module], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the direct build does not fit the weights (a TorchGeo that builds its networks
    otherwise), the task itself builds it and the checkpoint still loads."""
    import geovae.model.checkpoints as checkpoints

    real = checkpoints.build_torchgeo_model
    monkeypatch.setattr(
        checkpoints,
        "build_torchgeo_model",
        lambda arch, direct=True: torch.nn.Conv2d(1, 1, 1) if direct else real(arch, direct=False),
    )
    ckpt, model = torchgeo_checkpoint
    loaded = load_model(ckpt, device="cpu", fold_batchnorm=False)
    x = torch.rand(1, 6, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.predict(x)["probs"], model.to(memory_format=torch.channels_last)(_cl(x)).softmax(1))


def _edit_header(src: Path, dst: Path, edit: Any) -> str:
    """Copy a safetensors file with its JSON header changed by ``edit(header) -> name``,
    the tensor data left as it is (the header keeps its length)."""
    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    name = edit(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n
    dst.write_bytes(raw[:8] + text.ljust(n) + raw[8 + n :])
    return name


def test_a_tensor_whose_dtype_was_edited_is_refused(tmp_path: Path) -> None:
    """F32 -> I32 in the header (same byte size) used to load and segment at confidence 1.0
    everywhere; the expected type comes from the module's own parameters and buffers."""
    p = save_model(tmp_path / "m.safetensors", _trained_ish(), _info())

    def to_i32(h: dict[str, Any]) -> str:
        name = next(k for k, v in h.items() if k != "__metadata__" and v["dtype"] == "F32" and "weight" in k)
        h[name]["dtype"] = "I32"
        return name

    bad = tmp_path / "i32.safetensors"
    name = _edit_header(p, bad, to_i32)
    with pytest.raises(ModelFileError) as e:
        load_model(bad, device="cpu")
    msg = str(e.value)
    assert "\n" not in msg and f"tensor {name} holds int32 numbers where the model has float32" in msg
    assert msg.endswith("re-export or re-download it")
    # An integer buffer (BatchNorm's step count) edited to another integer type is refused too.

    def to_i32_count(h: dict[str, Any]) -> str:
        name = next(k for k in h if k.endswith("num_batches_tracked"))
        h[name]["dtype"], h[name]["shape"] = "I32", [2]  # 8 bytes as two int32
        return name

    name = _edit_header(p, bad, to_i32_count)
    with pytest.raises(ModelFileError, match="weights do not fit"):
        load_model(bad, device="cpu")
    assert load_model(p, device="cpu").info.num_classes == 3


def test_a_model_holding_nan_or_infinity_is_refused(tmp_path: Path) -> None:
    """A model saved from a diverged run (older versions wrote one with exit 0) segmented every
    pixel as one class at confidence NaN; loading it is now one line naming the tensor."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    p = save_model(tmp_path / "m.safetensors", _trained_ish(), _info())
    with safe_open(str(p), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    name = next(k for k in sorted(tensors) if k.endswith("running_var"))
    for value in (float("nan"), float("inf")):
        bad_tensors = {k: v.clone() for k, v in tensors.items()}
        bad_tensors[name][0] = value
        bad = tmp_path / "bad.safetensors"
        save_file(bad_tensors, str(bad), metadata=meta)
        with pytest.raises(ModelFileError) as e:
            load_model(bad, device="cpu")
        msg = str(e.value)
        assert "\n" not in msg and f"tensor {name} holds non-finite numbers (NaN or infinity)" in msg, value
    assert load_model(p, device="cpu").info.num_classes == 3


def test_a_shape_mismatch_names_the_tensor_and_both_shapes(tmp_path: Path) -> None:
    """The message used to end with load_state_dict's colon-ended header line."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    p = save_model(tmp_path / "m.safetensors", _trained_ish(), _info())
    with safe_open(str(p), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    name = next(k for k, v in tensors.items() if v.ndim == 4)
    tensors[name] = tensors[name][:1].clone()
    bad = tmp_path / "shape.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(ModelFileError) as e:
        load_model(bad, device="cpu")
    msg = str(e.value)
    assert "\n" not in msg and ":)" not in msg and ": (" not in msg.split("architecture")[1]
    assert f"tensor {name} has shape (1, " in msg and "re-export it" in msg
    del tensors[name]
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(ModelFileError, match=f"tensor {name} missing"):
        load_model(bad, device="cpu")


def test_export_never_writes_over_its_inputs_or_under_another_format_s_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`export m.safetensors -o m.safetensors` rewrote its source, and `-o m.png` / `-o m.onnx`
    (without --onnx) wrote a safetensors file under those names, all with exit 0. Each is now one
    line before the source is read, the source left byte for byte and nothing written."""
    import os

    from conftest import one_line, run

    src = save_model(tmp_path / "m.safetensors", _trained_ish(), _info())
    link = tmp_path / "link.safetensors"
    os.link(src, link)
    stats = tmp_path / "stats.onnx"
    stats.write_bytes(b"not a raster")
    before = src.read_bytes()
    for args, said, expected in (
        (["-o", str(src)], f"output {src} is the input {src}", 1),
        (["-o", str(link)], f"output {link} is the same file as the input {src}", 1),
        (["-o", str(tmp_path / "x.png")], "export writes a safetensors model file; name the file x.safetensors", 2),
        (["-o", str(tmp_path / "x.onnx")], "name the file x.safetensors; add --onnx to write ONNX", 2),
        (
            ["-o", str(tmp_path / "x.safetensors"), "--onnx"],
            "export --onnx writes an ONNX graph; name the file x.onnx",
            2,
        ),
        (["-o", str(stats), "--onnx", "--stats-from", str(stats)], f"output {stats} is the input {stats}", 1),
    ):
        code, _, err = run(capsys, "export", str(src), *args)
        assert code == expected, (args, err)
        assert said in one_line(err), args
    assert src.read_bytes() == before
    assert stats.read_bytes() == b"not a raster"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.safetensors", "m.safetensors", "stats.onnx"]
    code, _, err = run(capsys, "export", str(src), "-o", str(tmp_path / "copy.safetensors"), "--tile", "64")
    assert code == 0, err
    assert read_model_info(tmp_path / "copy.safetensors").tile_size == 64
