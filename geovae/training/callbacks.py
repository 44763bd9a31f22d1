"""Lightning callbacks: what happens around the optimisation steps rather than inside the loss.

The task asks for the ones its arguments select (:meth:`VAESegmentationTask.configure_callbacks
<geovae.training.VAESegmentationTask.configure_callbacks>`), so they act under any trainer,
``torchgeo fit`` included: :class:`WeightEMA` (``ema``), :class:`FreezeEncoder`
(``freeze_encoder``, ``unfreeze_after``). :func:`~geovae.training.fit.fit_and_save`
adds the run's own: :class:`History`, :class:`StopIfNotFinite` and :class:`StopOnRequest`.
"""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from geovae import signals
from geovae.errors import OptionError, TrainingError

__all__ = ["FreezeEncoder", "History", "StopIfNotFinite", "StopOnRequest", "WeightEMA"]


class WeightEMA(pl.Callback):
    """An exponential moving average of the model's weights and BatchNorm statistics.

    Updated after every optimisation step; at the end of training the model gets the
    average (the model file holds it). It acts like an ensemble of the last
    ``1 / (1 - decay)`` steps' models at the cost of one. Checkpoints written during
    training hold the live weights.

    Args:
        decay: the average's decay per step, in [0, 1).
    """

    def __init__(self, decay: float) -> None:
        self.decay = float(decay)
        self._avg: dict[str, Tensor] | None = None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Fold the weights after this step into the average."""
        state = _model(pl_module).state_dict()
        avg = self._avg
        if avg is None:
            self._avg = {k: v.detach().clone() for k, v in state.items()}
            return
        # The usual warm-up of the decay: early steps are not averaged over a long past.
        step = int(trainer.global_step)
        d = min(self.decay, (1.0 + step) / (10.0 + step))
        with torch.no_grad():
            for k, v in state.items():
                if v.dtype.is_floating_point:
                    avg[k].mul_(d).add_(v.detach(), alpha=1.0 - d)
                else:
                    avg[k].copy_(v)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Put the average into the model."""
        if self._avg is not None:
            _model(pl_module).load_state_dict(self._avg)
            self._avg = None


class FreezeEncoder(pl.Callback):
    """Keeps the model's encoder fixed, for the whole run or until epoch ``unfreeze_after``.

    While frozen, the encoder's parameters take no gradient (AdamW skips a parameter
    without one, weight decay included) and its BatchNorm layers stay in eval mode (Lightning
    restores each module's mode after validation), so their running statistics are not
    moved either: the encoder is in the model file as loaded. From epoch ``unfreeze_after``
    (0-based: after that many epochs) it trains with the rest, in the same optimiser at its
    current learning rate.

    Args:
        unfreeze_after: the epoch to unfreeze at; None: never.
    """

    def __init__(self, unfreeze_after: int | None = None) -> None:
        self.unfreeze_after = unfreeze_after

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse an ``unfreeze_after`` the run never reaches (the encoder would never train).

        Raises:
            OptionError: ``unfreeze_after`` is not below the trainer's ``max_epochs``.
        """
        epochs = trainer.max_epochs
        if self.unfreeze_after is not None and epochs is not None and 0 <= epochs <= self.unfreeze_after:
            raise OptionError(
                f"model.unfreeze_after {self.unfreeze_after} with trainer.max_epochs {epochs}: the encoder "
                f"would never train; give model.unfreeze_after fewer than {epochs}, or model.freeze_encoder alone"
            )

    def frozen(self, epoch: int) -> bool:
        """Whether the encoder is frozen during ``epoch`` (0-based)."""
        return self.unfreeze_after is None or epoch < self.unfreeze_after

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Freeze or unfreeze the encoder for this epoch."""
        frozen = self.frozen(trainer.current_epoch)
        encoder = _model(pl_module).encoder
        assert isinstance(encoder, nn.Module)
        for p in encoder.parameters():
            p.requires_grad_(not frozen)
        encoder.train(pl_module.training and not frozen)


def _model(pl_module: pl.LightningModule) -> nn.Module:
    model = pl_module.model
    assert isinstance(model, nn.Module)
    return model


class History(pl.Callback):
    """Keeps every epoch's logged scalars (Lightning's loggers are off in library use)."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Record the epoch's scalars and the seconds since the start."""
        row = {"epoch": float(trainer.current_epoch), "seconds": time.perf_counter() - self._t0}
        for k, v in trainer.callback_metrics.items():
            if isinstance(v, Tensor) and v.numel() == 1:
                row[k] = float(v)
        self.epochs.append(row)


class StopOnRequest(pl.Callback):
    """Ctrl-C and SIGTERM under the CLI only set a flag (:mod:`geovae.signals`): checked at
    every batch, so a training run stops within one step."""

    def on_train_batch_start(self, *args: Any) -> None:
        """Raise the requested interruption."""
        signals.check()

    def on_validation_batch_start(self, *args: Any) -> None:
        """Raise the requested interruption."""
        signals.check()


class StopIfNotFinite(pl.Callback):
    """Stops a run whose loss is NaN or infinite, before the backward pass can spread it
    into the weights: such a model would segment every pixel as one class at confidence NaN."""

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        """Raise :class:`~geovae.errors.TrainingError` on a non-finite loss.

        Raises:
            TrainingError: the loss is NaN or infinite; nothing is written.
        """
        if bool(torch.isfinite(loss.detach()).all()):
            return
        value = float(loss.detach().float().flatten()[0])
        raise TrainingError(
            f"training stopped at step {trainer.global_step + 1} (epoch {trainer.current_epoch + 1}): the loss became "
            f"{value}; no model was written; try a lower learning rate or loss weights (--adversarial, model.lr, "
            "model.beta), or check the image for extreme values"
        )
