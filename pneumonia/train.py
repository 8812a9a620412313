"""train(cfg): one stage, one backbone, one seed; the whole job behind train.py."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from lightning.pytorch.loggers import MLFlowLogger
from omegaconf import DictConfig, OmegaConf, open_dict

from pneumonia.checkpoint_io import AtomicCheckpointIO
from pneumonia.config import validate
from pneumonia.data import KermanyDataModule
from pneumonia.data.features import FrozenFeatures
from pneumonia.data.synthetic import make_synthetic_dataset
from pneumonia.models import StageClassifier, normalization_stats
from pneumonia.stages import STAGE_CLASSES, check_stage
from pneumonia.sweep import in_multirun
from pneumonia.tracking import (
    TrackingServerError,
    check_server,
    is_run_id,
    log_results,
    log_run_inputs,
    write_environment,
)

log = logging.getLogger(__name__)


# Keys of the data group that the run uses itself and does not hand to the data module: the
# normalisation mode (turned into the backbone's mean and std) and the synthetic data recipe.
RUN_DATA_KEYS = ("normalization", "synthetic")


def build_datamodule(cfg: DictConfig) -> KermanyDataModule:
    """The data module of a run, instantiated from the `data` group (`_target_`) plus what the
    group cannot know: stage, input size, the backbone's mean and std, the run's seed. The
    synthetic data set is made first when data=synthetic."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    normalization, synthetic = (data.pop(key) for key in RUN_DATA_KEYS)
    root = Path(data.pop("root")).expanduser()
    if synthetic:
        root = make_synthetic_dataset(root, **synthetic)
    mean, std = normalization_stats(cfg.model.backbone, normalization)
    try:
        return hydra.utils.instantiate(data, root=str(root), stage=check_stage(cfg.stage.name),
                                       image_size=cfg.model.input_size, mean=mean, std=std,
                                       shuffle_seed=cfg.seed, _convert_="all")
    except InstantiationException as err:  # the data module's own error (DataError...), unwrapped
        if err.__cause__ is None:
            raise
        raise err.__cause__ from None


def class_weights(setting: Any, datamodule: KermanyDataModule) -> list[float] | None:
    if setting is None:
        return None
    if setting == "auto":
        return datamodule.class_weights()
    weights = [float(w) for w in setting]
    if len(weights) != 2 or min(weights) <= 0:
        raise ValueError(f"loss.class_weights={setting} must be auto, null or two positive numbers")
    return weights


def build_module(cfg: DictConfig, datamodule: KermanyDataModule) -> StageClassifier:
    """The stage's module from plain config values; with data.feature_cache it also hands the
    data module the network's feature extractor."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    pretrained = model.pop("pretrained")
    module = StageClassifier(
        model=model,
        classes=list(STAGE_CLASSES[cfg.stage.name]),
        stage=cfg.stage.name,
        preprocessing=datamodule.preprocessing.to_dict(),
        optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
        scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True) if cfg.scheduler else None,
        class_weights=class_weights(cfg.loss.class_weights, datamodule),
        label_smoothing=cfg.loss.label_smoothing,
        pretrained=pretrained,
        data={"root": str(datamodule.root), "split": cfg.data.split, "split_seed": cfg.data.split_seed,
              "val_fraction": cfg.data.val_fraction, "test_fraction": cfg.data.test_fraction,
              "skip_bad": cfg.data.skip_bad},
        channels_last=cfg.speed.channels_last,
        compile=cfg.speed.compile,
    )
    if cfg.data.feature_cache:  # batches are the frozen part's features; not saved in checkpoints
        module.cached_features = True
        pre = datamodule.preprocessing
        datamodule.use_features(FrozenFeatures(module.net, pre.mean, pre.std, cfg.data.batch_size))
    return module


class EpochSeed(L.Callback):
    """Reseed the global RNGs at each epoch start from (seed, epoch) (dropout, loader workers),
    so a resumed run draws like an uninterrupted one. The shuffle (EpochShuffle) and the
    augmentation (drawn from seed, epoch and image index) do not depend on the global RNG."""

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        L.seed_everything(self.seed * 100_003 + trainer.current_epoch, workers=True, verbose=False)


def resolve_resume(ref: str, tracking_uri: str | None) -> tuple[Path, Path, str | None]:
    """(last checkpoint, the run's output folder, its MLflow run id) from a run folder, a
    checkpoint file or an MLflow run id."""
    path = Path(str(ref)).expanduser()
    if path.is_dir():
        checkpoint = path / "checkpoints" / "last.ckpt"
    elif path.is_file():
        checkpoint = path
    elif tracking_uri and is_run_id(ref):
        from mlflow.tracking import MlflowClient

        folder = MlflowClient(tracking_uri).get_run(str(ref)).data.tags.get("output_dir")
        checkpoint = Path(folder or "/nonexistent") / "checkpoints" / "last.ckpt"
    else:
        raise FileNotFoundError(f"resume={ref}: not a run folder, a checkpoint or an MLflow run id")
    if not checkpoint.is_file():
        raise FileNotFoundError(f"resume={ref}: no checkpoint at {checkpoint}")
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    return checkpoint, checkpoint.parent.parent, saved.get("mlflow_run_id")


def _check_output_dir(output_dir: Path) -> None:
    checkpoints = output_dir / "checkpoints"
    if checkpoints.is_dir() and any(checkpoints.iterdir()):
        raise FileExistsError(
            f"{checkpoints} already holds checkpoints from another run; "
            "choose a new hydra.run.dir (nothing was overwritten)"
        )


def build_logger(cfg: DictConfig, run_id: str | None = None) -> tuple[MLFlowLogger | bool, str | None]:
    """The MLflow logger (continuing `run_id` if given) and its tracking URI, the server
    checked before any long work."""
    if not cfg.get("logger"):
        return False, None
    logger_cfg = cfg.logger
    uri = logger_cfg.tracking_uri
    overrides: dict[str, Any] = {"run_id": run_id} if run_id else {}
    try:
        check_server(uri)
    except TrackingServerError:
        if not cfg.mlflow_fallback_to_local:
            raise
        log.warning("MLflow server %s not reachable: logging to %s instead", uri, cfg.paths.tracking_uri)
        overrides["tracking_uri"] = uri = cfg.paths.tracking_uri
    if uri.startswith(("http://", "https://")):
        overrides["artifact_location"] = None  # the server decides where artifacts go
    return hydra.utils.instantiate(logger_cfg, **overrides), uri


def _run_tags(cfg: DictConfig) -> dict[str, str]:
    tags = {"stage": cfg.stage.name, "model": cfg.model.name, "seed": str(cfg.seed)}
    if in_multirun():
        hydra_cfg = HydraConfig.get()
        tags.update(sweep_id=Path(hydra_cfg.sweep.dir).name, sweep_dir=str(hydra_cfg.sweep.dir),
                    job_num=str(hydra_cfg.job.num), overrides=" ".join(hydra_cfg.overrides.task))
    return tags


def _trainer_overrides(cfg: DictConfig) -> dict[str, Any]:
    # Plain DDP re-launches the script, which inside a Hydra sweep re-runs the whole sweep in
    # every child rank; spawned workers do not. Under SLURM (submitit_slurm with
    # tasks_per_node = devices) every rank already is its own process and plain DDP is right.
    if in_multirun() and cfg.trainer.get("strategy") == "ddp":
        launcher = str(HydraConfig.get().launcher.get("_target_", ""))
        if "SlurmLauncher" not in launcher:
            log.warning("trainer.strategy=ddp inside a local multirun: using ddp_spawn instead")
            return {"strategy": "ddp_spawn"}
    return {}


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train one stage. Returns the MLflow run id, the best checkpoint and its validation metrics."""
    validate(cfg)
    L.seed_everything(cfg.seed, workers=True)
    resume_from, run_id = None, None
    if cfg.get("resume"):
        resume_from, output_dir, run_id = resolve_resume(cfg.resume, cfg.logger.tracking_uri
                                                         if cfg.get("logger") else None)
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)  # continue in the interrupted run's folder
        log.info("Resuming from %s (MLflow run %s)", resume_from, run_id)
    else:
        output_dir = Path(cfg.paths.output_dir)
        _check_output_dir(output_dir)
    logger, tracking_uri = build_logger(cfg, run_id)
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, datamodule)
    if resume_from is None:  # a resumed run keeps the files (and MLflow params) it has
        files = [datamodule.write_manifest(output_dir / "split_manifest.csv"), output_dir / "config.yaml"]
        OmegaConf.save(cfg, files[1], resolve=True)
        env_file, env_tags = write_environment(output_dir / "environment.json")
        files.append(env_file)
        skipped = {}
        if cfg.data.skip_bad:
            files.append(datamodule.write_skipped(output_dir / "bad_files.csv"))
            skipped = {"data/skipped_files": len(datamodule.skipped)}
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if isinstance(logger, MLFlowLogger) and resume_from is None:
        log_run_inputs(logger, {**resolved, **skipped}, datamodule.preprocessing.to_dict(), files,
                       {**_run_tags(cfg), **env_tags, "output_dir": str(output_dir.resolve())})
    callbacks = [hydra.utils.instantiate(c) for c in cfg.callbacks.values() if c]
    callbacks.append(EpochSeed(cfg.seed))
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, logger=logger, callbacks=callbacks,
                                                 plugins=[AtomicCheckpointIO()], **_trainer_overrides(cfg))
    log.info("Training %s/%s on %s: %s", cfg.stage.name, cfg.model.name, datamodule.root,
             {s: datamodule.class_counts(s) for s in ("train", "val", "test")})
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)

    result: dict[str, Any] = {
        "run_id": logger.run_id if isinstance(logger, MLFlowLogger) else None,
        "tracking_uri": tracking_uri,
        "output_dir": str(output_dir),
        "best_checkpoint": None,
        "metrics": {},
    }
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if not best or not trainer.is_global_zero:
        return result
    # Score the best checkpoint once, on one device (DDP samplers would pad the val set).
    scorer = L.Trainer(accelerator=cfg.trainer.accelerator, devices=1, logger=False, enable_checkpointing=False,
                       enable_progress_bar=False, enable_model_summary=False)
    metrics = scorer.validate(module, datamodule=datamodule, ckpt_path=best, verbose=False)[0]
    metrics = {k: float(v) for k, v in sorted(metrics.items()) if not k.startswith("val/confusion")}
    if isinstance(logger, MLFlowLogger):
        log_results(logger, metrics, Path(best), cfg.log_best_checkpoint)
    result.update(best_checkpoint=best, metrics=metrics)
    return result
