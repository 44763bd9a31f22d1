"""What the prediction pipeline needs from any model: a description and a predict call.

This is the seam between ``geovae.model`` (which builds, trains, saves and loads models)
and ``geovae.segment`` (which runs them over scenes). Anything that can be wrapped as a
:class:`SegmentationModel` can drive ``segment_scene``: a geovae model file or a TorchGeo
``SemanticSegmentation`` checkpoint.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from geovae.choices import Precision
from geovae.classes import DEFAULT_COLORS, rgb
from geovae.device import autocast_dtype, resolve_device
from geovae.model.fold import fold_batchnorm as _fold_batchnorm
from geovae.tiling import BATCH_PIXELS


@dataclass
class ModelInfo:
    """Everything ``geovae segment`` must know about a model besides its weights.

    Attributes:
        in_channels: number of input bands the model expects.
        num_classes: number of output channels (classes).
        class_ids: value written to the class raster for output channel i.
        class_names: human name of each class.
        class_colors: RGB colour of each class for the colour table and quicklook.
        mean: per-band value subtracted before the model (scene-wide, from training data).
        std: per-band divisor after subtracting ``mean``.
        band_names: names of the input bands, when known.
        tile_size: tile size the model was trained on (the default prediction tile).
        stride: input height and width must be multiples of this.
        kind: ``"geovae-vae"`` for geovae's VAE segmenter, ``"torchgeo"`` for a TorchGeo task.
        arch: architecture hyperparameters needed to rebuild the module.
        extra: free-form provenance (training data, metrics, geovae version...).
        halo: pixels from a tile's edge within which the model's class probabilities differ
            from one untiled pass by more than 1e-3 (:func:`geovae.model.halo.measure_halo`);
            blending leaves them out, so tiling is invisible. None: not measured (older files;
            measured when loaded).
        training: what the model was trained on, for the trust check
            (:mod:`geovae.segment.trust`): ``dtype`` (the training image's data type),
            ``quantiles`` (``{"0.005": [per band], "0.5": [...], "0.995": [...]}`` of the
            training pixels, as :func:`geovae.bands.band_statistics` gives them) and, for a
            model with a reconstruction decoder, ``reconstruction_error_quantiles``
            (``{"0.5": e, "0.9": e, "0.99": e, "0.995": e, "0.999": e}`` of its own per-pixel
            reconstruction error on training pixels, in the units of
            :meth:`SegmentationModel.predict`). Empty for older files and TorchGeo checkpoints.

    Raises:
        ValueError: naming the first field that is inconsistent or holds a number the
            pipeline cannot use (a non-finite mean, a std that is not positive, a class id
            outside 0..254 or given twice, a tile size that is not a multiple of the stride).
    """

    in_channels: int
    num_classes: int
    class_ids: list[int] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)
    class_colors: list[tuple[int, int, int]] = field(default_factory=list)
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    band_names: list[str] | None = None
    tile_size: int = 256
    stride: int = 1
    kind: str = "geovae-vae"
    arch: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    halo: int | None = None
    training: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        k = self.num_classes
        if not self.class_ids:
            self.class_ids = list(range(k))
        if not self.class_names:
            self.class_names = [f"class {c}" for c in self.class_ids]
        if not self.class_colors:
            self.class_colors = [DEFAULT_COLORS[i % len(DEFAULT_COLORS)] for i in range(k)]
        self.class_colors = [rgb(c) for c in self.class_colors]
        if not self.mean:
            self.mean = [0.0] * self.in_channels
        if not self.std:
            self.std = [1.0] * self.in_channels
        if not (len(self.class_ids) == len(self.class_names) == len(self.class_colors) == k):
            raise ValueError("class_ids, class_names and class_colors must each have num_classes entries")
        if not (len(self.mean) == len(self.std) == self.in_channels):
            raise ValueError("mean and std must each have in_channels entries")
        self._check_numbers()

    def _check_numbers(self) -> None:
        """Every number the pipeline divides by, indexes with or tiles on must be usable:
        a std of 0 or a NaN mean turns every pixel into NaN and the map into one class."""
        for name in ("mean", "std"):
            for b, v in enumerate(getattr(self, name)):
                if not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise ValueError(f"{name}[{b}] is {v!r}; the per-band {name} must be a finite number")
        for b, v in enumerate(self.std):
            if v <= 0:
                raise ValueError(f"std[{b}] is {v!r}; every per-band std must be positive")
        seen: set[int] = set()
        for c in self.class_ids:
            if not isinstance(c, int) or isinstance(c, bool) or not 0 <= c <= 254:
                raise ValueError(
                    f"class id {c!r} is out of range; class ids must be integers 0..254 "
                    "(255 marks nodata in the class raster)"
                )
            if c in seen:
                raise ValueError(f"class id {c} is given twice")
            seen.add(c)
        if not isinstance(self.stride, int) or self.stride < 1:
            raise ValueError(f"stride {self.stride!r} must be a positive integer")
        if not isinstance(self.tile_size, int) or self.tile_size < 1 or self.tile_size % self.stride:
            raise ValueError(f"tile_size {self.tile_size!r} must be a positive multiple of the stride {self.stride}")
        if self.in_channels < 1 or self.num_classes < 1:
            raise ValueError("in_channels and num_classes must be positive")
        if self.halo is not None and (not isinstance(self.halo, int) or isinstance(self.halo, bool) or self.halo < 0):
            raise ValueError(f"halo {self.halo!r} must be a whole number of pixels, 0 or more")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy."""
        d = asdict(self)
        d["class_colors"] = [list(c) for c in self.class_colors]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelInfo:
        """Inverse of :meth:`to_dict`; unknown keys are ignored."""
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in names})


class SegmentationModel:
    """A model ready to predict: module in eval mode on a device, plus its :class:`ModelInfo`.

    ``predict`` takes raw pixel values (as read from the scene, converted to float32) and
    normalises them with the scene-wide statistics from the model file, never per tile.

    Args:
        module: maps a normalised (B, C, H, W) batch to (B, K, H, W) logits. If it also has
            ``sample_logits(x, n) -> (n, B, K, H, W)``, latent samples are available; if it
            has ``reconstruct(x) -> (B, C, H, W)``, reconstruction error is available.
        info: the model's description.
        device: ``"auto"``, ``"cpu"``, ``"cuda[:N]"`` or a torch device.
        amp: allow mixed precision; False forces fp32 whatever ``precision`` says.
        precision: ``auto`` (bf16/fp16 autocast on CUDA, fp32 on the CPU), ``fp32``, ``bf16``
            or ``fp16``; see :func:`geovae.device.autocast_dtype`.
        fold_batchnorm: predict with a copy of ``module`` whose eval-mode BatchNorms are folded
            into the convolutions before them (:func:`geovae.model.fold.fold_batchnorm`):
            faster, same classes, probabilities equal to rounding (~1e-6) rather than bit for
            bit. ``module`` itself is left as given (it is what gets saved or exported). Off
            by default here because a module still being trained would leave the copy stale;
            :func:`geovae.model.io.load_model` turns it on.

    Attributes:
        module: the module as given, in eval mode on the device.
        net: the module ``predict`` runs: ``module`` itself, or its folded copy.
        cpu_chunk_pixels: on the CPU, ``predict`` runs a batch through the model this many
            pixels at a time at most (whole tiles). A CPU
            computes as many pixels a second in half a megapixel as in eight (a TorchGeo
            FCN at 512²: batch 2 as fast as batch 8 within 2 %) while the activations
            held at once grow with the pixels (peak RSS 1.3 against 2.1 GiB): a
            ``--batch-size`` chosen for a GPU then costs no memory on a CPU. On CUDA the
            batch runs whole: there it is what keeps the device busy.
    """

    cpu_chunk_pixels: int = BATCH_PIXELS
    #: What runs the model: ``"torch"`` here, ``"onnxruntime"`` for
    #: :class:`~geovae.model.onnx.OnnxModel`.
    backend: str = "torch"

    def __init__(
        self,
        module: nn.Module,
        info: ModelInfo,
        device: str | torch.device = "auto",
        amp: bool = True,
        precision: Precision = "auto",
        fold_batchnorm: bool = False,
    ):
        self.info = info
        self.device = resolve_device(device)
        # channels_last lets oneDNN/cuDNN pick their fastest convolution kernels (1.5x on the
        # benchmark CPU, same fp32 arithmetic); inputs are converted to match in normalise().
        self.module: nn.Module = module.to(self.device, memory_format=torch.channels_last).eval()  # type: ignore[call-overload]  # torch's overloads omit (device, memory_format=), which it takes
        self.net: nn.Module = self.module
        if fold_batchnorm and any(isinstance(m, nn.BatchNorm2d) for m in module.modules()):
            net = copy.deepcopy(self.module)
            if _fold_batchnorm(net):
                self.net = net.to(memory_format=torch.channels_last)
        self.amp_dtype = autocast_dtype(self.device, precision) if amp else None
        self._mean = torch.tensor(info.mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self._std = torch.tensor(info.std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)

    def with_precision(self, precision: Precision) -> SegmentationModel:
        """A view of this model (same module, same device) that predicts at ``precision``."""
        other = copy.copy(self)
        other.amp_dtype = autocast_dtype(self.device, precision)
        return other

    @property
    def supports_samples(self) -> bool:
        return hasattr(self.net, "sample_logits")

    @property
    def supports_reconstruction(self) -> bool:
        return hasattr(self.net, "reconstruct")

    @property
    def supports_object_maps(self) -> bool:
        """Whether the model predicts object extent and distance maps (a VAE with object heads)."""
        return bool(getattr(self.net, "has_object_heads", False))

    def normalise(self, x: Tensor) -> Tensor:
        """Raw pixel values -> model input, with the model file's scene-wide statistics."""
        xn = (x.to(self.device, torch.float32, non_blocking=True) - self._mean) / self._std
        return xn.contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def predict(
        self, x: Tensor | Any, samples: int = 0, reconstruction: bool = False, objects: bool = False
    ) -> dict[str, Any]:
        """Predict one batch of tiles.

        Args:
            x: (B, C, H, W) raw pixel values, float32, on any device (pinned CPU memory makes
                the copy asynchronous), or a numpy array (then the outputs are numpy arrays
                too). Invalid pixels should already be filled with ``info.mean``.
            samples: number of latent samples; 0 predicts at the latent mean only.
            reconstruction: also return the per-pixel reconstruction error.
            objects: also return the object maps (a model with object heads).

        Returns:
            ``probs`` (B, K, H, W) float32 class probabilities (the mean over samples when
            ``samples`` > 0); with samples, ``expected_entropy`` (B, H, W), the mean of each
            sample's entropy in nats (predictive entropy minus it is the mutual information);
            with ``reconstruction``, ``reconstruction_error`` (B, H, W), the mean squared error
            over bands in normalised units; with ``objects``, ``object_maps`` (B, 2, H, W), the
            object extent and the distance to the object's outline in 0..1
            (:data:`~geovae.objects.OBJECT_MAPS`). On ``self.device`` (numpy in, numpy out).
        """
        as_numpy = isinstance(x, np.ndarray)
        if as_numpy:
            x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        if reconstruction and not self.supports_reconstruction:
            raise ValueError("this model has no reconstruction decoder")
        if objects and not self.supports_object_maps:
            raise ValueError("this model has no object heads")
        n = len(x)
        if self.device.type == "cpu" and n > 1:
            n = max(1, self.cpu_chunk_pixels // (x.shape[-2] * x.shape[-1]))
        if n < len(x):
            parts = [self._forward(x[i : i + n], samples, reconstruction, objects) for i in range(0, len(x), n)]
            out = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        else:
            out = self._forward(x, samples, reconstruction, objects)
        if as_numpy:
            return {k: v.cpu().numpy() for k, v in out.items()}
        return out

    def _forward(self, x: Tensor, samples: int, reconstruction: bool, objects: bool = False) -> dict[str, Tensor]:
        xn = self.normalise(x)
        out: dict[str, Tensor] = {}
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            rec = maps = None
            infer = getattr(self.net, "infer", None)
            if infer is not None:
                # One encoder pass for the classes, the samples, the reconstruction and the maps.
                logits, rec, maps = infer(xn, samples=samples, reconstruction=reconstruction, objects=objects)
            elif samples > 0 and self.supports_samples:
                logits = self.net.sample_logits(xn, samples)  # type: ignore[operator]  # torch types Module attributes Tensor | Module
            else:
                logits = self.net(xn)
            if reconstruction and rec is None:
                rec = self.net.reconstruct(xn)  # type: ignore[operator]  # torch types Module attributes Tensor | Module
            logits = logits.float()
            if logits.ndim == 5:  # (samples, B, K, H, W)
                p = logits.softmax(dim=2)
                out["probs"] = p.mean(0)
                out["expected_entropy"] = _entropy_in_place(p, dim=2).mean(0)
            else:
                out["probs"] = logits.softmax(dim=1)
                if samples > 0:
                    # A deterministic model: every sample is the same, so no mutual information.
                    out["expected_entropy"] = entropy(out["probs"], dim=1)
            if rec is not None:
                out["reconstruction_error"] = ((rec.float() - xn) ** 2).mean(1)
            if maps is not None:
                out["object_maps"] = maps.float().sigmoid()
        return out


def entropy(p: Tensor, dim: int = 1) -> Tensor:
    """Shannon entropy in nats along ``dim``."""
    return -(p * torch.log(p.clamp_min(1e-12))).sum(dim)


def _entropy_in_place(p: Tensor, dim: int) -> Tensor:
    """:func:`entropy` with one temporary, overwritten in place (no autograd): the same values
    bit for bit. With 8 samples ``p`` is (8, B, K, H, W), 70 MB for one 560² tile of 7
    classes, and every fresh tensor of that size costs its page faults again."""
    t = p.clamp_min(1e-12)
    t.log_()
    t.mul_(p)
    return t.sum(dim).neg_()
