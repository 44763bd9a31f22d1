"""The model loop of a run: a scene's tiles read, predicted and blended, as a block source.

A background thread reads the tiles in the blocks' order (:mod:`geovae.segment.reader`); the
main thread runs the model on each batch and blends its outputs (:class:`~geovae.blend.Blender`),
handing every block on as soon as it is complete. On CUDA one batch is in flight: batch n+1
is queued on the device, with its copy back into pinned host memory, before batch n is
blended, so the GPU computes while the CPU blends and the sinks write.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from geovae import signals
from geovae.blend import Blender
from geovae.blocks import Block
from geovae.model.base import SegmentationModel
from geovae.segment.progress import Progress
from geovae.segment.reader import READ_WINDOW_BYTES, Batch, Reader, read_groups
from geovae.segment.spec import RunSpec

__all__ = ["SAMPLE_SEED", "Buffering", "PredictedBlocks", "blender", "buffering"]

log = logging.getLogger("geovae.segment")

#: Seed of the latent noise a run draws its samples with.
SAMPLE_SEED = 0


def _predict(
    model: SegmentationModel, x: torch.Tensor, samples: int, reconstruction: bool, tta: bool, objects: bool
) -> dict[str, torch.Tensor]:
    """Model outputs for one batch; with ``tta`` the mean over identity, h-flip and v-flip."""
    x = x.to(model.device, non_blocking=True)
    # ``objects`` only when asked: a subclass's own predict() without it keeps working.
    kw: dict[str, Any] = {"objects": True} if objects else {}
    out = model.predict(x, samples=samples, reconstruction=reconstruction, **kw)
    if tta:
        for dim in (-1, -2):
            o = model.predict(x.flip(dim), samples=samples, reconstruction=reconstruction, **kw)
            for k, v in o.items():
                out[k] = out[k] + v.flip(dim)  # every output has H, W as its last two dims
        out = {k: v / 3.0 for k, v in out.items()}
    return out


@dataclass
class _InFlight:
    batch: Batch
    outputs: dict[str, torch.Tensor]  # on the host (possibly still being copied)
    done: Any  # a CUDA event marking the end of the copy, or None on the CPU


def _launch(
    model: SegmentationModel, batch: Batch, samples: int, reconstruction: bool, tta: bool, objects: bool
) -> _InFlight:
    """Queue one batch on the device and its copy back to the host; does not wait on CUDA."""
    if batch.x is None:
        return _InFlight(batch, {}, None)
    o = _predict(model, batch.x, samples, reconstruction, tta, objects)
    if model.device.type != "cuda":
        return _InFlight(batch, {k: v.float() for k, v in o.items()}, None)
    host = {}
    for k, v in o.items():
        buf = torch.empty(v.shape, dtype=torch.float32, pin_memory=True)
        buf.copy_(v.float(), non_blocking=True)  # asynchronous into pinned memory
        host[k] = buf
    done = torch.cuda.Event()
    done.record()
    return _InFlight(batch, host, done)


def _wait(f: _InFlight) -> float:
    """Wait for a batch's outputs to reach the host; the seconds spent waiting on the device."""
    t0 = time.perf_counter()
    if f.done is not None:
        f.done.synchronize()
    return time.perf_counter() - t0


def _blend(f: _InFlight, blender: Blender) -> Iterator[Block]:
    """Blend a batch's outputs in; each block the batch completes, as soon as it is complete."""
    res = {k: v.numpy() for k, v in f.outputs.items()}
    n = 0
    for t, run in f.batch.entries:
        if not run:
            yield from blender.skip(t)
            continue
        yield from blender.add(
            t,
            f.batch.valid[n],
            res["probs"][n],
            expected_entropy=res["expected_entropy"][n] if "expected_entropy" in res else None,
            reconstruction_error=res["reconstruction_error"][n] if "reconstruction_error" in res else None,
            object_maps=res["object_maps"][n] if "object_maps" in res else None,
        )
        n += 1


class Buffering(NamedTuple):
    """How much a run keeps in flight around its model (:func:`buffering`).

    Attributes:
        prefetch: batches the reader keeps ready.
        window_bytes: most bytes of one read window (:func:`~geovae.segment.reader.read_groups`).
        polygon_blocks: output blocks that may wait for the polygon worker.
    """

    prefetch: int
    window_bytes: int
    polygon_blocks: int


def buffering(device: torch.device) -> Buffering:
    """What a run on ``device`` keeps in flight before and after its model.

    On a CPU the model is the slow stage by far (reading is about 5 % of a run, on a thread of
    its own, and the polygon worker keeps up), so anything queued before or after it only
    holds memory; on a long run those queues are full all the time, so what they hold is
    memory a small scene never needs. With one batch ready, 8 MiB read windows (a 768-pixel
    tile of 3 bands is then read alone: its overlap with the next tile is decoded twice),
    one block waiting for the polygon worker and GDAL's cache at 16 MiB, a 2041 x 14880 mosaic
    of the Parana scene peaks about 55 MiB lower (1304-1314 against 1341-1396 MiB, 6 runs
    each), the scene itself the same (docs/benchmarks.md, issue 29). On a GPU the reader and
    the polygon worker must keep up with a fast model, so they keep more ahead.
    """
    if device.type == "cuda":
        return Buffering(prefetch=3, window_bytes=READ_WINDOW_BYTES, polygon_blocks=2)
    return Buffering(prefetch=1, window_bytes=8 * 2**20, polygon_blocks=1)


class PredictedBlocks:
    """The block source of a scene: its tiles read, run through the model and blended into
    blocks (:class:`~geovae.blend.Blender`), yielded in write order as they complete."""

    def __init__(self, spec: RunSpec, blender: Blender, timings: dict[str, float]):
        self.spec = spec
        self.blender = blender
        self.timings = timings

    def summary(self) -> dict[str, Any]:
        """The run report's ``tiles`` entry (:meth:`~geovae.blend.Blender.summary`)."""
        return self.blender.summary()

    def __iter__(self) -> Generator[Block]:
        spec, blender, timings = self.spec, self.blender, self.timings
        opts, model = spec.options, spec.model
        t0 = time.perf_counter()
        model_s = 0.0
        pin = model.device.type == "cuda"
        mean = np.asarray(model.info.mean, dtype=np.float32)
        total = blender.blocks.tiles_total
        buf = buffering(model.device)
        groups = read_groups(list(blender.blocks.block_tiles()), spec.scene.count, buf.window_bytes)
        # Latent samples come from a fixed seed, so the same command gives the same outputs; the
        # caller's own random state is left as it was.
        devices = [model.device.index or 0] if model.device.type == "cuda" else []
        with (
            torch.random.fork_rng(devices=devices),
            Reader(spec.scene, groups, spec.batch_size, mean, pin, prefetch=buf.prefetch) as reader,
            Progress(total, opts.progress, f"segment {spec.stem}") as bar,
        ):
            torch.manual_seed(SAMPLE_SEED)
            # One batch in flight: batch n+1 is queued on the device before batch n is
            # blended, so on CUDA the GPU computes while the CPU blends and writes. Blending
            # stays on this thread: on 2 cores a blending thread beside the CPU model contends
            # with torch's threads and uses more CPU seconds for no clear gain.
            pending: _InFlight | None = None
            for batch in reader:
                signals.check()
                tm = time.perf_counter()
                launched = _launch(model, batch, spec.samples, spec.reconstruction, opts.tta, spec.object_maps)
                model_s += time.perf_counter() - tm
                if pending is not None:
                    model_s += _wait(pending)
                    yield from _blend(pending, blender)
                    bar.advance(len(pending.batch.entries))
                pending = launched
            if pending is not None:
                model_s += _wait(pending)
                yield from _blend(pending, blender)
                bar.advance(len(pending.batch.entries))
            yield from blender.finish()
            timings["read_s"] = reader.read_s
        timings["model_s"] = model_s
        timings["predict_s"] = time.perf_counter() - t0
        log.info(
            "%s: %d tiles predicted and blended in %.1f s (model %.1f s)",
            spec.stem,
            total,
            timings["predict_s"],
            model_s,
        )


def blender(spec: RunSpec) -> Blender:
    """The blender of a run: the spec's block grid, the outputs it asks for."""
    return Blender(
        spec.blocks,
        spec.info,
        uncertainty=spec.samples > 0,
        reconstruction=spec.reconstruction,
        probabilities=spec.probabilities,
        maps=len(spec.objects.maps) if spec.objects is not None else 0,
    )
