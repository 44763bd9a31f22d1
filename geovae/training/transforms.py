"""Sample transforms for TorchGeo samples (picklable, for DataLoader workers), batch merging, D4 augmentation.

A TorchGeo sample is a dict with ``image`` (C, H, W), ``mask`` (H, W), ``bounds`` and
``transform``. The transforms here turn raw label values into class indices, hide labels
that belong to another part of the scene, and give unlabelled scenes an all-ignore mask.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["IGNORE_INDEX", "AddIgnoreMask", "Compose", "IgnoreOutside", "RemapMask", "augment_d4", "merge_batches"]

#: Mask value of pixels that carry no label (PyTorch's cross-entropy default).
IGNORE_INDEX = -100


class RemapMask:
    """Sample transform: raw label values -> channel indices; everything else -> ignore.

    Args:
        lookup: ``{raster value: channel index}``.
        ignore_index: value for unlabelled pixels.
    """

    def __init__(self, lookup: Mapping[int, int], ignore_index: int = IGNORE_INDEX) -> None:
        self.max_id = max(lookup)
        self.min_id = min(min(lookup), 0)
        lut = torch.full((self.max_id - self.min_id + 1,), ignore_index, dtype=torch.long)
        for raw, idx in lookup.items():
            lut[raw - self.min_id] = idx
        self.lut = lut
        self.ignore_index = ignore_index

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        m = sample["mask"].long()
        inside = (m >= self.min_id) & (m <= self.max_id)
        out = torch.full_like(m, self.ignore_index)
        out[inside] = self.lut[m[inside] - self.min_id]
        sample["mask"] = out
        return sample


class IgnoreOutside:
    """Sample transform: labels outside a box become ``ignore_index``.

    Validation patches from :class:`~torchgeo.samplers.GriddedPatchSampler` are centred on
    the validation region and overhang it by up to half a patch; without this, pixels of the
    training region would be scored as validation.

    Args:
        box: (left, bottom, right, top) in CRS units.
        ignore_index: value for masked pixels.
    """

    def __init__(self, box: tuple[float, float, float, float], ignore_index: int = IGNORE_INDEX) -> None:
        self.box = box
        self.ignore_index = ignore_index

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        m = sample["mask"]
        b = sample["bounds"]  # [xmin, xmax, xres, ymin, ymax, yres, ...]
        h, w = m.shape[-2:]
        xres, yres = float(b[2]), float(b[5])
        xs = float(b[0]) + (torch.arange(w, dtype=torch.float64) + 0.5) * xres
        ys = float(b[4]) - (torch.arange(h, dtype=torch.float64) + 0.5) * yres
        l, bo, r, t = self.box
        inside = ((ys >= bo) & (ys <= t))[:, None] & ((xs >= l) & (xs <= r))[None, :]
        sample["mask"] = torch.where(inside, m, torch.full_like(m, self.ignore_index))
        return sample


class AddIgnoreMask:
    """Sample transform for unlabelled scenes: a mask that is ``ignore_index`` everywhere."""

    def __init__(self, ignore_index: int = IGNORE_INDEX) -> None:
        self.ignore_index = ignore_index

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        img = sample["image"]
        sample["mask"] = torch.full(img.shape[-2:], self.ignore_index, dtype=torch.long)
        return sample


class Compose:
    """Apply sample transforms in order (picklable, for DataLoader workers)."""

    def __init__(self, *fns: Any) -> None:
        self.fns = [f for f in fns if f is not None]

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        for f in self.fns:
            sample = f(sample)
        return sample


def merge_batches(batch: Any) -> dict[str, Tensor]:
    """Flatten a CombinedLoader batch ``{"labeled": b1, "unlabeled": b2}`` into one batch.

    A plain TorchGeo batch (a dict with ``image``) passes through unchanged.

    Args:
        batch: a batch from :class:`~geovae.training.SceneDataModule` or any TorchGeo data module.

    Returns:
        One batch with ``image`` and ``mask`` (and whatever else both parts share).
    """
    if isinstance(batch, (list, tuple)) and len(batch) == 3 and isinstance(batch[0], dict):
        batch = batch[0]  # CombinedLoader in some modes yields (batch, batch_idx, dataloader_idx)
    if isinstance(batch, dict) and "image" not in batch and batch:
        parts = [b for b in batch.values() if isinstance(b, dict) and "image" in b]
        keys = set.intersection(*(set(p) for p in parts))
        # Only keys of one shape per sample join: an IntersectionDataset's ``bounds`` hold
        # both datasets' boxes (18 numbers) where an image-only dataset's hold 9.
        return {
            k: torch.cat([p[k] for p in parts])
            for k in keys
            if all(isinstance(p[k], Tensor) and p[k].shape[1:] == parts[0][k].shape[1:] for p in parts)
        }
    return batch


def augment_d4(image: Tensor, mask: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Each patch flipped and turned by one of the 8 symmetries of the square, at random.

    Land cover seen from above has no preferred orientation; the same symmetry is applied to
    the patch's bands, labels and valid map. Square patches only (non-square are returned
    unchanged).

    Args:
        image: (B, C, H, W).
        mask: (B, H, W).
        valid: (B, H, W).

    Returns:
        The transformed ``(image, mask, valid)``.
    """
    if image.shape[-1] != image.shape[-2]:
        return image, mask, valid
    b = image.shape[0]
    turns = torch.randint(0, 4, (b,)).tolist()
    flips = torch.randint(0, 2, (b,)).tolist()
    xs, ms, vs = [], [], []
    for i in range(b):
        x, m, v = image[i], mask[i], valid[i]
        if flips[i]:
            x, m, v = x.flip(-1), m.flip(-1), v.flip(-1)
        if turns[i]:
            x, m, v = (torch.rot90(t, turns[i], (-2, -1)) for t in (x, m, v))
        xs.append(x)
        ms.append(m)
        vs.append(v)
    return torch.stack(xs), torch.stack(ms), torch.stack(vs)
