"""TimeBudget chooses the epochs that fit the whole job from the time before training, the first
epoch's time and the work after training, shortens the cosine schedule to match, and a run
resumed from its first checkpoint keeps the choice."""

import itertools
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel

from pneumonia import budget
from pneumonia.budget import TimeBudget
from tests.conftest import compose_train

BASE_LR = 0.1


class CosineModel(BoringModel):
    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=BASE_LR)
        return [optimizer], [torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=self.trainer.max_epochs)]


class LearningRates(L.Callback):
    def __init__(self):
        self.seen = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.seen.append(trainer.optimizers[0].param_groups[0]["lr"])


def _fake_clock(monkeypatch, epoch_seconds: float) -> None:
    """The clock TimeBudget reads: each reading epoch_seconds after the one before (its creation,
    the first epoch's start and end: so epoch_seconds of start-up, then an epoch as long)."""
    readings = itertools.count()
    monkeypatch.setattr(budget, "monotonic", lambda: next(readings) * epoch_seconds)


def _fit(tmp_path, minutes: float, max_epochs: int = 6, ckpt_path=None):
    rates, every_epoch = LearningRates(), ModelCheckpoint(dirpath=tmp_path, filename="{epoch}",
                                                          save_top_k=-1)
    trainer = L.Trainer(max_epochs=max_epochs, callbacks=[TimeBudget(minutes), rates, every_epoch],
                        limit_train_batches=2, limit_val_batches=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(CosineModel(), ckpt_path=ckpt_path)
    return trainer, rates.seen


def _cosine(epoch: int, period: int) -> float:
    return BASE_LR * (1 + math.cos(math.pi * epoch / period)) / 2


def test_epochs_fit_the_budget_and_the_schedule_ends_with_them(monkeypatch, tmp_path):
    _fake_clock(monkeypatch, epoch_seconds=30)
    trainer, rates = _fit(tmp_path, minutes=2)  # 30 s start-up, three 30 s epochs: 120 s
    assert trainer.current_epoch == 3
    assert rates == pytest.approx([_cosine(e, 3) for e in range(3)])  # not the 6-epoch cosine
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("epoch_seconds, epochs", [(1, 6), (600, 1)])
def test_never_more_than_configured_and_at_least_one_epoch(monkeypatch, tmp_path, epoch_seconds,
                                                          epochs):
    _fake_clock(monkeypatch, epoch_seconds)
    trainer, _ = _fit(tmp_path, minutes=1.5)
    assert trainer.current_epoch == epochs


def test_the_work_after_training_is_counted(monkeypatch, tmp_path):
    _fake_clock(monkeypatch, epoch_seconds=30)
    monkeypatch.setattr(budget, "_after_training_seconds", lambda trainer, module: 30.0)
    trainer, _ = _fit(tmp_path, minutes=2)  # 30 s start-up, two epochs, 30 s after
    assert trainer.current_epoch == 2


def test_a_resumed_run_keeps_the_epochs_chosen(monkeypatch, tmp_path):
    _fake_clock(monkeypatch, epoch_seconds=30)
    _fit(tmp_path / "first", minutes=2)
    first_epoch = tmp_path / "first" / "epoch=0.ckpt"
    assert torch.load(first_epoch, weights_only=True)["callbacks"]["TimeBudget"] == {"epochs": 3}
    _fake_clock(monkeypatch, epoch_seconds=1)  # this machine would choose all six
    trainer, rates = _fit(tmp_path / "resumed", minutes=2, ckpt_path=first_epoch)
    assert trainer.current_epoch == 3
    assert rates == pytest.approx([_cosine(e, 3) for e in (1, 2)])


def test_a_budget_must_be_positive(synthetic_root, tmp_path):
    from pneumonia.train import train

    cfg = compose_train(tmp_path, [f"data.root={synthetic_root}", "model=resnet18",
                                   "model.pretrained=false", "logger=none",
                                   "+callbacks.time_budget._target_=pneumonia.budget.TimeBudget",
                                   "+callbacks.time_budget.minutes=0"])
    # not Hydra's wrapper
    with pytest.raises(ValueError, match="time_budget.minutes=0 must be positive"):
        train(cfg)


def test_the_cpu_recipe_trains_within_its_budget(tmp_path):
    cfg = compose_train(tmp_path, ["experiment=scratch_cpu"])
    assert cfg.callbacks.time_budget.minutes * 6 < 45  # six jobs and their evaluation in 45 min
