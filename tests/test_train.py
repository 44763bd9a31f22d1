"""Training through TorchGeo + Lightning, on the committed window of the real NC Landsat-7 scene.

Torch runs on one thread here: on a shared 2-core machine two intra-op threads are several
times slower than one when the other core is busy.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import rasterio
import torch
from conftest import NC_HEIGHT, NC_WIDTH, config_on_fixtures, one_line, run
from torch.utils.data import DataLoader
from torchgeo.datasets import IntersectionDataset, stack_samples
from torchgeo.samplers import GriddedPatchSampler, RandomGeoSampler

from geovae.bands import band_statistics
from geovae.classes import parse_classes
from geovae.errors import ConfigError, LabelsError, ModelMismatchError, OptionError, OutputError, SceneError
from geovae.metrics import metrics_from_confusion
from geovae.training import SceneDataModule, VAESegmentationTask, load_config, train_from_config, train_model
from geovae.training.arguments import balanced_class_weights
from geovae.training.labels import SceneImage, SceneLabels, label_counts
from geovae.training.samplers import split_regions
from geovae.training.transforms import IGNORE_INDEX, AddIgnoreMask, IgnoreOutside, RemapMask, merge_batches

ROOT = Path(__file__).resolve().parents[1]
NC_CLASSES = "1:developed,2:agriculture,3:herbaceous,4:shrubland,5:forest,6:water,7:sediment"


def _one_line(e: pytest.ExceptionInfo[BaseException]) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    return msg


def _write_like(src_path: Path, dst: Path, data: np.ndarray, **overrides: object) -> Path:
    with rasterio.open(src_path) as src:
        prof = src.profile
    prof.update(overrides)
    with rasterio.open(dst, "w", **prof) as d:
        d.write(data, 1)
    return dst


def _class_miou(pred: np.ndarray, ref: np.ndarray) -> float:
    ious = []
    for c in np.unique(ref):
        inter = np.sum((pred == c) & (ref == c))
        union = np.sum((pred == c) | (ref == c))
        ious.append(inter / union)
    return float(np.mean(ious))


# ----------------------------------------------------------------------------- short real run
def test_short_real_training_beats_chance_and_its_file_predicts(
    nc_stack: Path, nc_labels: Path, tmp_path: Path
) -> None:
    out = tmp_path / "nc.safetensors"
    res = train_model(
        nc_stack,
        nc_labels,
        out,
        classes=NC_CLASSES,
        epochs=8,
        tile=64,
        batch_size=8,
        samples_per_epoch=64,
        base_channels=16,
        depth=3,
        latent_channels=4,
        lr=1e-3,
        val_fraction=0.5,
        device="cpu",
        progress=False,
        seed=0,
    )
    assert res.model_path == out and out.is_file()
    assert not [p for p in tmp_path.iterdir() if p != out], "a temporary file was left behind"
    assert len(res.history) == 8
    # The losses the task logs are real numbers, and the latent is alive (not collapsed).
    last = res.history[-1]
    for k in ("train_loss", "train_ce", "train_recon", "train_kl", "val_loss", "val_diversity", "val_mIoU"):
        assert np.isfinite(last[k]), k
    assert res.history[-1]["train_ce"] < res.history[0]["train_ce"]
    assert last["val_diversity"] > 0 and last["val_active_latents"] >= 1

    # Chance on the east half, from the labels themselves: the better of always-majority and
    # guessing by the class frequencies (expected IoU of class k is p/(2-p)).
    with rasterio.open(nc_labels) as s:
        lab = s.read(1)
    with rasterio.open(nc_stack) as s:
        img = s.read().astype(np.float32)
    east = slice(lab.shape[1] - round(lab.shape[1] * 0.5), lab.shape[1])
    ref = lab[:, east]
    ok = (ref > 0) & (img[:, :, east] != 0).any(0)
    vals, counts = np.unique(ref[ok], return_counts=True)
    p = counts / counts.sum()
    chance = max(p.max() / len(vals), float(np.mean(p / (2 - p))))
    assert res.metrics["val_mIoU"] > chance + 0.03, (res.metrics["val_mIoU"], chance)

    # The saved file alone predicts the east half as well (read by rasterio, not TorchGeo).
    from geovae.model.io import load_model

    model = load_model(out, "cpu")
    info = model.info
    assert info.class_ids == [1, 2, 3, 4, 5, 6, 7] and info.class_names[4] == "forest"
    assert info.class_colors[0] == (230, 0, 0)  # from the label raster's colour table
    _stats = band_statistics(nc_stack)
    mean, std = _stats.mean, _stats.std
    assert np.allclose(info.mean, mean) and np.allclose(info.std, std)
    assert info.tile_size == 64 and info.stride == 8 and info.in_channels == 6
    assert info.extra["data"]["val_box"] is not None
    x = torch.from_numpy(img)[None]
    fill = torch.tensor(info.mean).view(1, -1, 1, 1).expand_as(x)
    x = torch.where(x == 0, fill, x)  # per-band nodata -> mean, as training does
    h, w = x.shape[-2:]
    x = torch.nn.functional.pad(x, (0, (-w) % 8, 0, (-h) % 8))
    probs = model.predict(x)["probs"][0, :, :h, :w]
    assert torch.allclose(probs.sum(0), torch.ones(h, w), atol=1e-4)
    pred = np.array(info.class_ids)[probs.argmax(0).numpy()]
    assert _class_miou(pred[:, east][ok], ref[ok]) > chance + 0.03

    # Samples that differ: the latent samples disagree (mutual information = predictive
    # entropy - mean entropy of the samples). The first MLP head's samples, trained longer,
    # reached ~0.001 nats; the floor is ten times that.
    torch.manual_seed(0)
    s = model.predict(x, samples=8)
    pm = s["probs"][0, :, :h, :w]
    mi = -(pm * pm.clamp_min(1e-12).log()).sum(0) - s["expected_entropy"][0, :h, :w]
    mean_mi = float(mi[torch.from_numpy((img != 0).any(0))].mean())
    print("mean MI", mean_mi)
    assert mean_mi > 0.01, mean_mi


# ----------------------------------------------------------------------------- the TorchGeo path
def test_torchgeo_datasets_sampler_and_task_through_a_lightning_trainer(nc_stack: Path, nc_labels: Path) -> None:
    lookup = {c: c - 1 for c in range(1, 8)}
    image = SceneImage(paths=str(nc_stack))
    labels = SceneLabels(paths=str(nc_labels))
    ds = image & labels
    assert isinstance(ds, IntersectionDataset)
    ds.transforms = RemapMask(lookup)
    sampler = RandomGeoSampler(ds, size=32, length=12, generator=torch.Generator().manual_seed(1))
    dl = DataLoader(ds, batch_size=4, sampler=sampler, collate_fn=stack_samples)
    batch = next(iter(dl))
    assert batch["image"].shape == (4, 6, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["mask"].shape == (4, 32, 32) and batch["mask"].dtype == torch.long
    assert set(batch["mask"].unique().tolist()) <= {IGNORE_INDEX, *range(7)}
    # IntersectionDataset concatenates both datasets' bounds: the same box twice.
    assert batch["bounds"].shape == (4, 18) and torch.equal(batch["bounds"][:, :9], batch["bounds"][:, 9:])
    _stats = band_statistics(nc_stack)
    mean, std = _stats.mean, _stats.std
    task = VAESegmentationTask(6, 7, mean=mean, std=std, nodata=0.0, base_channels=8, depth=3, latent_channels=4)
    before = {k: v.detach().clone() for k, v in task.model.state_dict().items()}
    trainer = pl.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(task, train_dataloaders=dl)
    assert trainer.global_step == 3
    assert np.isfinite(float(trainer.callback_metrics["train_loss"]))
    changed = [k for k, v in task.model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert any(k.startswith("head") for k in changed) and any(k.startswith("recon_decoder") for k in changed)


def test_gridded_validation_scores_every_labelled_pixel_of_its_part_once(nc_stack: Path, nc_labels: Path) -> None:
    dm = SceneDataModule(str(nc_stack), str(nc_labels), classes=NC_CLASSES, tile=64, batch_size=8, val_fraction=0.3)
    dm.setup("validate")
    assert isinstance(dm.val_sampler, GriddedPatchSampler)
    scored = 0
    for b in dm.val_dataloader():
        scored += int((b["mask"] != IGNORE_INDEX).sum())
    # Patches overhang the validation part (and the scene); IgnoreOutside keeps only its pixels.
    assert scored == dm.n_labelled["val"] > 0
    counts, _ = label_counts(str(nc_labels), dm.val_box)
    assert dm.n_labelled["val"] == sum(v for k, v in counts.items() if k != 0)


# ----------------------------------------------------------------------------- semi-supervised
def test_unlabelled_batch_gives_finite_loss_and_trains_reconstruction_and_latent(nc_stack: Path) -> None:
    ds = SceneImage(paths=str(nc_stack), transforms=AddIgnoreMask())
    sampler = RandomGeoSampler(ds, size=32, length=4, generator=torch.Generator().manual_seed(0))
    batch = stack_samples([ds[q] for q in sampler])
    assert bool((batch["mask"] == IGNORE_INDEX).all())
    _stats = band_statistics(nc_stack)
    mean, std = _stats.mean, _stats.std
    task = VAESegmentationTask(
        6, 7, mean=mean, std=std, nodata=0.0, base_channels=8, depth=3, latent_channels=4, free_bits=0.0
    )
    task.train()
    xn, mask, valid = task._prepare(batch)
    out = task.model.forward_all(xn)
    terms = task._loss(out, xn, mask, valid, beta=1.0)
    assert torch.isfinite(terms["loss"]) and float(terms["ce"].detach()) == 0.0
    assert float(terms["recon"].detach()) > 0 and float(terms["kl"].detach()) > 0
    terms["loss"].backward()

    def grad_norm(prefix: str) -> float:
        gs = [p.grad for n, p in task.model.named_parameters() if n.startswith(prefix) and p.grad is not None]
        return float(sum(g.abs().sum() for g in gs)) if gs else 0.0

    assert grad_norm("recon_decoder") > 0
    assert grad_norm("to_mu") > 0 and grad_norm("to_logvar") > 0
    assert grad_norm("encoder") > 0
    # No label, yet the classifier learns: the reconstruction is class-conditional and an
    # unlabelled pixel's error is its expectation over the predicted classes.
    assert grad_norm("head") > 0 and grad_norm("decoder_blocks") > 0


def test_unlabeled_scenes_join_every_training_step(nc_stack: Path, nc_polygons: Path) -> None:
    dm = SceneDataModule(
        str(nc_stack),
        str(nc_polygons),
        classes=NC_CLASSES,
        unlabeled=[str(nc_stack)],
        tile=32,
        batch_size=4,
        samples_per_epoch=8,
        val_fraction=0.5,
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    raw = next(iter(loader))
    raw = raw[0] if isinstance(raw, tuple) else raw
    assert set(raw) == {"labeled", "unlabeled"}
    batch = merge_batches(raw)
    assert batch["image"].shape == (8, 6, 32, 32)
    assert bool((batch["mask"][4:] == IGNORE_INDEX).all())
    assert dm.n_labelled["train"] + dm.n_labelled["val"] == 1274  # the polygons' pixels in the window


def test_labelled_sampler_gives_every_patch_labels(nc_stack: Path, nc_polygons: Path, nc_polygons_shp: Path) -> None:
    """The hand-drawn polygons cover 3 % of the window's training half: random patches often
    miss them; every patch of the labelled sampler holds labels."""
    from geovae.training import LabelledPatchSampler

    def labelled_px(dm: SceneDataModule) -> list[int]:
        dm.setup("fit")
        return [int((dm.train_dataset[q]["mask"] != IGNORE_INDEX).sum()) for q in dm.train_sampler]

    # 32-px patches: on the 128-px-wide training half of the window, 64-px ones nearly always
    # reach a polygon.
    kw = dict(classes=NC_CLASSES, tile=32, batch_size=8, val_fraction=0.5, samples_per_epoch=48, seed=3)
    rnd = SceneDataModule(str(nc_stack), str(nc_polygons), **kw)
    lab = SceneDataModule(str(nc_stack), str(nc_polygons), sampler="labelled", **kw)
    assert rnd.sampler_name == "random" and lab.labelled_share < 0.05 and lab.describe()["sampler"] == "labelled"
    r, a = labelled_px(rnd), labelled_px(lab)
    assert isinstance(lab.train_sampler, LabelledPatchSampler) and len(a) == 48
    assert min(a) > 0 and sum(x == 0 for x in r) >= 10
    assert sum(a) > sum(r)
    # Patches stay whole, on the pixel grid and inside the training half.
    for xs, ys in lab.train_sampler:
        assert xs.start >= lab.train_box[0] - 1e-6 and xs.stop <= lab.train_box[2] + 1e-6
        assert ys.start >= lab.train_box[1] - 1e-6 and ys.stop <= lab.train_box[3] + 1e-6
        assert round((xs.stop - xs.start) / lab.facts.res[0]) == 32
        assert abs((xs.start - lab.facts.bounds[0]) / lab.facts.res[0] % 1) < 1e-6
    # The same seed draws the same patches (reproducible training).
    again = SceneDataModule(str(nc_stack), str(nc_polygons), sampler="labelled", **kw)
    assert labelled_px(again) == a
    # Vector labels: cells come from the polygons themselves.
    vec = SceneDataModule(
        str(nc_stack),
        vector_labels=str(nc_polygons_shp),
        label_field="id",
        sampler="labelled",
        **(kw | {"samples_per_epoch": 8}),
    )
    assert min(labelled_px(vec)) > 0
    with pytest.raises(OptionError, match="sampler"):
        SceneDataModule(str(nc_stack), str(nc_polygons), sampler="balanced", **kw)


def test_vector_labels_rasterise_like_the_shipped_label_raster(
    nc_stack: Path, nc_polygons: Path, nc_polygons_shp: Path
) -> None:
    dm = SceneDataModule(
        str(nc_stack),
        vector_labels=str(nc_polygons_shp),
        label_field="label",
        tile=64,
        batch_size=4,
        samples_per_epoch=4,
        val_fraction=0.5,
    )
    # Class names in the attribute become ids in name order; every polygon name is a class
    # (six of the seven reach the window: no agriculture polygon does).
    assert dm.classes.names == sorted(dm.classes.names) and "forest" in dm.classes.names
    assert dm.classes.num_classes == 6
    # Big patches: TorchGeo re-reads the vector file for every patch.
    by_id = SceneDataModule(
        str(nc_stack),
        vector_labels=str(nc_polygons_shp),
        label_field="id",
        classes=NC_CLASSES,
        tile=128,
        batch_size=4,
        val_fraction=0.5,
    )
    by_id.setup("validate")
    ref_ds = SceneLabels(paths=str(nc_polygons))
    agree = total = 0
    for b in by_id.val_dataloader():
        for i in range(b["mask"].shape[0]):
            bb = b["bounds"][i].tolist()
            ref = RemapMask(by_id.lookup)({"mask": ref_ds[bb[0] : bb[1], bb[3] : bb[4]]["mask"]})["mask"]
            ref = IgnoreOutside(tuple(by_id.val_box))({"mask": ref, "bounds": b["bounds"][i]})["mask"]  # type: ignore[arg-type]
            m = b["mask"][i]
            # The shipped raster was burnt with all_touched; TorchGeo burns pixel centres, a
            # subset: every pixel TorchGeo labels must carry the same class there.
            lab = m != IGNORE_INDEX
            agree += int(((ref == m) & lab).sum())
            total += int(lab.sum())
    assert total > 400  # of the ~450 polygon pixels of the window's east half
    assert agree == total


# ----------------------------------------------------------------------------- configs
def test_shipped_configs_parse() -> None:
    for name in ("nc_landsat7.yaml", "nc_sparse_semisupervised.yaml"):
        cfg = load_config(ROOT / "configs" / name)
        assert cfg.data.class_path == "geovae.training.SceneDataModule"
        assert cfg.trainer.max_epochs >= 1 and cfg.model.depth == 3
    cfg = load_config(ROOT / "configs" / "nc_sparse_semisupervised.yaml", ["trainer.max_epochs=2", "model.lr=0.01"])
    assert cfg.trainer.max_epochs == 2 and cfg.model.lr == 0.01
    assert len(cfg.data.init_args.unlabeled) == 1


def test_every_way_in_takes_the_task_signature_s_defaults(
    nc_stack: Path, nc_labels: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from geovae.training import fit
    from geovae.training.arguments import DATA_ARGUMENTS
    from geovae.training.task import task_defaults

    defaults = {k: v for k, v in task_defaults().items() if k not in DATA_ARGUMENTS}
    # A config that sets no model key: the parser's defaults are the signature's.
    p = tmp_path / "c.yaml"
    p.write_text(f"data:\n  image: {nc_stack}\n  labels: {nc_labels}\n")
    parsed = load_config(p).model.as_dict()
    assert {k: parsed[k] for k in defaults} == defaults
    # train_model with no model argument: the task it builds holds the signature's defaults.
    built: dict[str, VAESegmentationTask] = {}

    def capture(dm: SceneDataModule, task_args: dict[str, object], *args: object, **kw: object) -> None:
        built["task"] = VAESegmentationTask(**task_args)
        raise KeyboardInterrupt  # stop before training

    monkeypatch.setattr(fit, "fit_and_save", capture)
    with pytest.raises(KeyboardInterrupt):
        train_model(nc_stack, nc_labels, tmp_path / "m.safetensors", tile=32, epochs=1, device="cpu", progress=False)
    hp = built["task"].hparams
    skip = {"class_weights", "kl_warmup_steps"}  # train_model sets both from the data
    assert {k: hp[k] for k in defaults if k not in skip} == {k: v for k, v in defaults.items() if k not in skip}
    assert hp["free_bits"] == 0.05


@pytest.mark.parametrize(
    ("body", "expect"),
    [
        ("model:\n  bogus_key: 3\n", "unknown key model.bogus_key"),
        ("trainer:\n  max_epoch: 3\n", "unknown key trainer.max_epoch; did you mean trainer.max_epochs?"),
        ("data:\n  image: a.tif\n  labels: b.tif\n  tiles: 64\n", "unknown key data.tiles; did you mean data.tile?"),
        ("foo: 1\n", "unknown key foo"),
        ("model:\n  base_channels: sixteen\n", "model.base_channels"),
        ("model:\n  head: deep\n", "model.head 'deep': use one of mlp, lowrank"),
        (
            "data:\n  image: a.tif\n  labels: b.tif\n  val_side: up\n",
            "data.val_side 'up': use one of east, west, north",
        ),
        ("model: [1, 2\n", "not valid YAML"),
    ],
)
def test_bad_config_is_one_line_config_error(tmp_path: Path, body: str, expect: str) -> None:
    text = body if body.startswith("data:") else body + "data:\n  image: a.tif\n  labels: b.tif\n"
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert expect in _one_line(e)


def test_config_band_count_mismatch_and_missing_file(nc_stack: Path, nc_labels: Path, tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(
        f"out: {tmp_path / 'm.safetensors'}\nmodel:\n  in_channels: 7\n"
        f"data:\n  image: {nc_stack}\n  labels: {nc_labels}\n"
    )
    with pytest.raises(ModelMismatchError) as e:
        train_from_config(p)
    assert "in_channels is 7" in _one_line(e) and "6 bands" in str(e.value)
    with pytest.raises(ConfigError) as e2:
        train_from_config(tmp_path / "nope.yaml")
    assert "no such file" in _one_line(e2)


@pytest.mark.slow
def test_train_from_config_semi_supervised_writes_a_loadable_model(tmp_path: Path) -> None:
    """The shipped semi-supervised config, its data paths pointed at the committed NC window."""
    out = tmp_path / "semi.safetensors"
    res = train_from_config(
        config_on_fixtures("nc_sparse_semisupervised.yaml", tmp_path),
        [
            "trainer.max_epochs=1",
            "data.init_args.samples_per_epoch=16",
            "data.init_args.tile=32",
            "model.init_args.base_channels=8",
            f"out={out}",
            "trainer.accelerator=cpu",
        ],
    )
    assert res.model_path == out and out.is_file()
    from geovae.model.io import load_model

    m = load_model(out, "cpu")
    assert m.info.tile_size == 32 and m.info.class_names[0] == "developed"
    assert m.info.extra["data"]["unlabeled"] and np.isfinite(res.metrics["train_recon"])
    assert len(m.info.mean) == 6 and m.info.std[0] > 1  # raw uint8 statistics, not identity


def test_adversarial_training_through_the_cli(
    nc_stack: Path, nc_labels: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`geovae train --adversarial W` trains the decoder against the PatchGAN critic: the
    critic's loss and the balanced weight are logged, the critic stays out of the model file,
    and the YAML key does the same."""
    from geovae.cli import main
    from geovae.model.io import load_model

    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"out: {tmp_path / 'adv.safetensors'}\n"
        "model:\n  base_channels: 8\n  latent_channels: 4\n  adversarial_start: 0\n"
        f'data:\n  image: {nc_stack}\n  labels: {nc_labels}\n  classes: "{NC_CLASSES}"\n'
        "  tile: 32\n  batch_size: 4\n  samples_per_epoch: 12\n  val_fraction: 0\n"
        "trainer:\n  max_epochs: 1\n  accelerator: cpu\n"
    )
    code = main(["train", "--config", str(cfg), "--adversarial", "0.5", "-q"])
    out, err = capsys.readouterr()
    assert code == 0, err
    metrics = {ln.split(":")[0].strip(): float(ln.split(":")[1]) for ln in out.splitlines() if ln.startswith("  ")}
    assert metrics["train_d_loss"] > 0 and metrics["train_adv_weight"] > 0
    m = load_model(tmp_path / "adv.safetensors", "cpu")
    assert not any("discriminator" in k for k in m.module.state_dict())
    # --adversarial 0 (and the default) trains no critic. Run as a user does, in a fresh
    # process at the default verbosity: Lightning's import resets its loggers to INFO and adds
    # its own console handler, which printed every banner twice ("INFO: GPU available...").
    p = subprocess.run(
        [sys.executable, "-m", "geovae", "train", "--config", str(cfg), "--adversarial", "0"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0 and "train_d_loss" not in p.stdout, p.stderr
    assert "available" not in p.stderr and "Tip" not in p.stderr, p.stderr
    with pytest.raises(OptionError, match="adversarial"):
        train_model(nc_stack, nc_labels, tmp_path / "x.safetensors", classes=NC_CLASSES, adversarial=-1.0)


def test_model_file_of_every_new_training_part_round_trips(nc_stack: Path, nc_labels: Path, tmp_path: Path) -> None:
    """A model trained with the low-rank head, the label-aware posterior, weight EMA and the
    critic (YAML keys) is a plain VAESegmenter file: the posterior and the critic stay out of
    it, the head is rebuilt from ``arch``, and saving what was loaded reproduces the latent
    samples bit for bit."""
    from geovae.model.io import load_model, save_model

    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"out: {tmp_path / 'all.safetensors'}\n"
        "model:\n  base_channels: 8\n  depth: 2\n  latent_channels: 4\n  head: lowrank\n  head_rank: 3\n"
        "  posterior: true\n  ema: 0.9\n  adversarial: 0.5\n  adversarial_start: 0\n"
        f'data:\n  image: {nc_stack}\n  labels: {nc_labels}\n  classes: "{NC_CLASSES}"\n'
        "  tile: 32\n  batch_size: 4\n  samples_per_epoch: 12\n  val_fraction: 0\n"
        "trainer:\n  max_epochs: 1\n  accelerator: cpu\n"
    )
    res = train_from_config(cfg)
    m = load_model(res.model_path, "cpu")
    assert m.info.arch["head"] == "lowrank" and m.info.arch["head_rank"] == 3
    keys = list(m.module.state_dict())
    assert not [k for k in keys if "posterior" in k or "discriminator" in k], keys
    again = load_model(save_model(tmp_path / "again.safetensors", m.module, m.info), "cpu")
    assert again.info.arch == m.info.arch
    x = torch.rand(1, 6, 32, 32) * 200
    torch.manual_seed(3)
    a = m.predict(x, samples=4, reconstruction=True)
    torch.manual_seed(3)
    b = again.predict(x, samples=4, reconstruction=True)
    for k in ("probs", "expected_entropy", "reconstruction_error"):
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------- bad input
def test_labels_on_another_grid_are_refused(nc_stack: Path, nc_labels: Path, tmp_path: Path) -> None:
    with rasterio.open(nc_labels) as s:
        lab, t = s.read(1), s.transform
    shifted = _write_like(
        nc_labels, tmp_path / "shift.tif", lab, transform=rasterio.Affine(t.a, 0, t.c + t.a / 2, 0, t.e, t.f)
    )
    with pytest.raises(LabelsError) as e:
        train_model(nc_stack, shifted, tmp_path / "m.safetensors", epochs=1)
    assert "fraction of a pixel" in _one_line(e) and "gdalwarp" in str(e.value)
    other_crs = _write_like(nc_labels, tmp_path / "crs.tif", lab, crs="EPSG:32617")
    with pytest.raises(LabelsError) as e:
        train_model(nc_stack, other_crs, tmp_path / "m.safetensors", epochs=1)
    assert "CRS" in _one_line(e)
    coarse = _write_like(
        nc_labels,
        tmp_path / "res.tif",
        lab[::2, ::2],
        width=lab.shape[1] // 2 + 1,
        height=lab.shape[0] // 2 + 1,
        transform=rasterio.Affine(t.a * 2, 0, t.c, 0, t.e * 2, t.f),
    )
    with pytest.raises(LabelsError) as e:
        train_model(nc_stack, coarse, tmp_path / "m.safetensors", epochs=1)
    assert "pixel size" in _one_line(e)
    assert not (tmp_path / "m.safetensors").exists()


def test_unknown_class_ids_and_no_labelled_pixels(nc_stack: Path, nc_labels: Path, tmp_path: Path) -> None:
    with pytest.raises(LabelsError) as e:
        train_model(nc_stack, nc_labels, tmp_path / "m.safetensors", classes="1:developed,5:forest", epochs=1)
    msg = _one_line(e)
    assert "2 (" in msg and "3 (" in msg and "not named in --classes" in msg
    empty = _write_like(nc_labels, tmp_path / "empty.tif", np.zeros((NC_HEIGHT, NC_WIDTH), np.uint8))
    with pytest.raises(LabelsError) as e:
        train_model(nc_stack, empty, tmp_path / "m.safetensors", classes=NC_CLASSES, epochs=1)
    assert "no labelled pixels" in _one_line(e)


def test_missing_files_and_bad_options(nc_stack: Path, nc_labels: Path, tmp_path: Path) -> None:
    with pytest.raises(SceneError) as e:
        train_model(tmp_path / "nope.tif", nc_labels, tmp_path / "m.safetensors")
    assert "does not exist" in _one_line(e)
    with pytest.raises(SceneError):
        train_model(nc_stack, tmp_path / "nope_labels.tif", tmp_path / "m.safetensors")
    with pytest.raises(OptionError) as e:
        train_model(nc_stack, nc_labels, tmp_path / "m.safetensors", tile=60, depth=4)
    assert "multiple of the model stride 16" in _one_line(e)
    # The 64 px validation strip of the 256 px scene is narrower than the tile: the hint names
    # the option, which the CLI takes through a config file only.
    with pytest.raises(OptionError) as e:
        train_model(nc_stack, nc_labels, tmp_path / "m.safetensors", tile=80, epochs=1)
    assert "validation part" in _one_line(e) and "data.val_fraction" in _one_line(e) and "--config" in _one_line(e)
    with pytest.raises(OptionError):
        train_model(nc_stack, nc_labels, tmp_path / "m.safetensors", classes="developed,forest")
    with pytest.raises(LabelsError) as e:
        SceneDataModule(
            str(nc_stack),
            vector_labels=str(nc_stack.parent / "original" / "landsat96_polygons.shp"),
            label_field="klass",
        )
    assert "no attribute 'klass'" in _one_line(e)
    with pytest.raises(OutputError) as e:
        train_model(nc_stack, nc_labels, tmp_path / "no_such_dir" / "m.safetensors")
    assert "does not exist" in _one_line(e)


# ----------------------------------------------------------------------------- small pieces
def test_parse_classes_and_regions_and_weights() -> None:
    assert parse_classes("1:developed, 5:forest") == {1: "developed", 5: "forest"}
    assert parse_classes({"5": "forest", 1: "developed"}) == {1: "developed", 5: "forest"}
    assert parse_classes("3,1") == {1: "class 1", 3: "class 3"}
    with pytest.raises(OptionError):
        parse_classes("1:a,1:b")
    train, val = split_regions((0.0, 0.0, 100.0, 50.0), (1.0, 1.0), 0.25, "east")
    assert train == (0.0, 0.0, 75.0, 50.0) and val == (75.0, 0.0, 100.0, 50.0)
    train, val = split_regions((0.0, 0.0, 100.0, 50.0), (1.0, 1.0), 0.0)
    assert val is None and train == (0.0, 0.0, 100.0, 50.0)
    w = balanced_class_weights({1: 100, 2: 25, 3: 0})
    assert w[1] == pytest.approx(2 * w[0]) and w[2] == pytest.approx(10 * w[0])
    assert (100 * w[0] + 25 * w[1] + 1 * w[2]) / 126 == pytest.approx(1.0)
    cm = torch.tensor([[3, 1, 0], [0, 0, 0], [1, 0, 5]])
    m = metrics_from_confusion(cm, ["a", "b", "c"])
    assert m["IoU_a"] == pytest.approx(3 / 5) and np.isnan(m["IoU_b"]) and m["IoU_c"] == pytest.approx(5 / 6)
    assert m["mIoU"] == pytest.approx((3 / 5 + 5 / 6) / 2) and m["OA"] == pytest.approx(8 / 10)


TORCHGEO_DM = '''
import torch
from torchgeo.datamodules import GeoDataModule
from torchgeo.samplers import GriddedPatchSampler, RandomPatchSampler
from geovae.training.labels import SceneImage, SceneLabels
from geovae.training.transforms import RemapMask


class NCData(GeoDataModule):
    """A TorchGeo data module as a user writes one: it normalises batches by /255."""

    mean = torch.tensor(0.0)
    std = torch.tensor(255.0)

    def __init__(self, image: str, labels: str, batch_size: int = 4, patch_size: int = 32, length: int = 8) -> None:
        super().__init__(SceneImage, batch_size=batch_size, patch_size=patch_size, length=length)
        self.image, self.labels = image, labels

    def setup(self, stage: str) -> None:
        ds = SceneImage(paths=self.image) & SceneLabels(paths=self.labels)
        ds.transforms = RemapMask({c: c - 1 for c in range(1, 8)})
        self.train_dataset = self.val_dataset = ds
        self.train_sampler = RandomPatchSampler(ds, size=self.patch_size, length=self.length, generator=0)
        self.val_sampler = GriddedPatchSampler(ds, size=128, stride=128)
'''


def test_config_with_a_torchgeo_datamodule_folds_its_normalisation_into_the_model_file(
    nc_stack: Path, nc_labels: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "user_dm.py").write_text(TORCHGEO_DM)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = tmp_path / "tg.yaml"
    out = tmp_path / "tg.safetensors"
    cfg.write_text(f"""out: {out}
model:
  in_channels: 6
  num_classes: 7
  base_channels: 8
  depth: 3
  latent_channels: 4
data:
  class_path: user_dm.NCData
  init_args:
    image: {nc_stack}
    labels: {nc_labels}
trainer:
  max_epochs: 1
  accelerator: cpu
""")
    res = train_from_config(cfg)
    from geovae.model.io import load_model

    info = load_model(out, "cpu").info
    # The module divided by 255 before the task (whose own mean/std were the identity).
    assert info.mean == [0.0] * 6 and info.std == [255.0] * 6
    assert info.tile_size == 32 and info.extra["data"]["datamodule"] == "user_dm.NCData"
    assert np.isfinite(res.metrics["train_loss"]) and 0 <= res.metrics["val_mIoU"] <= 1
    cfg.write_text(cfg.read_text().replace("  num_classes: 7\n", ""))
    with pytest.raises(ConfigError) as e:
        train_from_config(cfg)
    assert "model.num_classes is required" in _one_line(e)


def test_ctrl_c_during_training_is_a_keyboard_interrupt_and_writes_nothing(nc_stack: Path, nc_labels: Path) -> None:
    import signal

    from geovae.training.fit import _fit

    class Interrupt(pl.Callback):
        def on_train_batch_start(self, *args: object) -> None:
            raise KeyboardInterrupt

    dm = SceneDataModule(str(nc_stack), str(nc_labels), tile=32, batch_size=2, samples_per_epoch=4, val_fraction=0)
    task = VAESegmentationTask(6, dm.classes.num_classes, base_channels=8, depth=3, latent_channels=4)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        _fit(
            task, dm, trainer_kwargs={"max_epochs": 1, "accelerator": "cpu", "callbacks": [Interrupt()]}, has_val=False
        )
    # Lightning leaves SIGINT ignored after its graceful shutdown; geovae puts it back.
    assert signal.getsignal(signal.SIGINT) is before


def test_broken_numbers_are_refused_before_training(
    nc_stack: Path, nc_labels: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A weight that is not finite or out of range (--adversarial inf turned the loss into NaN,
    and a NaN model was saved with exit 0) is refused with one line before any data is read."""
    from geovae.cli import main

    out = tmp_path / "m.safetensors"
    for kw, said in (
        ({"adversarial": float("inf")}, "--adversarial inf"),
        ({"adversarial": float("nan")}, "--adversarial nan"),
        ({"lr": float("nan")}, "lr nan"),
        ({"beta": -1.0}, "beta -1.0"),
    ):
        with pytest.raises(OptionError) as e:
            train_model(nc_stack, nc_labels, out, classes=NC_CLASSES, **kw)  # type: ignore[arg-type]
        assert said in _one_line(e)
    with pytest.raises(OptionError, match=r"model\.ema 1\.0: give a finite number >= 0 and < 1"):
        VAESegmentationTask(6, 3, ema=1.0)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"out: {out}\nmodel:\n  base_channels: 8\n"
        f"data:\n  image: {nc_stack}\n  labels: {nc_labels}\n  tile: 32\ntrainer:\n  max_epochs: 1\n"
    )
    for args, said, code_expected in (
        (["--adversarial", "inf"], "model.adversarial", 2),
        (["--set", "model.adversarial=-2"], "model.adversarial -2.0: give a finite number >= 0", 2),
        (["--set", "trainer.max_epochs=0"], "trainer.max_epochs 0 trains nothing", 2),
        (["--set", "data.samples_per_epoch=0"], "samples_per_epoch 0: trains nothing", 2),
        (["--set", f"out={nc_labels}"], "train writes a safetensors model file; name the file", 2),
    ):
        code = main(["train", "--config", str(cfg), *args])
        err = capsys.readouterr().err
        assert code == code_expected and err.count("\n") == 1 and said in err, (args, err)
    assert not out.exists() and not list(tmp_path.glob(".*.part"))


def test_train_never_writes_over_its_inputs_or_under_another_format_s_name(
    nc_stack: Path, nc_labels: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--set out=c.yaml` replaced the config with the model and `-o m.png` / `-o m.onnx` wrote a
    safetensors file under those names, all with exit 0. An out not named .safetensors is
    refused, and so is an out that is one of the inputs, the config included (here a hard link
    under a model's name), before any data is read; the inputs are left byte for byte."""
    import os

    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"out: {tmp_path / 'm.safetensors'}\nmodel:\n  base_channels: 8\n"
        f"data:\n  image: {nc_stack}\n  labels: {nc_labels}\n  tile: 32\ntrainer:\n  max_epochs: 1\n"
    )
    link = tmp_path / "link.safetensors"
    os.link(cfg, link)
    before = cfg.read_bytes()
    for args, said, expected in (
        (
            ["--set", f"out={cfg}"],
            f"--out {cfg}: train writes a safetensors model file; name the file c.safetensors",
            2,
        ),
        (["--set", f"out={link}"], f"output {link} is the same file as the input {cfg}", 1),
        (["-o", str(tmp_path / "m.png")], "name the file m.safetensors", 2),
        (["-o", str(tmp_path / "m.onnx")], "export the trained file with geovae export --onnx", 2),
    ):
        code, _, err = run(capsys, "train", "--config", str(cfg), *args)
        assert code == expected, (args, err)
        assert said in one_line(err), args
    assert cfg.read_bytes() == before
    for name in ("m.png", "m.onnx", "m.safetensors"):
        assert not (tmp_path / name).exists(), name
    missing = str(tmp_path / "no_such_scene.tif")
    code, _, err = run(capsys, "train", "--image", missing, "--labels", missing, "-o", str(tmp_path / "m"))
    assert code == 2 and "name the file m.safetensors" in one_line(err)


def test_a_run_whose_loss_goes_non_finite_or_that_made_no_step_writes_nothing(
    nc_stack: Path, nc_labels: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A finite but absurd learning rate sends the loss to NaN at the second step: the run stops
    there with one line and exit 1, and no model file is written; so does a run that made no
    optimisation step, and a model whose weights are not finite is never saved."""
    from geovae.cli import main
    from geovae.errors import TrainingError
    from geovae.training.fit import _check_trained

    out = tmp_path / "m.safetensors"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"out: {out}\nmodel:\n  base_channels: 8\n  latent_channels: 4\n"
        f"data:\n  image: {nc_stack}\n  labels: {nc_labels}\n  tile: 32\n  batch_size: 2\n"
        "  samples_per_epoch: 8\n  val_fraction: 0\ntrainer:\n  max_epochs: 1\n  accelerator: cpu\n"
    )
    for args, said in (
        (["--set", "model.lr=1e30"], "the loss became nan; no model was written; try a lower learning rate"),
        (["--set", "trainer.limit_train_batches=0"], "made no optimisation step"),
    ):
        code = main(["train", "--config", str(cfg), "-q", *args])
        err = capsys.readouterr().err
        assert code == 1 and err.count("\n") == 1 and said in err, (args, err)
        assert not out.exists() and not list(tmp_path.glob(".*.part"))
    m = VAESegmentationTask(6, 3, base_channels=8, latent_channels=4).model
    with torch.no_grad():
        next(m.parameters())[0] = float("nan")
    with pytest.raises(TrainingError, match="non-finite numbers in 1 tensors"):
        _check_trained(m, steps=3)


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["--epochs", "3"], "trainer.max_epochs"),
        (["--tile", "32"], "data.tile"),
        (["--device", "cpu"], "trainer.accelerator"),
        (["--seed", "1"], "seed_everything"),
        (["--unlabeled", "x.tif"], "data.unlabeled"),
    ],
)
def test_options_a_config_decides_are_refused_with_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], key: str
) -> None:
    """With --config these options were silently ignored; now one line names the config key."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("out: m.safetensors\n")
    code, _, err = run(capsys, "train", "--config", str(cfg), *args)
    assert code == 2
    assert "does not apply with --config" in one_line(err) and f"--set {key}=VALUE" in one_line(err)
    assert not (tmp_path / "m.safetensors").exists()
