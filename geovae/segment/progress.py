"""The progress bars of a run (rich), or nothing when progress is off."""

from __future__ import annotations

import time

__all__ = ["Progress", "set_total"]


class Progress:
    """A rich progress bar with a rate, or nothing."""

    def __init__(self, total: int, enabled: bool, label: str, unit: str = "tiles"):
        self.bar = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]} " + unit + "/s"),
                TimeRemainingColumn(),
                transient=False,
            )
            self.task = self.bar.add_task(label, total=total, rate="-")
        self.t0 = time.perf_counter()
        self.done = 0

    def __enter__(self) -> Progress:
        if self.bar is not None:
            self.bar.start()
        return self

    def advance(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.update(self.task, advance=n, rate=f"{rate:.1f}")

    def update(self, done: int, total: int) -> None:
        """Set the bar to ``done`` of ``total`` (for stages that report their own position)."""
        self.advance(done - self.done)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


def set_total(bar: Progress, done: int, total: int) -> None:
    """Set the bar to ``done`` of a ``total`` that may still grow (a stage's own estimate)."""
    if bar.bar is not None:
        bar.bar.update(bar.task, total=total)
    bar.update(done, total)
