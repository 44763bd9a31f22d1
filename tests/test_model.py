"""The VAE segmenter: shapes, stride checks, samples, reconstruction, smp encoders."""

from __future__ import annotations

import pytest
import torch

from geovae.errors import GeovaeError, ModelMismatchError, OptionError
from geovae.model import VAEOutput, VAESegmenter


@pytest.mark.parametrize("bands", [3, 6, 224])
def test_shapes_for_band_counts(bands: int) -> None:
    torch.manual_seed(0)
    m = VAESegmenter(bands, 7).eval()
    x = torch.randn(2, bands, 32, 48)
    out = m.forward_all(x)
    assert isinstance(out, VAEOutput)
    assert out.logits.shape == (2, 7, 32, 48)
    assert out.reconstruction.shape == (2, bands, 32, 48)
    assert out.mu.shape == out.logvar.shape == (2, 8, 32 // m.stride, 48 // m.stride)
    assert m(x).shape == (2, 7, 32, 48)
    assert m.sample_logits(x, 3).shape == (3, 2, 7, 32, 48)
    assert m.reconstruct(x).shape == (2, bands, 32, 48)
    assert m.generate(2, (16, 32)).shape == (2, bands, 16, 32)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.reconstruction).all()


def test_default_model_is_small_and_stride_is_exposed() -> None:
    m = VAESegmenter(6, 7)
    assert m.stride == 16
    n = sum(p.numel() for p in m.parameters())
    assert 100_000 < n < 1_000_000
    assert VAESegmenter(6, 7, depth=2).stride == 4


@pytest.mark.parametrize("size", [(30, 32), (32, 40), (8, 8)])
def test_tile_not_multiple_of_stride_is_refused(size: tuple[int, int]) -> None:
    m = VAESegmenter(3, 2).eval()
    with pytest.raises(ModelMismatchError, match="multiple of the model stride 16") as ei:
        m(torch.zeros(1, 3, *size))
    assert "\n" not in str(ei.value)
    with pytest.raises(ModelMismatchError):
        m.generate(1, 20)


def test_wrong_band_count_is_refused() -> None:
    m = VAESegmenter(6, 2).eval()
    with pytest.raises(ModelMismatchError, match="6"):
        m(torch.zeros(1, 4, 32, 32))


def test_bad_arguments_are_user_errors() -> None:
    with pytest.raises(OptionError):
        VAESegmenter(0, 3)
    with pytest.raises(OptionError):
        VAESegmenter(3, 3, encoder="vgg")
    with pytest.raises(OptionError):
        VAESegmenter(3, 3, encoder_weights="imagenet")  # type: ignore[arg-type]
    with pytest.raises(GeovaeError):
        VAESegmenter(3, 3, encoder="smp:no_such_encoder")


def test_samples_differ_and_mean_forward_is_deterministic() -> None:
    torch.manual_seed(1)
    m = VAESegmenter(6, 5).eval()
    x = torch.randn(1, 6, 64, 64)
    with torch.no_grad():
        p = m.sample(x, 4)
        assert torch.allclose(p.sum(2), torch.ones(4, 1, 64, 64), atol=1e-5)
        # Different draws give different maps...
        for i in range(1, 4):
            assert (p[0] - p[i]).abs().max() > 1e-3
        # ...while the mean prediction does not depend on the random state.
        a = m(x)
        torch.manual_seed(123)
        b = m(x)
        assert torch.equal(a, b)
        assert torch.equal(m.forward_all(x, sample=False).logits, a)
        # Samples are spatially coherent: z is upsampled from 1/16, so neighbouring pixels
        # move together far more than distant ones.
        d = (p[0] - p[1])[0, 0]
        near = (d[:, 1:] - d[:, :-1]).abs().mean()
        assert near < d.abs().mean()


def test_hparams_rebuild_an_identical_model() -> None:
    m = VAESegmenter(4, 3, base_channels=8, depth=3, latent_channels=4)
    assert m.hparams == {
        "in_channels": 4,
        "num_classes": 3,
        "base_channels": 8,
        "depth": 3,
        "latent_channels": 4,
        "encoder": "unet",
        "recon_condition": "class",
        "head": "mlp",
    }
    for cond in ("class", "none"):
        m = VAESegmenter(4, 3, base_channels=8, depth=3, latent_channels=4, recon_condition=cond)
        m2 = VAESegmenter(**m.hparams)
        m2.load_state_dict(m.state_dict())
        x = torch.randn(1, 4, 16, 16)
        assert torch.equal(m.eval()(x), m2.eval()(x))
        assert torch.equal(m.reconstruct(x), m2.reconstruct(x))
    with pytest.raises(OptionError, match="recon_condition"):
        VAESegmenter(4, 3, recon_condition="label")


@pytest.mark.parametrize("bands", [6, 224])
def test_class_errors_equal_each_class_reconstruction(bands: int) -> None:
    """The expanded per-class error (memory ~ hidden width, not bands) is the plain MSE."""
    torch.manual_seed(3)
    m = VAESegmenter(bands, 4, base_channels=8, depth=2, latent_channels=3).eval()
    x = torch.randn(2, bands, 16, 24)
    with torch.no_grad():
        out = m.forward_all(x, sample=False)
        a = m.recon_decoder.features(out.mu)
        for k in range(4):
            rec = m.recon_decoder.decode(a, torch.full((2, 16, 24), k))
            assert torch.allclose(out.class_errors[:, k], (rec - x).pow(2).mean(1), rtol=1e-4, atol=1e-4)
        # The reconstruction returned (and the anomaly map) uses each pixel's predicted class.
        best = out.logits.argmax(1)
        assert torch.allclose(out.reconstruction, m.recon_decoder.decode(a, best))
        assert torch.allclose(m.reconstruct(x), out.reconstruction)
    # Classes change what is decoded: the class embedding is not ignored.
    g0 = m.generate(1, 16, classes=0)
    torch.manual_seed(0)
    g = [m.generate(1, 16, classes=k) for k in range(4)]
    assert not torch.allclose(g[0], g[1]) and g0.shape == (1, bands, 16, 16)
    with pytest.raises(OptionError, match="class index"):
        m.generate(1, 16, classes=4)


def test_unlabelled_pixels_train_the_classifier_through_the_reconstruction() -> None:
    """Semi-supervised VAE: an unlabelled pixel's reconstruction is the expectation over the
    predicted classes, so its gradient reaches the segmentation head; a labelled pixel's uses
    its label (no gradient to the head from reconstruction); without class conditioning the
    head gets nothing from unlabelled pixels."""
    from geovae.model.losses import vae_segmentation_loss

    x = torch.randn(2, 6, 32, 32)
    for cond, expect in (("class", True), ("none", False)):
        torch.manual_seed(4)
        m = VAESegmenter(6, 3, base_channels=8, depth=2, latent_channels=2, recon_condition=cond)
        out = m.forward_all(x)
        d = vae_segmentation_loss(out, x, None, beta=0.0)
        assert float(d["ce"].detach()) == 0.0
        d["loss"].backward()
        head_grad = sum(float(p.grad.abs().sum()) for p in m.head.parameters() if p.grad is not None)
        assert (head_grad > 0) is expect, cond
    # Fully labelled: the error given the label, exactly.
    torch.manual_seed(4)
    m = VAESegmenter(6, 3, base_channels=8, depth=2, latent_channels=2)
    out = m.forward_all(x)
    y = torch.randint(0, 3, (2, 32, 32))
    d = vae_segmentation_loss(out, x, y, beta=0.0)
    assert torch.isclose(d["recon"], out.class_errors.gather(1, y[:, None]).mean(), atol=1e-6)


def test_prediction_is_local_so_tiles_match_the_untiled_pass() -> None:
    """Fully convolutional with a spatial latent: a crop's centre equals the full pass there."""
    torch.manual_seed(2)
    m = VAESegmenter(3, 4, base_channels=8, depth=3).eval()
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        full = m(x)
        crop = m(x[..., 32:96, 32:96])
    # Away from the crop edge (a halo of 16 px) the two agree to float precision.
    assert torch.allclose(full[..., 48:80, 48:80], crop[..., 16:48, 16:48], atol=1e-4)


def test_smp_encoder_without_weights() -> None:
    torch.manual_seed(0)
    m = VAESegmenter(6, 7, encoder="smp:resnet18").eval()
    assert m.stride == 16
    x = torch.randn(1, 6, 64, 64)
    out = m.forward_all(x)
    assert out.logits.shape == (1, 7, 64, 64)
    assert out.reconstruction.shape == (1, 6, 64, 64)
    assert m.hparams["encoder"] == "smp:resnet18"


def test_training_step_reduces_the_loss() -> None:
    from geovae.model.losses import vae_segmentation_loss

    torch.manual_seed(0)
    m = VAESegmenter(3, 2, base_channels=8, depth=2, latent_channels=2)
    x = torch.randn(4, 3, 32, 32)
    y = (x[:, 0] > 0).long()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss = vae_segmentation_loss(m.forward_all(x), x, y)["loss"]
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.6 * first


@pytest.mark.slow
def test_reconstruction_error_flags_clouds(gulfcoast, gulfcoast_bqa, tmp_path) -> None:
    """Real Landsat-8: a reconstruction branch trained without labels on BQA-clear pixels
    rebuilds clear land far better than high-confidence cloud, end to end through a model file."""
    import numpy as np
    import rasterio
    import torch.nn.functional as F

    from geovae.model import ModelInfo, load_model, save_model, vae_segmentation_loss

    with rasterio.open(gulfcoast) as src:
        x = src.read().astype(np.float32)
    with rasterio.open(gulfcoast_bqa) as src:
        q = src.read(1)
    cloud = (q >> 14) & 3  # pre-collection BQA: bits 14-15 cloud confidence
    water = (q >> 4) & 3  # bits 4-5 water confidence
    clear = cloud == 1
    clear_land = clear & (water == 0)
    assert (cloud == 3).mean() > 0.03 and clear_land.mean() > 0.2
    # Scene-wide statistics of the training pixels, as geovae train computes them.
    mean = x[:, clear].mean(1)
    std = x[:, clear].std(1)
    xn = torch.from_numpy((x - mean[:, None, None]) / std[:, None, None])
    valid = torch.from_numpy(clear)

    # Random 32 px crops that are at least 60 % clear; the loss sees only clear pixels.
    t = 32
    notclear = np.pad(np.cumsum(np.cumsum(~clear, 0), 1), ((1, 0), (1, 0)))
    bad = notclear[t:, t:] - notclear[:-t, t:] - notclear[t:, :-t] + notclear[:-t, :-t]
    ys, xs = np.nonzero(bad <= 0.4 * t * t)
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    m = VAESegmenter(6, 2, base_channels=8, depth=3)
    recon_params = [
        *m.encoder.parameters(),
        *m.to_mu.parameters(),
        *m.to_logvar.parameters(),
        *m.recon_decoder.parameters(),
    ]
    opt = torch.optim.Adam(recon_params, lr=3e-3)
    for _ in range(200):
        k = rng.integers(0, len(ys), 8)
        batch = torch.stack([xn[:, ys[i] : ys[i] + t, xs[i] : xs[i] + t] for i in k])
        vb = torch.stack([valid[ys[i] : ys[i] + t, xs[i] : xs[i] + t] for i in k])
        loss = vae_segmentation_loss(m.forward_all(batch), batch, None, valid=vb)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()

    info = ModelInfo(in_channels=6, num_classes=2, mean=mean.tolist(), std=std.tolist())
    model = load_model(save_model(tmp_path / "clear.safetensors", m, info), device="cpu")
    h, w = clear.shape
    xp = F.pad(torch.from_numpy(x)[None], (0, -w % m.stride, 0, -h % m.stride), mode="replicate")
    err = model.predict(xp, reconstruction=True)["reconstruction_error"][0, :h, :w].numpy()

    e_cloud, e_medium, e_land = err[cloud == 3].mean(), err[cloud == 2].mean(), err[clear_land].mean()
    assert e_cloud > 3 * e_land, (e_cloud, e_land)
    assert e_cloud > e_medium
    # The branch really learned the clear scene: far better than predicting the band means
    # (error 1.0 over clear pixels in these normalised units).
    assert err[clear].mean() < 0.6, err[clear].mean()


def test_mixed_precision_forward_keeps_shapes_and_is_close() -> None:
    """The autocast path the pipeline uses on GPUs, exercised with CPU bfloat16."""
    torch.manual_seed(0)
    m = VAESegmenter(6, 4, base_channels=8, depth=3).eval()
    x = torch.randn(2, 6, 32, 32)
    with torch.no_grad():
        ref = m(x).softmax(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lo = m.sample_logits(x, 2)
            rec = m.reconstruct(x)
            mean = m(x)
    assert lo.shape == (2, 2, 4, 32, 32) and rec.shape == (2, 6, 32, 32)
    assert (mean.float().softmax(1) - ref).abs().max() < 0.1


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_amp_prediction_matches_cpu(tmp_path) -> None:
    from geovae.model import ModelInfo, SegmentationModel

    torch.manual_seed(0)
    m = VAESegmenter(6, 4, base_channels=8, depth=3).eval()
    info = ModelInfo(in_channels=6, num_classes=4)
    x = torch.randn(2, 6, 64, 64).pin_memory()
    cpu = SegmentationModel(m, info, device="cpu").predict(x)["probs"]
    gpu = SegmentationModel(m, info, device="cuda", amp=True).predict(x, samples=4, reconstruction=True)
    assert gpu["probs"].device.type == "cuda" and gpu["reconstruction_error"].shape == (2, 64, 64)
    fp = SegmentationModel(m, info, device="cuda", amp=False).predict(x)["probs"].cpu()
    assert torch.allclose(fp, cpu, atol=1e-4)


# ----------------------------------------------------------------------------- the low-rank head
def _lowrank(seed: int = 0, **kw: object) -> VAESegmenter:
    torch.manual_seed(seed)
    m = VAESegmenter(6, 5, base_channels=16, depth=3, latent_channels=4, head="lowrank", **kw).eval()
    with torch.no_grad():  # a posterior and factor wide enough for samples to matter
        m.to_logvar.bias.fill_(0.0)
        m.head.out.weight.mul_(6.0)
    return m


def test_lowrank_head_samples_differ_cheaply_and_the_mean_is_deterministic() -> None:
    m = _lowrank()
    assert m.hparams["head"] == "lowrank" and m.hparams["head_rank"] == 2
    x = torch.randn(2, 6, 64, 64)
    with torch.no_grad():
        p = m.sample(x, 6)
        assert p.shape == (6, 2, 5, 64, 64)
        assert (p[0] - p[1]).abs().max() > 1e-2
        a = m(x)
        torch.manual_seed(9)
        assert torch.equal(a, m(x))
        logits, rec, _ = m.infer(x, samples=0, reconstruction=True)
        assert torch.equal(logits, a) and rec.shape == x.shape
        assert m.infer(x, samples=3)[0].shape == (3, 2, 5, 64, 64)
        # The noise lives on the latent grid (1/8): neighbouring pixels move together.
        d = (p[0] - p[1])[0, 0]
        assert (d[:, 1:] - d[:, :-1]).abs().mean() < 0.5 * d.abs().mean()


def test_lowrank_model_is_local_and_rebuilds_from_its_hparams() -> None:
    m = _lowrank(1)
    x = torch.randn(1, 6, 128, 128)
    with torch.no_grad():
        full = m(x)
        crop = m(x[..., 32:96, 32:96])
        assert torch.allclose(full[..., 48:80, 48:80], crop[..., 16:48, 16:48], atol=1e-4)
        m2 = VAESegmenter(**m.hparams).eval()
        m2.load_state_dict(m.state_dict())
        assert torch.equal(m2(x), full)
    with pytest.raises(OptionError, match="head"):
        VAESegmenter(6, 5, head="deep")
    with pytest.raises(OptionError, match="head_rank"):
        VAESegmenter(6, 5, head="lowrank", head_rank=0)


def test_class_argmax_matches_torch_in_both_layouts() -> None:
    from geovae.model.vae import class_argmax

    torch.manual_seed(0)
    logits = torch.randn(2, 7, 9, 11)
    logits[0, 3, 0, 0] = logits[0, 5, 0, 0] = 50.0  # a tie: the lower class, as torch.argmax
    for t in (logits, logits.contiguous(memory_format=torch.channels_last)):
        assert torch.equal(class_argmax(t), logits.argmax(1))


def test_cpu_batches_run_in_chunks_with_the_same_outputs() -> None:
    """On the CPU a batch larger than cpu_chunk_pixels goes through the model in chunks of
    whole tiles: the same outputs as one pass (to float rounding), less memory at once."""
    from geovae.model.base import ModelInfo, SegmentationModel

    torch.manual_seed(0)
    net = VAESegmenter(3, 4, base_channels=8, depth=2)
    m = SegmentationModel(net, ModelInfo(in_channels=3, num_classes=4, mean=[0.0] * 3, std=[1.0] * 3), "cpu")
    seen: list[int] = []
    first_conv = next(mod for mod in m.net.modules() if isinstance(mod, torch.nn.Conv2d))
    first_conv.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[0]))
    x = torch.rand(5, 3, 64, 64)
    m.cpu_chunk_pixels = 2 * 64 * 64
    chunked = m.predict(x, reconstruction=True)
    assert seen == [2, 2, 1]
    m.cpu_chunk_pixels = len(x) * 64 * 64
    whole = m.predict(x, reconstruction=True)
    assert seen[3:] == [5]
    for k in whole:
        assert chunked[k].shape == whole[k].shape
        assert torch.allclose(chunked[k], whole[k], atol=1e-5), k
    assert (chunked["probs"].argmax(1) == whole["probs"].argmax(1)).float().mean() > 0.999


@pytest.mark.parametrize("rank", [0, 1, 3])
def test_low_rank_head_samples_at_once_equal_one_by_one(rank: int) -> None:
    """The samples' logits are computed in one broadcast tensor (no per-sample tensors stacked
    afterwards): the same values, bit for bit, as one sample at a time, and they train."""
    from geovae.model.layers import LowRankHead

    head = LowRankHead(width=8, latent_channels=4, num_classes=5, rank=rank)
    g = torch.Generator().manual_seed(0)
    b, factor = head.parts(torch.randn(2, 8, 12, 12, generator=g))
    noise = torch.randn(6, 2, rank, 12, 12, generator=g)
    many = head.sample_logits(b, factor, noise)
    assert many.shape == (6, 2, 5, 12, 12)
    assert torch.equal(many, torch.stack([head.logits(b, factor, n) for n in noise]))
    many.sum().backward()
    assert head.out.weight.grad is not None and head.out.weight.grad.abs().sum() > 0


def test_entropy_in_place_equals_entropy_and_keeps_its_input() -> None:
    """Prediction computes the samples' entropy with one temporary overwritten in place:
    the same values as ``entropy`` bit for bit, its input unchanged."""
    from geovae.model.base import _entropy_in_place, entropy

    g = torch.Generator().manual_seed(0)
    p = torch.randn(4, 2, 5, 9, 9, generator=g).softmax(2)
    p[0, 0, :, 0, 0] = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0])  # a zero probability: the clamp
    kept = p.clone()
    assert torch.equal(_entropy_in_place(p, 2), entropy(p, 2))
    assert torch.equal(p, kept)


def test_infer_at_the_latent_mean_equals_forward_bit_for_bit() -> None:
    """Without samples ``infer`` takes the low-rank head's parts in the convolution's layout
    (no copy into the plain one); its logits, and the softmax of them, are forward's exactly."""
    torch.manual_seed(0)
    net = VAESegmenter(3, 4, base_channels=8, depth=2, head="lowrank").eval()
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    net = net.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        logits, _, _ = net.infer(x)
        ref = net(x)
    assert torch.equal(logits, ref) and torch.equal(logits.softmax(1), ref.softmax(1))
