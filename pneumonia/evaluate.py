"""evaluate(cfg): both stages and the composed pipeline on a held-out split, as a report.

load (references -> calibrated pipeline) -> predict -> report (pneumonia.report) -> log (MLflow).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, open_dict

from pneumonia.checkpoints import as_list, local_references
from pneumonia.checks import at_least, check_choice, check_device
from pneumonia.config import check_values
from pneumonia.data.kermany import Record
from pneumonia.errors import ConfigError, DataError, ImageReadError
from pneumonia.hardware import resolve_device
from pneumonia.io import read_grayscale
from pneumonia.metrics import evaluation_metrics, ood_metrics
from pneumonia.outputs import check_overlap, claim_output
from pneumonia.pipeline import OPERATING_POINTS, Prediction, TwoStagePipeline
from pneumonia.report import evaluation_figures, write_json, write_markdown, write_predictions
from pneumonia.serving import load_pipeline, log_pipeline_model, register_model, save_pipeline_model
from pneumonia.site import (
    ADAPT_METHODS,
    adapt_to_site,
    check_disjoint,
    labelled_images,
    unlabelled_images,
)
from pneumonia.stages import CLASSES
from pneumonia.sweep import sweep_checkpoints
from pneumonia.tracking import ensure_tracking_store, experiment_id

log = logging.getLogger(__name__)
REPORT_FILES = ("metrics.json", "predictions.csv", "report.md", "model")


@dataclass
class BootstrapConfig:
    samples: int
    seed: int

    def __post_init__(self) -> None:
        at_least("bootstrap.samples", self.samples, 1,
                  " (resamples of the split behind each 95 % confidence interval)")
        at_least("bootstrap.seed", self.seed, 0, " (a numpy random seed)")


@dataclass
class EvaluateConfig:
    """conf/evaluate.yaml: the keys, their types and the values evaluate.py accepts."""
    paths: dict[str, Any]
    binary: Any   # a checkpoint, run id or latest; or a list of them (an ensemble)
    subtype: Any
    sweep: Optional[str]
    model_uri: Optional[str]  # a model folder (an evaluation's too), models:/, runs:/
    register: Optional[str]  # register the evaluated model under this name
    register_alias: Optional[str]
    # a plain dict, so that callers may assign data={"root": ...}; its keys are checked below
    data: dict[str, Any]
    report_split: str
    target_sensitivity: float
    operating_point: str
    tta: bool
    calibration: Optional[str]  # a site's labelled folder (NORMAL/, PNEUMONIA/)
    adapt: Optional[str]  # a site's unlabelled folder
    adapt_method: str
    transductive: bool
    bootstrap: BootstrapConfig
    batch_size: int
    num_workers: int
    device: str
    overwrite: bool
    log_to_mlflow: bool
    experiment_name: str

    def __post_init__(self) -> None:
        if set(self.data) != {"root"} or not isinstance(self.data["root"], (str, type(None))):
            raise ConfigError(f"data={self.data} must be {{root: <a Kermany folder> or null}}")
        check_choice("report_split", self.report_split, ("test", "val"))
        if not 0 < self.target_sensitivity <= 1:
            raise ConfigError(f"target_sensitivity={self.target_sensitivity} must be in (0, 1]")
        check_choice("operating_point", self.operating_point, OPERATING_POINTS)
        check_choice("adapt_method", self.adapt_method, ADAPT_METHODS)
        at_least("batch_size", self.batch_size, 1)
        at_least("num_workers", self.num_workers, 0, " (0 loads images in the main process)")
        check_device(self.device)


ConfigStore.instance().store(name="evaluate_schema", node=EvaluateConfig)


def _evaluation_tags(metrics: dict, pipeline) -> dict[str, str]:
    """An evaluation run's name, split, and the checkpoints and training runs it evaluates."""
    models = {k: m.hparams.model.get("name", m.hparams.model["backbone"])
              for k, m in pipeline.stages.items()}
    tags = {"mlflow.runName": f"evaluate/{models['binary']}+{models['subtype']}/{metrics['split']}",
            "split": metrics["split"]}
    for stage, module in pipeline.stages.items():
        tags[f"{stage}_checkpoint"] = ",".join(as_list(pipeline.checkpoints[stage]))
        if module.mlflow_run_id:
            tags[f"{stage}_run_id"] = module.mlflow_run_id
    return tags


def log_evaluation(tracking_uri: str, artifact_dir: str, experiment: str, metrics: dict,
                   files: list[Path], pipeline, model_folder: Path, register: str | None = None,
                   alias: str | None = None) -> dict[str, str | None]:
    """One MLflow run for an evaluation, tagged with the training runs it evaluates, holding the
    pipeline as a logged model (`pneumonia.serving`) that the metrics are linked to; with
    `register`, a new version of that registered model (with `alias`). Returns the run id, the
    model's URI and the registered version."""
    ensure_tracking_store(tracking_uri)
    client = MlflowClient(tracking_uri)
    run_id = client.create_run(experiment_id(client, experiment, artifact_dir),
                               tags=_evaluation_tags(metrics, pipeline)).info.run_id
    model = log_pipeline_model(model_folder, run_id, tracking_uri)
    values = {f"{section}/{k}": float(v) for section in ("binary", "subtype", "pipeline")
              for k, v in metrics[section]["metrics"].items()}
    values.update({f"calibration/ece_{k}": v for k, v in metrics["calibration"]["ece"].items()})
    if metrics["ood"]["gate"] is not None:
        values["ood/flagged_fraction"] = metrics["ood"]["flagged_fraction"]
    for key, value in values.items():
        client.log_metric(run_id, key, value, model_id=model.model_id)
    for path in files:
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id)
    version = register_model(model.model_uri, register, alias, tracking_uri) if register else None
    return {"run_id": run_id, "model_uri": model.model_uri, "model_version": version}


def references(cfg: DictConfig) -> dict[str, Any]:
    """Each stage's checkpoint reference(s): binary=/subtype=, or every job of a sweep; none
    with model_uri= (a logged pipeline model)."""
    if cfg.model_uri:
        if cfg.binary or cfg.subtype or cfg.sweep:
            raise ConfigError("give model_uri=<models:/, runs:/ or a model folder> or checkpoints "
                              "(binary=/subtype=, sweep=), not both")
        return {}
    if not cfg.sweep:
        refs = {"binary": cfg.binary, "subtype": cfg.subtype}
    elif cfg.binary or cfg.subtype:
        raise ConfigError("give sweep=<multirun folder> or binary=... and subtype=..., not both")
    else:
        refs = sweep_checkpoints(Path(cfg.sweep))
    if not refs.get("binary") or not refs.get("subtype"):
        raise ConfigError("evaluate needs binary=<checkpoint or run id> and subtype=<checkpoint or "
                          "run id>, sweep=<a multirun folder that trained both stages> or "
                          "model_uri=<a model folder, models:/ or runs:/>")
    return refs


def unscored(records: list[Record], pred: Prediction) -> list[dict[str, str]]:
    """The images that got no decision, each with why: unreadable, or a non-finite output.
    Refuses when none got one (a broken model, or no readable image)."""
    failed = []
    for record in (r for r, d in zip(records, pred.decision) if d < 0):
        try:
            read_grayscale(record.path)
            reason = "the model gave a non-finite output (NaN or inf): no diagnosis"
        except ImageReadError as err:
            reason = err.reason
        failed.append({"path": str(record.path), "reason": reason})
    if len(failed) == len(records):
        raise DataError(f"none of the {len(records)} images got a decision (first: "
                        f"{failed[0]['path']}: {failed[0]['reason']}); no report was written")
    return failed


def _fit(pipeline: TwoStagePipeline, cfg: DictConfig, val: list[Record], held_out: list[Record],
         loader: dict, output_dir: Path) -> dict[str, Any]:
    """Calibrate (on validation, or on the site's labelled folder; a logged model keeps its own
    unless `calibration=` is given) and adapt to the site's unlabelled folder. The images that
    fit must not be the scored ones unless transductive. Returns what the report says of it."""
    if cfg.calibration:
        images = labelled_images(Path(cfg.calibration))
        if not cfg.transductive:
            check_disjoint(images, held_out, "calibration=")
        pipeline.calibrate(images, cfg.target_sensitivity, cfg.operating_point,
                           source=f"site folder {cfg.calibration}", shifted=False, **loader)
    elif cfg.model_uri:
        log.info("Evaluating model %s with its own calibration", cfg.model_uri)
    else:
        pipeline.calibrate(val, cfg.target_sensitivity, cfg.operating_point, **loader)
    log.info("Calibration (%s, %s images): %s", pipeline.calibration.source,
             pipeline.calibration.validation_images, pipeline.calibration)
    adaptation = None
    if cfg.adapt:
        images = unlabelled_images(Path(cfg.adapt))
        if not cfg.transductive:
            check_disjoint(images, held_out, "adapt=")
        adaptation = {"folder": str(cfg.adapt), **adapt_to_site(pipeline, images, cfg.adapt_method,
                                                               output_dir / "adapted", **loader)}
        log.info("Adapted to %s: %s", cfg.adapt, adaptation)
    return {"calibration": pipeline.calibration.source, "adaptation": adaptation,
            "transductive": bool(cfg.transductive)}


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Calibrate on validation, then report stage 1, stage 2 and the pipeline on
    `cfg.report_split`."""
    check_values(cfg)  # a wrong value stops here, before any checkpoint or image is read
    with open_dict(cfg):
        cfg.device = resolve_device(cfg.device)  # auto: the first GPU if there is one, else cpu
    refs = references(cfg)
    inputs = [cfg.data.root, cfg.sweep, cfg.calibration, cfg.adapt,
              *local_references(cfg.model_uri, *refs.values())]
    output_dir = claim_output(cfg.paths.output_dir, inputs, REPORT_FILES, cfg.overwrite, config=cfg)
    pipeline = load_pipeline(cfg.model_uri, refs, cfg.paths.tracking_uri,
                             output_dir / "downloads", tta=cfg.tta)
    check_overlap(output_dir, [pipeline.data_settings()["root"]])
    records = pipeline.split(cfg.data.root)
    held_out = [r for r in records if r.split == cfg.report_split]
    if not held_out:
        root = cfg.data.root or pipeline.data_settings()["root"]
        raise DataError(f"the {cfg.report_split} split of {root} holds no images")
    loader = dict(batch_size=cfg.batch_size, num_workers=cfg.num_workers, device=cfg.device)
    site = _fit(pipeline, cfg, [r for r in records if r.split == "val"], held_out, loader,
                output_dir)
    calibration = pipeline.calibration
    pred = pipeline.predict(held_out, **loader)
    failed = unscored(held_out, pred)  # reported, and left out of the figures
    if failed:
        log.warning("%d of %d images got no decision; see metrics.json", len(failed), len(held_out))
        held_out = [r for r, d in zip(held_out, pred.decision) if d >= 0]
        pred = pred.subset(pred.decision >= 0)

    labels, thresholds = [r.label for r in held_out], pipeline.stage_thresholds()
    paths, bootstrap = [str(r.path) for r in held_out], (cfg.bootstrap.samples, cfg.bootstrap.seed)
    metrics = {"split": cfg.report_split, "tta": pipeline.tta, "n_images": len(held_out),
               "unscored_images": failed, "site": site,
               "checkpoints": pipeline.checkpoints,
               "training_runs": {k: m.mlflow_run_id for k, m in pipeline.stages.items()},
               **evaluation_metrics(labels, pred, calibration, thresholds, *bootstrap),
               "ood": ood_metrics(labels, paths, pred, pipeline.ood_gate, calibration, thresholds,
                                  *bootstrap)}
    figures = evaluation_figures(output_dir, labels, pred, metrics, thresholds)
    files = [write_json(output_dir / "metrics.json", metrics),
             write_predictions(output_dir / "predictions.csv", paths, labels,
                               pred.probabilities, [CLASSES[d] for d in pred.decision], CLASSES),
             write_markdown(output_dir / "report.md", metrics, figures), *figures]
    model = save_pipeline_model(pipeline, output_dir / "model", overwrite=cfg.overwrite,
                                evaluation=metrics)
    logged = {"run_id": None}
    if cfg.log_to_mlflow:
        logged = log_evaluation(cfg.paths.tracking_uri, cfg.paths.artifact_dir, cfg.experiment_name,
                                metrics, files, pipeline, model, cfg.register, cfg.register_alias)
    elif cfg.register:
        raise ConfigError("register= needs log_to_mlflow=true: the registry holds logged models")
    return {"output_dir": str(output_dir), **logged, "metrics": metrics}
