"""TimeBudget: fit a training job into a wall-clock budget by choosing its number of epochs
from the first epoch's measured time, so one recipe fits CPUs of different speeds."""

from __future__ import annotations

import logging
import math
from time import monotonic
from typing import Any

import lightning as L
import torch

from pneumonia.errors import ConfigError
from pneumonia.ood import MAX_FIT_IMAGES

log = logging.getLogger(__name__)


class TimeBudget(L.Callback):
    """Fits the whole job into `minutes`: start-up before training (counted from this callback's
    creation, which train() does before any data is read), the epochs, and the work after
    training (scoring the best checkpoint in fp32 on validation and, in stage 1, fitting the
    out-of-distribution gate). After the first epoch (training and validation) it lowers
    `max_epochs` to the number of such epochs that fit beside the time already spent and the
    time that work will take (images to score x the fp32 seconds per image measured on one
    batch), at least one and never more than configured, and shortens a cosine schedule to end
    with them. The choice is kept in checkpoints, so a resumed run trains the same epochs; the
    log and MLflow (`time_budget/*` params) say what it chose and why."""

    def __init__(self, minutes: float):
        if not minutes > 0:
            raise ConfigError(f"callbacks.time_budget.minutes={minutes} must be positive")
        self.minutes = float(minutes)
        self.epochs: int | None = None
        self._job_started = monotonic()
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
        epoch = monotonic() - self._started
        before = self._started - self._job_started
        after = _after_training_seconds(trainer, pl_module)
        fit = max(1, math.floor((self.minutes * 60 - before - after) / epoch))
        configured = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else fit
        self.epochs = int(trainer.strategy.broadcast(min(configured, fit), src=0))
        trainer.fit_loop.max_epochs = self.epochs
        for config in trainer.lr_scheduler_configs:
            _shorten_cosine(config.scheduler, self.epochs)
        log.info("Time budget %.1f min for the whole job: %.0f s before training, %.0f s per "
                 "epoch, about %.0f s after training, so %d of %d epochs", self.minutes, before,
                 epoch, after, self.epochs, configured)
        if trainer.logger:
            trainer.logger.log_hyperparams({"time_budget/minutes": self.minutes,
                                            "time_budget/before_training_seconds": round(before),
                                            "time_budget/first_epoch_seconds": round(epoch, 1),
                                            "time_budget/after_training_seconds": round(after),
                                            "time_budget/epochs": self.epochs})


def _after_training_seconds(trainer: L.Trainer, pl_module: L.LightningModule) -> float:
    """What train() does after fitting, in seconds: the best checkpoint scored in fp32 on the
    validation split and, in stage 1, the out-of-distribution gate fitted on up to
    MAX_FIT_IMAGES training and all validation images; timed on a batch in fp32."""
    data = getattr(trainer, "datamodule", None)
    if data is None or not hasattr(data, "splits") or not hasattr(data, "preprocessing"):
        return 0.0
    images = len(data.splits["val"])
    if pl_module.hparams.get("stage") == "binary":
        images += len(data.splits["val"]) + min(len(data.splits["train"]), MAX_FIT_IMAGES)
    size, batch = data.preprocessing.image_size, data.batch_size
    x = torch.randn(batch, 1, size, size, device=pl_module.device)
    was_training = pl_module.training
    pl_module.eval()
    timings = []
    with torch.inference_mode(), torch.autocast(x.device.type, enabled=False):
        pl_module(x)  # the first call warms up
        for _ in range(3):  # the median of three: one call can meet a busy moment
            started = monotonic()
            pl_module(x)
            timings.append(monotonic() - started)
    pl_module.train(was_training)
    return sorted(timings)[1] / batch * images


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
