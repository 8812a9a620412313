"""evaluate(cfg): both stages and the composed pipeline on a held-out split, as a report."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from pneumonia.data.kermany import DataError
from pneumonia.metrics import (
    binary_metrics,
    bootstrap_intervals,
    confusion_matrix,
    expected_calibration_error,
    multiclass_metrics,
)
from pneumonia.config import check_values
from pneumonia.checkpoints import local_references, resolve_all
from pneumonia.outputs import check_overlap, claim_output
from pneumonia.pipeline import CLASSES, TwoStagePipeline
from pneumonia.sweep import sweep_checkpoints
from pneumonia.report import (
    plot_confusion,
    plot_reliability,
    plot_roc,
    write_json,
    write_markdown,
    write_predictions,
)
from pneumonia.stages import STAGE_CLASSES
from pneumonia.tracking import log_evaluation

log = logging.getLogger(__name__)
REPORT_FILES = ("metrics.json", "predictions.csv", "report.md")


def _stage_block(title: str, y: np.ndarray, p: np.ndarray, threshold: float,
                 thresholds: dict[str, float], boot: DictConfig) -> dict[str, Any]:
    def at(t: float):
        return lambda yy, pp: binary_metrics(yy, pp, t)

    points = {}
    for name, t in thresholds.items():
        m = binary_metrics(y, p, t)
        points[name] = {"threshold": t, **{k: m[k] for k in
                        ("sensitivity", "specificity", "false_positives", "false_negatives")}}
    return {
        "title": title,
        "images": int(len(y)),
        "threshold": round(threshold, 6),
        "metrics": binary_metrics(y, p, threshold),
        "ci": bootstrap_intervals(at(threshold), (y, p), boot.samples, boot.seed),
        "operating_points": points,
    }


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Calibrate on validation, then report stage 1, stage 2 and the pipeline on `cfg.split`."""
    check_values(cfg)  # a wrong value stops here, before any checkpoint or image is read
    refs = {"binary": cfg.binary, "subtype": cfg.subtype}
    if cfg.sweep:
        if cfg.binary or cfg.subtype:
            raise ValueError("give sweep=<multirun folder> or binary=... and subtype=..., not both")
        refs = sweep_checkpoints(Path(cfg.sweep))
    if not refs.get("binary") or not refs.get("subtype"):
        raise ValueError("evaluate needs binary=<checkpoint or run id> and subtype=<checkpoint or run id>, "
                         "or sweep=<a multirun folder that trained both stages>")
    if cfg.split not in ("test", "val"):
        raise ValueError(f"split={cfg.split!r} is not one of: test, val")
    inputs = [cfg.data.root, cfg.sweep, *(p for r in refs.values() for p in local_references(r))]
    output_dir = claim_output(cfg.paths.output_dir, inputs, REPORT_FILES, cfg.overwrite, config=cfg)
    ckpts = {stage: resolve_all(refs[stage], stage, cfg.paths.tracking_uri, output_dir / "checkpoints" / stage)
             for stage in ("binary", "subtype")}
    pipeline = TwoStagePipeline.from_checkpoints(ckpts["binary"], ckpts["subtype"], tta=cfg.tta)
    check_overlap(output_dir, [pipeline.data_settings()["root"]])
    records = pipeline.split(cfg.data.root)
    val = [r for r in records if r.split == "val"]
    held_out = [r for r in records if r.split == cfg.split]
    if not held_out:
        raise DataError(f"the {cfg.split} split of {cfg.data.root or pipeline.data_settings()['root']} "
                        "holds no images")
    loader = dict(batch_size=cfg.batch_size, num_workers=cfg.num_workers, device=cfg.device)
    calibration = pipeline.calibrate(val, cfg.target_sensitivity, cfg.operating_point, **loader)
    log.info("Calibrated on %s validation images: %s", calibration.validation_images, calibration)
    pred = pipeline.predict(held_out, **loader)
    broken = [str(r.path) for r, d in zip(held_out, pred.decision) if d < 0]
    if broken:
        raise DataError(f"the model gave non-finite outputs (NaN or inf) for {len(broken)} of "
                        f"{len(held_out)} images (first: {broken[0]}); no report was written")

    truth = np.array([CLASSES.index(r.label) for r in held_out])
    y1, p = (truth > 0).astype(int), pred.p_pneumonia
    pneumonia = truth > 0
    y2, r = (truth[pneumonia] == 2).astype(int), pred.p_viral_given_pneumonia[pneumonia]
    t = calibration.thresholds
    decision_t = pipeline.stage_thresholds()
    boot = cfg.bootstrap
    metrics: dict[str, Any] = {
        "split": cfg.split,
        "tta": cfg.tta,
        "n_images": len(held_out),
        "checkpoints": pipeline.checkpoints,
        "training_runs": {k: m.mlflow_run_id for k, m in pipeline.stages.items()},
        "calibration": {
            "operating_point": calibration.operating_point,
            "temperature": calibration.temperature,
            "thresholds": calibration.thresholds,
            "target_sensitivity": calibration.target_sensitivity,
            "validation_images": calibration.validation_images,
            "ece": {"stage1": expected_calibration_error(y1, p),
                    "stage2": expected_calibration_error(y2, r)},
        },
        "stage1": _stage_block("Stage 1: normal vs pneumonia", y1, p, decision_t["binary"],
                               t["binary"], boot),
        "stage2": _stage_block("Stage 2: bacterial vs viral (true pneumonia images)", y2, r,
                               decision_t["subtype"], t["subtype"], boot),
    }
    labels = list(CLASSES)
    metrics["pipeline"] = {
        "title": "Three-class pipeline: normal / bacterial / viral",
        "images": len(held_out),
        "metrics": multiclass_metrics(truth, pred.decision, labels),
        "ci": bootstrap_intervals(lambda a, b: multiclass_metrics(a, b, labels),
                                  (truth, pred.decision), boot.samples, boot.seed),
        "confusion": confusion_matrix(truth, pred.decision, 3).tolist(),
    }

    figures = [
        plot_confusion(output_dir / "confusion_stage1.png",
                       confusion_matrix(y1, (p >= decision_t["binary"]).astype(int), 2),
                       list(STAGE_CLASSES["binary"]), "stage 1"),
        plot_confusion(output_dir / "confusion_stage2.png",
                       confusion_matrix(y2, (r >= decision_t["subtype"]).astype(int), 2),
                       list(STAGE_CLASSES["subtype"]), "stage 2"),
        plot_confusion(output_dir / "confusion_pipeline.png", np.array(metrics["pipeline"]["confusion"]),
                       labels, "pipeline"),
        plot_roc(output_dir / "roc_stage1.png", y1, p, t["binary"], "Stage 1 ROC (pneumonia positive)"),
        plot_roc(output_dir / "roc_stage2.png", y2, r, t["subtype"], "Stage 2 ROC (viral positive)"),
        plot_reliability(output_dir / "reliability.png", {"stage 1: P(pneumonia)": (y1, p),
                                                          "stage 2: P(viral | pneumonia)": (y2, r)}),
    ]
    files = [
        write_json(output_dir / "metrics.json", metrics),
        write_predictions(output_dir / "predictions.csv", [str(x.path) for x in held_out],
                          [x.label for x in held_out], pred.probabilities,
                          [CLASSES[d] for d in pred.decision], CLASSES),
        write_markdown(output_dir / "report.md", metrics, figures),
        pipeline.save(output_dir / "pipeline.json"),
        *figures,
    ]
    run_id = None
    if cfg.log_to_mlflow:
        run_id = log_evaluation(cfg.paths.tracking_uri, cfg.paths.artifact_dir, cfg.experiment_name,
                                metrics, files, pipeline)
    return {"output_dir": str(output_dir), "run_id": run_id, "metrics": metrics}
