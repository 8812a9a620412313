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
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from pneumonia import hardware
from pneumonia.checkpoints import AtomicCheckpointIO, read_checkpoint, resolve
from pneumonia.config import validate
from pneumonia.data import KermanyDataModule
from pneumonia.data.datamodule import XrayDataset
from pneumonia.data.features import FrozenFeatures
from pneumonia.data.kermany import SPLIT_KEYS
from pneumonia.data.synthetic import make_synthetic_dataset
from pneumonia.errors import ConfigError
from pneumonia.models import StageClassifier, interpolation, normalization_stats
from pneumonia.models.weights import resolve_weights
from pneumonia.ood import MAX_FIT_IMAGES, OODGate, stage_descriptions
from pneumonia.outputs import claim_output
from pneumonia.stages import STAGE_CLASSES, check_stage
from pneumonia.sweep import in_multirun
from pneumonia.tracking import (
    TrackingError,
    check_server,
    ensure_tracking_store,
    log_results,
    log_run_inputs,
    write_environment,
)

log = logging.getLogger(__name__)


def build_datamodule(cfg: DictConfig) -> KermanyDataModule:
    """The data module of a run, instantiated from the `data` group (`_target_`) plus what the
    group cannot know: stage, input size, the backbone's mean and std, the run's seed. The
    synthetic data set is made first when data=synthetic."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    normalization, synthetic = data.pop("normalization"), data.pop("synthetic")  # the run's own
    root = Path(data.pop("root")).expanduser()
    if synthetic:
        root = make_synthetic_dataset(root, **synthetic)
    mean, std = normalization_stats(cfg.model.backbone, normalization)
    return instantiate(data, root=str(root), stage=check_stage(cfg.stage.name),
                       image_size=cfg.model.input_size, mean=mean, std=std,
                       interpolation=interpolation(cfg.model.backbone), shuffle_seed=cfg.seed)


def instantiate(config: Any, **kwargs: Any) -> Any:
    """hydra.utils.instantiate with plain containers as arguments; the object's own error
    (DataError, ValueError...) is raised as itself, not wrapped in Hydra's."""
    try:
        return hydra.utils.instantiate(config, **kwargs, _convert_="all")
    except InstantiationException as err:
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
        raise ConfigError(f"loss.class_weights={setting} must be auto, null or two positive "
                          "numbers")
    return weights


def build_module(cfg: DictConfig, datamodule: KermanyDataModule) -> StageClassifier:
    """The stage's module, instantiated from the `module` node plus what the run decides; with
    data.feature_cache it also hands the data module the network's feature extractor."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    pretrained = model.pop("pretrained")  # a hparam of its own: checkpoints load offline
    module = instantiate(
        cfg.module, model=model, pretrained=pretrained, stage=cfg.stage.name,
        classes=list(STAGE_CLASSES[cfg.stage.name]),
        preprocessing=datamodule.preprocessing.to_dict(),
        class_weights=class_weights(cfg.loss.class_weights, datamodule),
        data={"root": str(datamodule.root), **{key: cfg.data[key] for key in SPLIT_KEYS}})
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
    """(last checkpoint, run folder, MLflow run id) from a run folder, checkpoint or run id."""
    checkpoint = resolve(ref, "resume", tracking_uri, Path(), last=True)
    saved = read_checkpoint(checkpoint)
    return checkpoint, checkpoint.parent.parent, saved.get("mlflow_run_id")


def build_logger(cfg: DictConfig,
                 run_id: str | None = None) -> tuple[MLFlowLogger | bool, str | None]:
    """The MLflow logger (continuing `run_id`) and its URI, the server checked before long work."""
    if not cfg.get("logger"):
        return False, None
    uri = cfg.logger.tracking_uri
    overrides: dict[str, Any] = {"run_id": run_id} if run_id else {}
    try:
        check_server(uri)
    except TrackingError:
        if not cfg.mlflow_fallback_to_local:
            raise
        log.warning("MLflow server %s not reachable: logging to %s instead", uri,
                    cfg.paths.tracking_uri)
        overrides["tracking_uri"] = uri = cfg.paths.tracking_uri
    if uri.startswith(("http://", "https://")):
        overrides["artifact_location"] = None  # the server decides where artifacts go
    ensure_tracking_store(uri)  # one process creates a fresh SQLite database, the others wait
    return instantiate(cfg.logger, **overrides), uri


def _run_tags(cfg: DictConfig) -> dict[str, str]:
    tags = {"stage": cfg.stage.name, "model": cfg.model.name, "seed": str(cfg.seed)}
    if in_multirun():
        hydra_cfg = HydraConfig.get()
        tags.update(sweep_id=Path(hydra_cfg.sweep.dir).name, sweep_dir=str(hydra_cfg.sweep.dir),
                    job_num=str(hydra_cfg.job.num), overrides=" ".join(hydra_cfg.overrides.task))
    return tags


def _trainer_overrides(choice: hardware.Choice) -> dict[str, Any]:
    """The Trainer arguments of the chosen hardware. In a local Hydra sweep DDP is spawned: plain
    DDP re-launches the script, so every child rank would re-run the whole sweep. Under SLURM
    (tasks_per_node = devices) every rank already is its own process and plain DDP is right."""
    overrides = choice._asdict()
    if in_multirun() and choice.strategy == "ddp":
        launcher = str(HydraConfig.get().launcher.get("_target_", ""))
        if "SlurmLauncher" not in launcher:
            log.warning("trainer.strategy=ddp inside a local multirun: using ddp_spawn instead")
            overrides["strategy"] = "ddp_spawn"
    return overrides


def _claim_run_folder(cfg: DictConfig) -> tuple[Path | None, str | None]:
    """Claim the run's output folder (on resume, the interrupted run's); returns the checkpoint
    to resume from and its MLflow run id, (None, None) for a new run. Other DDP ranks share
    rank 0's folder and only open their log file there."""
    primary = rank_zero_only.rank == 0
    inputs = [cfg.data.root]
    if not cfg.get("resume"):
        claim_output(cfg.paths.output_dir, inputs, results=["checkpoints"], config=cfg,
                     primary=primary)
        return None, None
    tracking_uri = cfg.logger.tracking_uri if cfg.get("logger") else None
    checkpoint, folder, run_id = resolve_resume(cfg.resume, tracking_uri)
    with open_dict(cfg):
        cfg.paths.output_dir = str(folder)  # continue in the interrupted run's folder
    claim_output(folder, inputs, primary=primary)  # its record of how it was made stays
    log.info("Resuming from %s (MLflow run %s)", checkpoint, run_id)
    return checkpoint, run_id


def _record_inputs(cfg: DictConfig, logger, datamodule: KermanyDataModule, output_dir: Path,
                   tags: dict[str, str]) -> None:
    """The split, config and environment files of a new run, and its MLflow params and tags."""
    files = [datamodule.write_manifest(output_dir / "split_manifest.csv"),
             output_dir / "config.yaml", output_dir / "environment.json"]
    OmegaConf.save(cfg, files[1], resolve=True)
    env_tags = write_environment(files[2])
    skipped = {}
    if cfg.data.skip_bad:
        files.append(datamodule.write_skipped(output_dir / "bad_files.csv"))
        skipped = {"data/skipped_files": len(datamodule.skipped)}
    if isinstance(logger, MLFlowLogger):
        resolved = OmegaConf.to_container(cfg, resolve=True)
        log_run_inputs(logger, {**resolved, **skipped}, datamodule.preprocessing.to_dict(), files,
                       {**_run_tags(cfg), **env_tags, **tags, "output_dir": str(output_dir)})


def _fit(trainer: L.Trainer, module, datamodule, resume_from: Path | None,
         output_dir: Path) -> None:
    """trainer.fit; a run stopped by SIGTERM or Ctrl-C exits non-zero and says how to go on."""
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
    except SystemExit as stop:  # Lightning ends fit with SystemExit on SIGTERM and on Ctrl-C
        sigterm = trainer.received_sigterm
        last = output_dir / "checkpoints" / "last.ckpt"
        how = (f"resume with: python train.py resume={output_dir}" if last.is_file() else
               "no checkpoint was written yet (the first epoch had not ended); start it again")
        log.error("Training stopped by %s: %s", "SIGTERM" if sigterm else "an interrupt", how)
        raise SystemExit(143 if sigterm else 130) from stop


def _add_ood_gate(module: StageClassifier, datamodule: KermanyDataModule, fraction: float,
                  device: str, checkpoint: Path) -> None:
    """Fit the out-of-distribution gate of the module's (best) weights on the training and
    validation splits, decoded as inference decodes them, and store it in its checkpoint."""
    module.to(device).eval()
    fit = {split: stage_descriptions(module.net,
                                     XrayDataset(datamodule.splits[split], module.hparams.stage,
                                                 datamodule.preprocessing),
                                     device=device, num_workers=datamodule.num_workers,
                                     limit=MAX_FIT_IMAGES if split == "train" else None)
           for split in ("train", "val")}
    module.ood = OODGate.fit(fit["train"], fit["val"], fraction)
    saved = read_checkpoint(checkpoint)
    saved["ood"] = module.ood.state()
    AtomicCheckpointIO().save_checkpoint(saved, checkpoint)
    log.info("Out-of-distribution gate: fitted on %d training images, flags %.1f %% of the %d "
             "validation images; stored in %s", module.ood.images["train"], 100 * fraction,
             module.ood.images["val"], checkpoint)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train one stage; returns the MLflow run id, best checkpoint and its validation metrics."""
    validate(cfg)
    resolve_weights(cfg.model.backbone, cfg.model.pretrained)  # fails before any data is read
    given = OmegaConf.to_container(cfg.trainer, resolve=True)  # `auto` decided by the machine
    choice = hardware.choose(**{key: given[key] for key in hardware.Choice._fields})
    if rank_zero_only.rank == 0:
        log.info("Hardware: %s", hardware.describe(choice))
    L.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg)  # a bad data folder fails here, before any file is written
    module = build_module(cfg, datamodule)
    resume_from, run_id = _claim_run_folder(cfg)
    output_dir = Path(cfg.paths.output_dir).resolve()
    logger, tracking_uri = build_logger(cfg, run_id)
    # a resumed run keeps the files (and MLflow params) it has; other DDP ranks write none
    if resume_from is None and rank_zero_only.rank == 0:
        weights = {f"weights/{key}": value for key, value in module.hparams.weights.items()}
        _record_inputs(cfg, logger, datamodule, output_dir, {**hardware.tags(choice), **weights})
    # after the claim: on resume, checkpoints go to the interrupted run's folder
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c]
    callbacks.append(EpochSeed(cfg.seed))
    trainer: L.Trainer = instantiate(cfg.trainer, logger=logger, callbacks=callbacks,
                                     plugins=[AtomicCheckpointIO()], **_trainer_overrides(choice))
    log.info("Training %s/%s on %s: %s", cfg.stage.name, cfg.model.name, datamodule.root,
             {s: datamodule.class_counts(s) for s in ("train", "val", "test")})
    _fit(trainer, module, datamodule, resume_from, output_dir)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # rank 0 scores alone next: a metric synced over the group would wait forever for the
        # ranks that have exited
        torch.distributed.destroy_process_group()
    result: dict[str, Any] = {
        "run_id": logger.run_id if isinstance(logger, MLFlowLogger) else None,
        "tracking_uri": tracking_uri, "output_dir": str(output_dir), "best_checkpoint": None,
        "metrics": {},
    }
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if not best or not trainer.is_global_zero:
        return result
    # Score the best checkpoint once, on one device (DDP samplers would pad the val set).
    scorer = L.Trainer(accelerator=choice.accelerator, devices=1, logger=False,
                       enable_checkpointing=False, enable_progress_bar=False,
                       enable_model_summary=False, plugins=[AtomicCheckpointIO()])
    metrics = scorer.validate(module, datamodule=datamodule, ckpt_path=best, verbose=False)[0]
    metrics = {k: float(v) for k, v in sorted(metrics.items()) if not k.startswith("val/confusion")}
    if cfg.stage.name == "binary":  # stage 1 guards the pipeline's input (pneumonia.ood)
        _add_ood_gate(module, datamodule, cfg.ood_fraction, str(scorer.strategy.root_device),
                      Path(best))
    if isinstance(logger, MLFlowLogger):
        log_results(logger, metrics, Path(best), cfg.log_best_checkpoint)
    result.update(best_checkpoint=best, metrics=metrics)
    return result
