"""StageClassifier: one two-class stage (binary or subtype) as a LightningModule."""

from __future__ import annotations

from typing import Any

import hydra
import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric
from torchmetrics.classification import (
    BinaryAUROC,
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from pneumonia.errors import ConfigError
from pneumonia.models.network import build_network
from pneumonia.models.weights import resolve_weights
from pneumonia.ood import OODGate, watching

# Options of earlier versions that their checkpoints still carry, each with the value that meant
# "off": such a checkpoint loads when the option was off and is refused when it was on, since
# this version cannot build or train what it describes. "module" holds constructor arguments.
RETIRED = {
    "model": {"norm": "batch", "mixstyle": 0.0},
    "preprocessing": {"equalize": False},
    "module": {"mixup": 0.0},
}
RETIRED_AT = "1fafa00"
# Training settings that earlier checkpoints recorded but the module no longer uses (the data
# module augments and seeds its draws): dropped whatever their value, inference never read them.
TRAINING_RECORDS = ("augment", "seed")


def without_retired(group: str, options: dict) -> dict:
    """`options` less the retired keys of `group` that hold their neutral value; a retired key
    set to anything else raises ValueError naming it and the commit that still has it."""
    retired = RETIRED[group]
    for key in retired.keys() & options.keys():
        if options[key] != retired[key]:
            name = key if group == "module" else f"{group}.{key}"
            raise ConfigError(
                f"this checkpoint was trained with {name}={options[key]!r}, an option this version "
                f"no longer has; load it with commit {RETIRED_AT} of this project "
                f"(git checkout {RETIRED_AT})"
            )
    return {k: v for k, v in options.items() if k not in retired}


def _metrics(num_classes: int) -> nn.ModuleDict:
    return nn.ModuleDict({
        "acc": MulticlassAccuracy(num_classes, average="micro"),
        "auroc": BinaryAUROC(),
        "precision": MulticlassPrecision(num_classes, average=None),
        "recall": MulticlassRecall(num_classes, average=None),
        "f1": MulticlassF1Score(num_classes, average=None),
        "confusion": MulticlassConfusionMatrix(num_classes),
    })


class StageClassifier(L.LightningModule):
    """Class-weighted cross-entropy classifier for one stage.

    Every argument is a plain value (no modules), so the checkpoint rebuilds the model by
    itself; `preprocessing` is what inference needs to see images the way training did.
    `pretrained` is separate so a checkpoint loads offline with `pretrained=False` (its weights
    are in it); `weights` is the provenance (source, sha256) of the initial weights, resolved
    from `pretrained` when not given, so a loaded checkpoint keeps the one it was trained with.
    `data` records the data root and split, so evaluation finds the same test split. `retired`
    takes the arguments of older checkpoints (`RETIRED`, `TRAINING_RECORDS`).

    With `cached_features` set (for data.feature_cache=true; not saved, so the checkpoint stays
    an ordinary one) batches hold the frozen part's features (N, C, H, W) and only the head runs.
    """

    def __init__(
        self,
        model: dict,
        classes: list[str],
        stage: str,
        preprocessing: dict,
        optimizer: dict,
        scheduler: dict | None = None,
        class_weights: list[float] | None = None,
        label_smoothing: float = 0.0,
        pretrained: bool | str = False,
        weights: dict | None = None,
        data: dict | None = None,
        channels_last: bool = False,
        compile: bool = False,
        **retired: Any,
    ) -> None:
        super().__init__()
        unknown = retired.keys() - RETIRED["module"].keys() - set(TRAINING_RECORDS)
        if unknown:
            raise TypeError("StageClassifier got unexpected arguments: "
                            f"{', '.join(sorted(unknown))}")
        without_retired("module", {k: v for k, v in retired.items() if k not in TRAINING_RECORDS})
        model = without_retired("model", model)
        preprocessing = without_retired("preprocessing", preprocessing)
        if weights is None:
            weights = resolve_weights(model["backbone"], pretrained).provenance()
        # train() logs the whole resolved config
        self.save_hyperparameters(ignore=list(retired), logger=False)
        self.net = build_network(**model, pretrained=pretrained, num_classes=len(classes))
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        if compile:
            self.net.compile()
        self.register_buffer(
            "class_weights",
            torch.tensor(class_weights, dtype=torch.float32) if class_weights else None,
            persistent=False,
        )
        self.metrics = nn.ModuleDict({f"{s}_metrics": _metrics(len(classes))
                                      for s in ("train", "val", "test")})

    mlflow_run_id: str | None = None
    cached_features: bool = False
    ood: OODGate | None = None  # fitted by train() at the end of a binary run (pneumonia.ood)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the OOD gate's scores (NaN without a gate) of one pass."""
        if self.ood is None:
            return self.net(x), torch.full((len(x),), float("nan"), device=x.device)
        with watching(self.net.backbone, self.ood.stages) as seen:
            logits = self.net(x)
        return logits, self.ood.score({name: batches[0] for name, batches in seen.items()})

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        images, targets = batch
        if self.hparams.channels_last and not self.cached_features:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, targets

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Lets evaluation link its report to the training run that made the weights.
        run_id = getattr(self.logger, "run_id", None) if self._trainer is not None else None
        checkpoint["mlflow_run_id"] = run_id or self.mlflow_run_id
        if self.ood is not None:
            checkpoint["ood"] = self.ood.state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.mlflow_run_id = checkpoint.get("mlflow_run_id")
        self.ood = OODGate.from_state(checkpoint["ood"]) if "ood" in checkpoint else None

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], split: str) -> torch.Tensor:
        inputs, targets = batch
        forward = self.net.classify if self.cached_features else self
        logits = forward(inputs)
        loss = F.cross_entropy(logits, targets, weight=self.class_weights,
                               label_smoothing=self.hparams.label_smoothing)
        probs = logits.detach().float().softmax(dim=1)
        for name, metric in self.metrics[f"{split}_metrics"].items():
            metric.update(probs[:, 1] if name == "auroc" else probs, targets)
        self.log(f"{split}/loss", loss, on_step=split == "train", on_epoch=True,
                 prog_bar=True, batch_size=len(targets), sync_dist=split != "train")
        return loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "test")

    def _log_epoch(self, split: str) -> None:
        metrics: dict[str, Metric] = self.metrics[f"{split}_metrics"]
        # synced across ranks by torchmetrics: identical on every rank
        values = {name: metric.compute() for name, metric in metrics.items()}
        self.log(f"{split}/auroc", values["auroc"], prog_bar=True, sync_dist=True)
        out = {f"{split}/acc": values["acc"]}
        classes = self.hparams.classes
        for i, cls in enumerate(classes):
            for name in ("precision", "recall", "f1"):
                out[f"{split}/{name}_{cls}"] = values[name][i]
            for j, pred in enumerate(classes):
                out[f"{split}/confusion_{cls}_as_{pred}"] = values["confusion"][i, j].float()
        self.log_dict(out, sync_dist=True)
        for metric in metrics.values():
            metric.reset()

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = hydra.utils.instantiate(self.hparams.optimizer)(params=params)
        if not self.hparams.scheduler:
            return optimizer
        scheduler = hydra.utils.instantiate(self.hparams.scheduler)(optimizer=optimizer)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
