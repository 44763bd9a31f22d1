"""Images decoded from the VAE's latent prior: ``geovae generate``.

The reconstruction decoder of a geovae model is a generator: latent maps drawn from the
N(0, I) prior (one Gaussian per latent cell, ``stride`` x ``stride`` pixels) decode into
multi-band image tiles. A class-conditional decoder (``recon_condition="class"``, the
default) also takes a class per pixel, so a class map (a label raster or a
``<stem>.classes.tif``) becomes the layout of the generated images, and they lie on its grid.
Without a class map each pixel's class is the one the model's own segmentation head gives
the class-averaged decode (one step of alternating the two decoders), so each class's
texture appears where the model would map that class.

Values come out in the model's band units: de-normalised with the model file's per-band
mean and standard deviation and, where the model records the training image's data type,
rounded and clipped to that type's range and written in it.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from geovae import signals
from geovae.atomic import atomic_path, check_not_inputs, check_output_file, check_output_suffix
from geovae.errors import LabelsError, ModelFileError, OptionError

__all__ = ["MAX_BANDS", "MAX_PIXELS", "SUFFIXES", "GenerateResult", "generate_images"]

#: Largest class map (pixels per generated image) decoded in one piece.
MAX_PIXELS = 4096 * 4096
#: Most bands a GeoTIFF holds (images x bands per image).
MAX_BANDS = 65535
#: File name endings of the one format generate writes (a GeoTIFF: any band count and type).
SUFFIXES = (".tif", ".tiff")


@dataclass
class GenerateResult:
    """What :func:`generate_images` wrote.

    Attributes:
        path: the raster written.
        count: generated images (the raster has ``count * bands`` bands, image by image).
        bands: bands per image (the model's input bands).
        height: rows of each image.
        width: columns of each image.
        dtype: the raster's data type.
        georeferenced: whether a class map gave the images a CRS and transform.
    """

    path: Path
    count: int
    bands: int
    height: int
    width: int
    dtype: str
    georeferenced: bool


def _class_layout(path: str | os.PathLike[str], class_ids: list[int], stride: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Class indices (-1 = no class) of a class map, padded to the stride, and its grid."""
    from geovae.scene import open_raster

    with open_raster(path, "class map") as ds:
        if not np.issubdtype(np.dtype(ds.dtypes[0]), np.integer):
            raise LabelsError(
                f"--classes-from {path}: holds {ds.dtypes[0]} values; give an integer class raster "
                "(labels or a geovae classes.tif)"
            )
        if ds.width * ds.height > MAX_PIXELS:
            raise OptionError(
                f"--classes-from {path}: {ds.width}x{ds.height} px is more than "
                f"{MAX_PIXELS:,} px; crop it first (gdal_translate -srcwin)"
            )
        ids = ds.read(1)
        ok = ds.read_masks(1) > 0
        grid = {"crs": ds.crs, "transform": ds.transform, "height": ds.height, "width": ds.width}
    index = np.full(ids.shape, -1, np.int64)
    for i, cid in enumerate(class_ids):
        index[ok & (ids == cid)] = i
    if (index < 0).all():
        raise LabelsError(
            f"--classes-from {path}: holds none of the model's class ids "
            f"({', '.join(map(str, class_ids))}); give a class map of this model's classes"
        )
    h, w = index.shape
    padded = np.pad(index, ((0, (-h) % stride), (0, (-w) % stride)), constant_values=-1)
    return padded, grid


def generate_images(
    model: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    n: int = 16,
    size: int = 256,
    classes_from: str | os.PathLike[str] | None = None,
    seed: int = 0,
    device: str = "auto",
) -> GenerateResult:
    """Decode ``n`` latent samples from the prior into a multi-band raster.

    Args:
        model: a geovae model file (a VAE segmenter; it holds the decoder).
        out: the GeoTIFF to write (atomically). Band ``i * C + b`` (1-based ``+1``) is band
            ``b`` of image ``i``; band descriptions say which.
        n: number of images.
        size: height and width of each image without ``classes_from`` (a multiple of the
            model stride).
        classes_from: a class raster (the model's class ids; other values and nodata mean
            "no class": those pixels are decoded as the average over classes). The images
            take its size, CRS and transform.
        seed: seed of the latent samples.
        device: ``auto``, ``cpu`` or ``cuda[:N]``.

    Returns:
        A :class:`GenerateResult`.

    Raises:
        OptionError: ``n`` or ``size`` out of range, or ``out`` not named ``.tif``/``.tiff``.
        ModelFileError: the model cannot be read or has no decoder.
        LabelsError, SceneError: an unusable class map.
        OutputError: ``out`` cannot be written, or is the model file or the class map.
    """
    out_path = check_output_file(out, example="samples.tif")
    check_not_inputs([out_path], [model, classes_from], fix="choose another --out file")
    # Refused rather than written as a GeoTIFF under another format's name: a PNG or JPEG
    # holds at most 4 bands of 8 or 16 bits, not N images of the model's bands.
    check_output_suffix(
        out_path,
        SUFFIXES,
        writes="generate writes a GeoTIFF",
        fix="convert it afterwards with gdal_translate if you need another format",
    )
    if n < 1:
        raise OptionError(f"--n {n}: generate at least one image")
    import rasterio
    import torch

    from geovae.model.io import load_model
    from geovae.model.vae import VAESegmenter

    m = load_model(model, device=device, amp=False)
    module, info = m.module, m.info
    if not isinstance(module, VAESegmenter):
        raise ModelFileError(f"{model}: a {info.kind} model has no image decoder; generate needs a geovae VAE model")
    if n * info.in_channels > MAX_BANDS:
        raise OptionError(
            f"--n {n}: {n} images of {info.in_channels} bands is more than the {MAX_BANDS:,} bands a GeoTIFF holds; "
            f"give --n {MAX_BANDS // info.in_channels} or less"
        )
    stride = module.stride
    layout = grid = None
    if classes_from is not None:
        layout, grid = _class_layout(classes_from, info.class_ids, stride)
        hh, ww = layout.shape
        out_h, out_w = grid["height"], grid["width"]
    else:
        if size < stride or size % stride:
            raise OptionError(
                f"--size {size}: must be a positive multiple of the model stride {stride}; "
                f"try {max(stride, round(size / stride) * stride)}"
            )
        if size * size > MAX_PIXELS:
            raise OptionError(f"--size {size}: at most {math.isqrt(MAX_PIXELS)} px a side")
        hh = ww = out_h = out_w = size
    dtype = str(info.training.get("dtype") or "float32")
    np_dtype = np.dtype(dtype)
    lo, hi = (
        (np.iinfo(np_dtype).min, np.iinfo(np_dtype).max) if np.issubdtype(np_dtype, np.integer) else (-np.inf, np.inf)
    )
    c = info.in_channels
    names = info.band_names or [f"band {b + 1}" for b in range(c)]
    mean = torch.tensor(info.mean, dtype=torch.float32, device=m.device).view(1, -1, 1, 1)
    std = torch.tensor(info.std, dtype=torch.float32, device=m.device).view(1, -1, 1, 1)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    profile: dict[str, Any] = {
        "driver": "GTiff",
        "width": out_w,
        "height": out_h,
        "count": n * c,
        "dtype": dtype,
        "compress": "deflate",
        "interleave": "band",
    }
    if out_w >= 256 and out_h >= 256:
        profile.update(tiled=True, blockxsize=256, blockysize=256)
    if grid is not None:
        profile.update(crs=grid["crs"], transform=grid["transform"])
    cls_t = torch.from_numpy(layout).to(m.device)[None] if layout is not None else None
    with warnings.catch_warnings():
        # Tiles without a class map have no place on Earth: that is expected, not a warning.
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        _write(
            out_path,
            profile,
            module,
            info,
            n,
            c,
            hh,
            ww,
            out_h,
            out_w,
            cls_t,
            gen,
            mean,
            std,
            np_dtype,
            lo,
            hi,
            names,
            seed,
            classes_from,
        )
    return GenerateResult(out_path, n, c, out_h, out_w, dtype, grid is not None)


def _write(
    out_path: Path,
    profile: dict[str, Any],
    module: Any,
    info: Any,
    n: int,
    c: int,
    hh: int,
    ww: int,
    out_h: int,
    out_w: int,
    cls_t: Any,
    gen: Any,
    mean: Any,
    std: Any,
    np_dtype: Any,
    lo: Any,
    hi: Any,
    names: list[str],
    seed: int,
    classes_from: Any,
) -> None:
    import rasterio
    import torch

    from geovae.model.vae import class_argmax

    stride = module.stride
    device = mean.device
    with atomic_path(out_path) as tmp, rasterio.open(tmp, "w", **profile) as dst, torch.inference_mode():
        for i in range(n):
            signals.check()
            z = torch.randn(1, module.latent_channels, hh // stride, ww // stride, generator=gen).to(device)
            x = _decode(module, z, cls_t, class_argmax)
            img = (x * std + mean)[0, :, :out_h, :out_w].float().cpu().numpy()
            if np.issubdtype(np_dtype, np.integer):
                img = np.rint(img)
            img = np.clip(img, lo, hi).astype(np_dtype)
            dst.write(img, indexes=list(range(i * c + 1, (i + 1) * c + 1)))
            for b in range(c):
                dst.set_band_description(i * c + b + 1, f"sample {i + 1}: {names[b]}")
        dst.update_tags(
            GEOVAE_GENERATED="latent prior samples",
            SAMPLES=str(n),
            BANDS_PER_SAMPLE=str(c),
            SEED=str(seed),
            CLASSES_FROM=str(classes_from) if classes_from is not None else "segmenter's own classes",
        )


def _decode(module: Any, z: Any, classes: Any, class_argmax: Any) -> Any:
    """One image from latent map ``z``: with the given class layout (-1 = average over
    classes), or with the classes the segmenter gives the class-averaged decode."""
    import torch

    if module.recon_condition != "class":
        return module.recon_decoder(z)
    dec = module.recon_decoder
    a = dec.features(z)
    mean_img = dec.decode_mean(a)
    if classes is None:
        return dec.decode(a, class_argmax(module(mean_img)))
    out = dec.decode(a, classes.clamp_min(0))
    return torch.where((classes < 0)[:, None], mean_img, out)
