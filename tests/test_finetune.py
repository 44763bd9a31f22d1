"""Training from a pretrained TorchGeo encoder (``--encoder-weights``), offline.

No test downloads: the weights of ``ResNet18_Weights.LANDSAT_ETM_SR_MOCO``'s real
architecture (timm's ResNet-18 with 6 input bands, as TorchGeo's ``resnet18`` builder makes
it), randomly initialised, are written where torch.hub reads them,
``$TORCH_HOME/hub/checkpoints/<file name of the URL>``, in a temporary ``TORCH_HOME``; TorchGeo's
builder then loads them through its whole path (``load_state_dict_from_url``, the key check).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import rasterio
import torch
from conftest import one_line, run
from safetensors import safe_open

from geovae.model.pretrained import weight_set

ENCODER = "ResNet18_Weights.LANDSAT_ETM_SR_MOCO"
PREFIX = "encoder.encoder."  # the smp encoder inside the VAE's encoder wrapper


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, torch.Tensor]]:
    """A torch.hub cache of its own holding random weights of the encoder; yields their tensors."""
    import timm

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch_home")))
        ws = weight_set(ENCODER)
        torch.manual_seed(0)
        net = timm.create_model("resnet18", in_chans=ws.in_channels)
        for m in net.modules():  # statistics unlike a fresh BatchNorm's, so a reset would show
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        ws.file.parent.mkdir(parents=True)
        torch.save(net.state_dict(), ws.file)
        yield {k: v.clone() for k, v in net.state_dict().items()}


def _config(tmp_path: Path, image: Path, labels: Path) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(
        f"out: {tmp_path / 'm.safetensors'}\n"
        f"data:\n  image: {image}\n  labels: {labels}\n  tile: 32\n  batch_size: 4\n  samples_per_epoch: 8\n"
        "trainer:\n  max_epochs: 1\n  accelerator: cpu\n"
    )
    return p


def test_a_frozen_encoder_is_in_the_model_file_unchanged(
    pretrained: dict[str, torch.Tensor],
    nc_stack: Path,
    nc_labels: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import geovae.model.encoders

    # TorchGeo's meta states no licence for the ResNet encoders: give this one a licence, to
    # see that the model file records the weight set's.
    licensed = dataclasses.replace(weight_set(ENCODER), license="CC-BY-4.0")
    monkeypatch.setattr(geovae.model.encoders, "weight_set", lambda name: licensed)
    out = tmp_path / "m.safetensors"
    code, _, err = run(
        capsys,
        "train",
        "--image",
        str(nc_stack),
        "--labels",
        str(nc_labels),
        "--encoder-weights",
        ENCODER,
        "--freeze-encoder",
        "--epochs",
        "1",
        "--tile",
        "32",
        "-o",
        str(out),
    )
    assert code == 0, err
    with safe_open(str(out), "pt") as f:
        names = list(f.keys())
        keys = [k for k in names if k.startswith(PREFIX)]
        info = json.loads(f.metadata()["info"])
        # Every tensor of the encoder, BatchNorm statistics included, as in the weight file.
        assert len(keys) == len(pretrained) - 2  # all but the classifier's fc.weight and fc.bias
        changed = [k for k in keys if not torch.equal(f.get_tensor(k), pretrained[k[len(PREFIX) :]])]
        assert changed == []
        decoder = [k for k in names if k.startswith("decoder_blocks.")]
        assert decoder  # the VAE keeps its own decoders
    assert info["arch"]["encoder"] == "smp:resnet18"
    # The weights' normalisation (x / 255), not the scene's statistics.
    assert info["mean"] == [0.0] * 6
    assert info["std"] == [255.0] * 6
    rec = info["extra"]["encoder_weights"]
    assert rec["name"] == ENCODER
    assert rec["license"] == "CC-BY-4.0"
    assert rec["url"] == licensed.url
    assert rec["frozen"] is True


def test_the_trained_model_loads_without_the_weights(
    pretrained: dict[str, torch.Tensor],
    nc_stack: Path,
    nc_labels: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from geovae.model.io import load_model

    cfg = _config(tmp_path, nc_stack, nc_labels)
    code, _, err = run(
        capsys,
        "train",
        "--config",
        str(cfg),
        "--set",
        f"model.encoder_weights=torchgeo:{ENCODER}",
        "--set",
        "model.freeze_encoder=true",
        "--set",
        "model.unfreeze_after=1",
        "--set",
        "trainer.max_epochs=2",
    )
    assert code == 0, err
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))  # the weight file is not there
    model = load_model(tmp_path / "m.safetensors")
    assert model.info.extra["encoder_weights"]["unfreeze_after"] == 1
    assert not (tmp_path / "empty").exists()


class Snapshots(pl.Callback):
    """The encoder's and the decoder's tensors when training starts and after each epoch."""

    def __init__(self) -> None:
        self.start: dict[str, dict[str, torch.Tensor]] = {}
        self.epochs: list[dict[str, torch.Tensor]] = []
        self.requires_grad: list[bool] = []

    @staticmethod
    def _copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in module.state_dict().items()}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = pl_module.model
        self.start = {"encoder": self._copy(model.encoder.encoder), "decoder": self._copy(model.decoder_blocks)}

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        encoder = pl_module.model.encoder.encoder
        self.epochs.append(self._copy(encoder))
        self.requires_grad.append(all(p.requires_grad for p in encoder.parameters()))


def _fit(nc_stack: Path, nc_labels: Path, epochs: int, **task_args: object) -> tuple[Any, Snapshots]:
    """A task built without counts, as under ``torchgeo fit``: the data module completes it."""
    from geovae.training import SceneDataModule, VAESegmentationTask

    torch.manual_seed(0)
    dm = SceneDataModule(str(nc_stack), str(nc_labels), tile=32, batch_size=2, samples_per_epoch=4)
    task = VAESegmentationTask(**{"encoder_weights": ENCODER, **task_args})  # type: ignore[arg-type]
    snaps = Snapshots()
    trainer = pl.Trainer(
        max_epochs=epochs,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[snaps],
    )
    trainer.fit(task, datamodule=dm)
    return task, snaps


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """The names whose tensors are bit-identical in both."""
    return [k for k in a if torch.equal(a[k], b[k])]


def test_setup_loads_the_weight_files_tensors_into_the_encoder(
    pretrained: dict[str, torch.Tensor], nc_stack: Path, nc_labels: Path
) -> None:
    task, snaps = _fit(nc_stack, nc_labels, 1, freeze_encoder=True)
    start = snaps.start["encoder"]
    assert sorted(start) == sorted(k for k in pretrained if not k.startswith("fc."))
    assert _same(start, pretrained) == list(start)
    assert task.hparams["encoder"] == "smp:resnet18"
    assert task.hparams["std"] == [255.0] * 6


def test_a_frozen_encoder_stays_bit_identical_while_the_decoder_trains(
    pretrained: dict[str, torch.Tensor], nc_stack: Path, nc_labels: Path
) -> None:
    task, snaps = _fit(nc_stack, nc_labels, 2, freeze_encoder=True)
    after = task.model.encoder.encoder.state_dict()
    assert _same(after, pretrained) == list(after)  # weights and BatchNorm statistics
    assert snaps.requires_grad == [False, False]
    decoder = task.model.decoder_blocks.state_dict()
    moved = [k for k, v in snaps.start["decoder"].items() if v.is_floating_point() and not torch.equal(v, decoder[k])]
    assert moved  # the decoder did train


def test_unfreeze_after_n_trains_the_encoder_from_epoch_n(
    pretrained: dict[str, torch.Tensor], nc_stack: Path, nc_labels: Path
) -> None:
    _, snaps = _fit(nc_stack, nc_labels, 2, freeze_encoder=True, unfreeze_after=1)
    first, second = snaps.epochs
    assert _same(first, pretrained) == list(first)  # epoch 0: frozen
    # Epoch 1: every weight of the stages the VAE uses moved (depth 3: the stem, layer1 and
    # layer2; layer3 and layer4 stay in the model file as loaded, unused).
    used = [k for k in second if k.endswith(".weight") and k.split(".")[0] in ("conv1", "bn1", "layer1", "layer2")]
    assert len(used) == 2 + 8 + 10  # the stem's conv and bn; 2 blocks x (2 conv + 2 bn) each; layer2's downsample
    assert set(used).isdisjoint(_same(second, pretrained))
    assert snaps.requires_grad == [False, True]


def test_a_checkpoint_loads_without_the_weights_and_records_them(
    pretrained: dict[str, torch.Tensor],
    nc_stack: Path,
    nc_labels: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A ``torchgeo fit`` checkpoint: loading it rebuilds the encoder from the checkpoint alone."""
    from geovae.model.io import load_model

    task, _ = _fit(nc_stack, nc_labels, 1, encoder_weights=f"torchgeo:{ENCODER}", freeze_encoder=True)
    ckpt = tmp_path / "ft.ckpt"
    task.trainer.save_checkpoint(ckpt)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))  # the weight file is not there
    model = load_model(ckpt)
    rec = model.info.extra["encoder_weights"]
    assert rec["name"] == ENCODER
    assert rec["url"] == weight_set(ENCODER).url
    assert rec["frozen"] is True
    state = model.module.encoder.encoder.state_dict()
    assert _same(state, pretrained) == list(state)
    assert not (tmp_path / "empty").exists()


def test_band_count_refused_in_one_line(
    pretrained: dict[str, torch.Tensor],
    nc_stack: Path,
    nc_labels: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    three = tmp_path / "three.tif"
    with rasterio.open(nc_stack) as src:
        profile = src.profile | {"count": 3}
        with rasterio.open(three, "w", **profile) as dst:
            dst.write(src.read([1, 2, 3]))
    out = tmp_path / "m.safetensors"
    code, _, err = run(
        capsys,
        "train",
        "--image",
        str(three),
        "--labels",
        str(nc_labels),
        "--encoder-weights",
        ENCODER,
        "--epochs",
        "1",
        "--tile",
        "32",
        "-o",
        str(out),
    )
    assert code == 1
    line = one_line(err)
    assert f"encoder weights {ENCODER} take 6 bands (SR_B1, SR_B2, SR_B3, SR_B4, SR_B5, SR_B7)" in line
    assert "has 3" in line
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "code", "expect"),
    [
        (["--encoder-weights", "ViTBase14_DINOv2_Weights.SENTINEL2_ALL_SOFTCON"], 2, "which the VAE cannot build on"),
        (["--encoder-weights", "Unet_Weights.SENTINEL2_3CLASS_FTW"], 2, "a whole segmentation network, not an encoder"),
        (["--encoder-weights", "ResNet18_Weights.LANDSAT_ETM_SR_MOKO"], 1, "no such TorchGeo weight set"),
        (["--freeze-encoder"], 2, "--freeze-encoder acts on pretrained weights: give --encoder-weights too"),
        (
            ["--encoder-weights", ENCODER, "--unfreeze-after", "2"],
            2,
            "--unfreeze-after 2 says when a frozen encoder starts training: give --freeze-encoder too",
        ),
        (
            ["--encoder-weights", ENCODER, "--freeze-encoder", "--unfreeze-after", "3", "--epochs", "3"],
            2,
            "--unfreeze-after 3 with --epochs 3: the encoder would never train",
        ),
    ],
)
def test_unusable_choices_refused_before_reading_data(
    args: list[str], code: int, expect: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = str(tmp_path / "no_such_scene.tif")  # refused before the data is opened
    got, _, err = run(
        capsys, "train", "--image", missing, "--labels", missing, "-o", str(tmp_path / "m.safetensors"), *args
    )
    assert got == code
    assert expect in one_line(err)
    assert "no_such_scene" not in err


def test_unfreeze_after_zero_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(tmp_path / "no_such_scene.tif")
    args = ["--encoder-weights", ENCODER, "--freeze-encoder", "--unfreeze-after", "0"]
    code, _, err = run(
        capsys, "train", "--image", missing, "--labels", missing, "-o", str(tmp_path / "m.safetensors"), *args
    )
    assert code == 2
    assert "--unfreeze-after" in one_line(err)


@pytest.mark.parametrize(
    ("overrides", "expect"),
    [
        (
            ["model.encoder_weights=" + ENCODER, "model.unfreeze_after=1", "trainer.max_epochs=2"],
            "model.unfreeze_after 1 says when a frozen encoder starts training: give model.freeze_encoder too",
        ),
        (
            ["model.encoder_weights=" + ENCODER, "model.freeze_encoder=true", "model.unfreeze_after=1"],
            "model.unfreeze_after 1 with trainer.max_epochs 1: the encoder would never train",
        ),
    ],
)
def test_config_combinations_refused_in_one_line(
    overrides: list[str],
    expect: str,
    pretrained: dict[str, torch.Tensor],
    nc_stack: Path,
    nc_labels: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cfg = _config(tmp_path, nc_stack, nc_labels)
    sets = [a for o in overrides for a in ("--set", o)]
    code, _, err = run(capsys, "train", "--config", str(cfg), *sets)
    assert code == 2
    assert expect in one_line(err)
    assert not (tmp_path / "m.safetensors").exists()


def test_offline_weights_fail_in_one_line_and_write_nothing(
    nc_stack: Path, nc_labels: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import urllib.request

    import torch.hub

    def refused(url: object, *args: object, **kwargs: object) -> object:
        proxy = urllib.request.ProxyHandler({"http": "http://127.0.0.1:9", "https": "http://127.0.0.1:9"})
        return urllib.request.build_opener(proxy).open(url, timeout=5)  # type: ignore[arg-type]

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_home"))
    monkeypatch.setattr(torch.hub, "urlopen", refused)
    cfg = _config(tmp_path, nc_stack, nc_labels)
    code, _, err = run(capsys, "train", "--config", str(cfg), "--encoder-weights", ENCODER)
    assert code == 1
    line = one_line(err)
    assert weight_set(ENCODER).url in line
    assert f"put it at {weight_set(ENCODER).file}" in line
    assert not (tmp_path / "m.safetensors").exists()
