"""Reading a scene's tiles in a background thread, in the order the blocks are blended.

GDAL releases the GIL while it decodes, so a few threads read windows in parallel while the
main thread runs the model; a bounded queue holds the batches in between, which bounds
memory. Each window holds several tiles (the tiles of one output block, or a few tile rows
of it), so the pixels neighbouring tiles share are decoded once.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np
import torch
from rasterio.windows import Window

from geovae.cpu import available_cores, helper_threads, lower_priority
from geovae.scene import Scene
from geovae.tiling import Tile

__all__ = ["READ_WINDOW_BYTES", "Batch", "Reader", "read_groups"]


@dataclass
class Batch:
    entries: list[tuple[Tile, bool]]  # every tile in block order; False = skipped (all nodata)
    x: torch.Tensor | None  # (n_run, C, T, T) raw values, nodata filled with band means
    valid: list[np.ndarray]  # one (T, T) mask per run tile


#: Most bytes of one read window (float32, every band): a window holds several tiles. A CPU
#: run reads smaller windows (:func:`geovae.segment.predict.buffering`).
READ_WINDOW_BYTES = 16 * 2**20


def read_groups(blocks: Sequence[Sequence[Tile]], count: int, budget: int = READ_WINDOW_BYTES) -> list[list[Tile]]:
    """Split each block's tiles into rectangles of tiles read as one window.

    Neighbouring tiles share ``overlap`` pixels; read one by one, those pixels are decoded
    ~1.8x at the defaults. A window per block (or per few tile rows of it, to stay within
    ``budget`` bytes) decodes them once, leaving only the halo between blocks read twice.
    A tile row wider than the budget is cut into runs of columns.
    """
    groups: list[list[Tile]] = []
    for tiles in blocks:
        if not tiles:
            continue
        T = tiles[0].size
        rows: dict[int, list[Tile]] = {}
        for t in tiles:  # tiles of a block come row by row, every row over the same columns
            rows.setdefault(t.row, []).append(t)
        cur: list[Tile] = []
        for row in rows.values():
            width = row[-1].col + T - row[0].col
            if cur and (row[0].row + T - cur[0].row) * width * count * 4 > budget:
                groups.append(cur)
                cur = []
            if T * width * count * 4 <= budget:
                cur.extend(row)
                continue
            run: list[Tile] = []
            for t in row:
                if run and T * (t.col + T - run[0].col) * count * 4 > budget:
                    groups.append(run)
                    run = []
                run.append(t)
            groups.append(run)
        if cur:
            groups.append(cur)
    return groups


class Reader:
    """Reads tiles in order with a few threads and hands out batches through a bounded queue.

    Tiles are read a window at a time (``groups``, from :func:`read_groups`: the tiles of one
    output block, or a few of its tile rows), so pixels shared by overlapping tiles are decoded once; each
    window is filled (:meth:`Scene.fill_missing`) and cut into its tiles. GDAL releases the
    GIL while it decodes, so ``workers`` threads (each with its own dataset handle, see
    :meth:`Scene.dataset`) read windows in parallel; results are consumed in tile order, at
    most ``workers * 2`` windows ahead. The queue holds at most ``prefetch`` batches, which
    bounds memory; on CUDA the batch tensors are in pinned memory so the copy to the device
    is asynchronous.

    Args:
        groups: the tiles in order, one list per read window (:func:`read_groups`).
    """

    def __init__(
        self,
        scene: Scene,
        groups: list[list[Tile]],
        batch_size: int,
        mean: np.ndarray,
        pin: bool,
        prefetch: int = 3,
        workers: int | None = None,
    ):
        self.scene = scene
        self.groups = groups
        self.batch_size = batch_size
        self.mean = mean.astype(np.float32)
        self.pin = pin
        # Up to 4 readers on a quiet machine, fewer where other work holds the cores (geovae.cpu).
        self.workers = workers or helper_threads(max(1, min(4, available_cores() // 2)))
        self.q: queue.Queue[Any] = queue.Queue(maxsize=prefetch)
        self.stop = threading.Event()
        self.read_s = 0.0
        self.thread = threading.Thread(target=self._run, name="geovae-reader", daemon=True)

    def __enter__(self) -> Reader:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        while self.thread.is_alive():
            try:  # unblock a producer waiting on a full queue
                self.q.get_nowait()
            except queue.Empty:
                pass
            self.thread.join(timeout=0.05)

    def _put(self, item: Any) -> bool:
        while not self.stop.is_set():
            try:
                self.q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _new_x(self, n: int, c: int, t: int) -> torch.Tensor:
        return torch.empty((n, c, t, t), dtype=torch.float32, pin_memory=self.pin)

    def _read(self, group: list[Tile]) -> tuple[np.ndarray, np.ndarray, float]:
        t0 = time.perf_counter()
        r0, c0 = group[0].row, group[0].col
        T = group[0].size
        win = Window(c0, r0, max(t.col for t in group) + T - c0, group[-1].row + T - r0)
        data, valid = self.scene.read(win)
        # Band means make nodata look like "average ground" to the model, so it does not
        # pollute the valid neighbours it sees through the receptive field; a band gap at a
        # valid pixel gets its band's mean too, not the raw nodata value.
        self.scene.fill_missing(data, valid, self.mean)
        return data, valid, time.perf_counter() - t0

    def _windows(self) -> Iterator[tuple[list[Tile], np.ndarray, np.ndarray]]:
        """Windows read ahead by the pool, yielded in order."""
        if self.workers == 1:
            for g in self.groups:
                data, valid, dt = self._read(g)
                self.read_s += dt
                yield g, data, valid
            return
        pending: deque[tuple[list[Tile], Future[tuple[np.ndarray, np.ndarray, float]]]] = deque()
        it = iter(self.groups)
        with ThreadPoolExecutor(self.workers, thread_name_prefix="geovae-read", initializer=lower_priority) as pool:
            try:
                for g in islice(it, self.workers * 2):
                    pending.append((g, pool.submit(self._read, g)))
                while pending:
                    g, fut = pending.popleft()
                    nxt = next(it, None)
                    if nxt is not None:
                        pending.append((nxt, pool.submit(self._read, nxt)))
                    data, valid, dt = fut.result()
                    self.read_s += dt
                    yield g, data, valid
            finally:
                for _, f in pending:
                    f.cancel()

    def _ordered(self) -> Iterator[tuple[Tile, np.ndarray, np.ndarray]]:
        """Tiles in order, cut out of their windows.

        The data are views, copied into the batch tensor; the masks are copies, since a batch
        keeps them until it is blended and a view would keep the whole window alive.
        """
        for g, data, valid in self._windows():
            r0, c0 = g[0].row, g[0].col
            for t in g:
                r, c = t.row - r0, t.col - c0
                yield t, data[:, r : r + t.size, c : c + t.size], valid[r : r + t.size, c : c + t.size].copy()

    def _run(self) -> None:
        lower_priority()  # the model's threads first (geovae.cpu)
        try:
            c = self.scene.count
            entries: list[tuple[Tile, bool]] = []
            bufs: list[np.ndarray] = []
            valids: list[np.ndarray] = []
            for t, data, valid in self._ordered():
                if self.stop.is_set():
                    return
                if not valid.any():
                    entries.append((t, False))
                    continue
                entries.append((t, True))
                bufs.append(data)
                valids.append(valid)
                if len(bufs) == self.batch_size:
                    if not self._emit(entries, bufs, valids, c):
                        return
                    entries, bufs, valids = [], [], []
            if entries and not self._emit(entries, bufs, valids, c):
                return
            self._put(None)
        except BaseException as exc:  # handed to the main thread, which re-raises it
            self._put(exc)
        finally:
            self.scene.close()

    def _emit(self, entries: list[tuple[Tile, bool]], bufs: list[np.ndarray], valids: list[np.ndarray], c: int) -> bool:
        x = None
        if bufs:
            x = self._new_x(len(bufs), c, bufs[0].shape[-1])
            # Tile by tile: np.stack would build a second copy of the batch first.
            xn = x.numpy()
            for i, b in enumerate(bufs):
                xn[i] = b
        return self._put(Batch(entries, x, valids))

    def __iter__(self) -> Iterator[Batch]:
        while True:
            item = self.q.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
