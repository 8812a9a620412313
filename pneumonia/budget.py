"""TimeBudget: fit a training run into a wall-clock budget by choosing its number of epochs
from the first epoch's measured time, so one recipe fits CPUs of different speeds."""

from __future__ import annotations

import logging
import math
from time import monotonic
from typing import Any

import lightning as L

from pneumonia.errors import ConfigError

log = logging.getLogger(__name__)


class TimeBudget(L.Callback):
    """After the first epoch (training and validation), lower `max_epochs` to the number of
    epochs of that length that fit in `minutes` (at least one, never more than configured) and
    shorten a cosine schedule to end with them. The choice is kept in checkpoints, so a resumed
    run trains the same epochs; the log and MLflow (`time_budget/*` params) say what it chose."""

    def __init__(self, minutes: float):
        if not minutes > 0:
            raise ConfigError(f"callbacks.time_budget.minutes={minutes} must be positive")
        self.minutes = float(minutes)
        self.epochs: int | None = None
        self._started = 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epochs = state_dict["epochs"]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.epochs is not None:  # resumed after the choice
            trainer.fit_loop.max_epochs = self.epochs

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == 0:
            self._started = monotonic()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after validation, and before the checkpoint callbacks (Lightning calls them last), so
        # epoch 0's checkpoints already carry the choice
        if self.epochs is not None or trainer.current_epoch != 0:
            return
        seconds = monotonic() - self._started
        fit = max(1, math.floor(self.minutes * 60 / seconds))
        configured = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else fit
        self.epochs = int(trainer.strategy.broadcast(min(configured, fit), src=0))
        trainer.fit_loop.max_epochs = self.epochs
        for config in trainer.lr_scheduler_configs:
            _shorten_cosine(config.scheduler, self.epochs)
        log.info("Time budget %.1f min: the first epoch took %.0f s, so %d of %d epochs",
                 self.minutes, seconds, self.epochs, configured)
        if trainer.logger:
            trainer.logger.log_hyperparams({"time_budget/minutes": self.minutes,
                                            "time_budget/first_epoch_seconds": round(seconds, 1),
                                            "time_budget/epochs": self.epochs})


def _shorten_cosine(scheduler: Any, epochs: int) -> None:
    """A cosine schedule's period set to `epochs`, its current learning rates recomputed in
    closed form (Lightning has already stepped it for the epoch that ended)."""
    if not hasattr(scheduler, "T_max") or not hasattr(scheduler, "eta_min"):
        return
    scheduler.T_max = epochs
    progress = math.cos(math.pi * scheduler.last_epoch / epochs)
    lrs = [scheduler.eta_min + (base - scheduler.eta_min) * (1 + progress) / 2
           for base in scheduler.base_lrs]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs
