"""explain(cfg): a folder of X-rays in, one report figure per image, a summary and an index page.

Every file ends as one summary row, `ok` or `failed` with its reason: a file that cannot be
read, a model output that is not finite, a report that cannot be drawn fail that file only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, open_dict
from tqdm import tqdm

from pneumonia.checkpoints import local_references
from pneumonia.checks import at_least, check_choice, check_device
from pneumonia.config import check_values
from pneumonia.csvio import write_csv
from pneumonia.data.transforms import normalize
from pneumonia.errors import ConfigError, ImageReadError, NotChestRadiograph, display_name
from pneumonia.explain.attribution import METHODS, attribution_map
from pneumonia.explain.figures import index_html, plot_explanation, report_names
from pneumonia.explain.occlusion import MODES as OCCLUSION_MODES
from pneumonia.hardware import inference_precision, resolve_device
from pneumonia.io import read_grayscale, scan_inputs
from pneumonia.outputs import claim_output
from pneumonia.pipeline import OPERATING_POINTS, TwoStagePipeline
from pneumonia.serving import load_pipeline
from pneumonia.stages import CLASSES, STAGE_CLASSES

log = logging.getLogger(__name__)
SUMMARY_FIELDS = ("file", "status", "reason", "ood_score", "p_normal", "p_bacterial", "p_viral",
                  "decision", "explained_class", "attribution_seconds", "report")
RESULTS = ("summary.csv", "index.html", "reports")
MAX_WINDOW = 512  # pixels; the window is also checked against the model's input size


@dataclass
class ExplainConfig:
    """conf/explain.yaml: the keys, their types and the values explain.py accepts."""
    paths: dict[str, Any]
    input: str
    model_uri: Optional[str]  # a model folder (an evaluation's too), models:/ or runs:/
    binary: Any
    subtype: Any
    operating_point: str
    uncalibrated: bool
    explain_stage: str
    method: str
    window: int
    stride: int
    baseline: float
    perturbations_per_eval: int
    occlusion_mode: str
    batch_images: int
    channels_last: bool
    precision: str
    accept_any_modality: bool
    accept_ood: bool
    limit: Optional[int]
    device: str
    overwrite: bool
    log_to_mlflow: bool
    experiment_name: str

    def __post_init__(self) -> None:
        check_choice("operating_point", self.operating_point, OPERATING_POINTS)
        check_choice("explain_stage", self.explain_stage, tuple(STAGE_CLASSES))
        check_choice("method", self.method, METHODS)
        if not 1 <= self.window <= MAX_WINDOW:
            raise ConfigError(f"window={self.window} must be in [1, {MAX_WINDOW}] pixels")
        at_least("stride", self.stride, 1, " pixel")
        if not 0 <= self.baseline <= 1:  # also refuses nan
            raise ConfigError(f"baseline={self.baseline} must be in [0, 1] (0 = black, 1 = white)")
        at_least("perturbations_per_eval", self.perturbations_per_eval, 1)
        check_choice("occlusion_mode", self.occlusion_mode, OCCLUSION_MODES)
        at_least("batch_images", self.batch_images, 1)
        check_choice("precision", self.precision, ("32", "bf16", "auto"))
        if self.limit is not None:
            at_least("limit", self.limit, 1, " (or null: every file)")
        check_device(self.device)


ConfigStore.instance().store(name="explain_schema", node=ExplainConfig)


def explained_pipeline(cfg: DictConfig, downloads: Path) -> TwoStagePipeline:
    """The pipeline to explain, as given: a model (calibrated by evaluate.py), or two stages
    the user marks `uncalibrated=true` (temperature 1, thresholds 0.5). Explain fits nothing."""
    if cfg.model_uri:
        return load_pipeline(cfg.model_uri, None, cfg.paths.tracking_uri, downloads)
    stages = {s: cfg[s] for s in STAGE_CLASSES}
    if not (all(stages.values()) and cfg.uncalibrated):
        raise ConfigError("explain needs model_uri=<a model folder, an evaluation's output folder, "
                          "models:/ or runs:/> (evaluate.py calibrates it), or binary=... "
                          "subtype=... uncalibrated=true (temperature 1, thresholds 0.5)")
    pipeline = load_pipeline(None, stages, cfg.paths.tracking_uri, downloads)
    pipeline.calibration = TwoStagePipeline.uncalibrated()
    return pipeline


def _failed(file: str, reason: str) -> dict[str, str]:
    return {"file": file, "status": "failed", "reason": reason}


@dataclass
class Explainer:
    """What explaining one batch needs: the pipeline, the explained stage's network, the options."""

    cfg: DictConfig
    pipeline: TwoStagePipeline
    output_dir: Path

    def __post_init__(self) -> None:
        module = self.pipeline.stages[self.cfg.explain_stage]
        pre = module.hparams.preprocessing
        if self.cfg.method == "occlusion" and self.cfg.stride > self.cfg.window:
            raise ConfigError(f"stride={self.cfg.stride} is larger than window={self.cfg.window}: "
                              "pixels between windows would never be occluded")
        if self.cfg.window > pre["image_size"]:
            raise ConfigError(f"window={self.cfg.window} is larger than the "
                              f"{self.cfg.explain_stage} stage's input ({pre['image_size']} px)")
        self.baseline = normalize(self.cfg.baseline, pre["mean"], pre["std"])
        # channels_last pays for occlusion on CPUs (docs/options.md, benchmarks/occlusion_speed.py)
        self.memory_format = (torch.channels_last if self.cfg.channels_last
                              else torch.contiguous_format)
        self.net = module.net.to(self.cfg.device, memory_format=self.memory_format)
        self.thresholds = self.pipeline.stage_thresholds()

    def maps(self, batch: torch.Tensor, target: torch.Tensor) -> tuple[np.ndarray, float]:
        """Attribution maps of a batch and the seconds per image they took."""
        cfg, started = self.cfg, time.perf_counter()
        device = torch.device(cfg.device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            maps = attribution_map(cfg.method, self.net,
                                   batch.to(device, memory_format=self.memory_format),
                                   target.to(device), cfg.window, cfg.stride, self.baseline,
                                   cfg.perturbations_per_eval, cfg.occlusion_mode)
        return maps.float().cpu().numpy(), (time.perf_counter() - started) / len(batch)

    def explain(self, names: list[str], images: list[np.ndarray],
                reports: list[Path]) -> list[dict]:
        """One summary row per image: predicted, explained and drawn; withheld by the
        out-of-distribution gate (unless accept_ood); or failed with its reason."""
        cfg = self.cfg
        batches = self.pipeline.stage_batches(images)  # preprocess each image once per stage
        pred = self.pipeline.predict_batches(batches, cfg.device)
        withheld = pred.out_of_distribution & (not cfg.accept_ood)
        diagnosed = np.flatnonzero(~withheld)
        seen, batch = batches[cfg.explain_stage]
        positive = (pred.p_pneumonia if cfg.explain_stage == "binary"
                    else pred.p_viral_given_pneumonia)
        target = torch.as_tensor((np.nan_to_num(positive)
                                  >= self.thresholds[cfg.explain_stage]).astype(np.int64))
        maps, seconds = {}, 0.0
        if len(diagnosed):
            computed, seconds = self.maps(batch[diagnosed], target[diagnosed])
            maps = dict(zip(diagnosed, computed))
        rows = []
        for i, name in enumerate(names):
            score = {"ood_score": (f"{pred.ood_score[i]:.3f}" if np.isfinite(pred.ood_score[i])
                                   else "")}
            if withheld[i]:
                rows.append({"file": name, "status": "out of distribution", **score, "reason":
                             "unlike the training X-rays (score above 1): no diagnosis; "
                             "accept_ood=true diagnoses it"})
            elif pred.decision[i] < 0 or not np.isfinite(maps[i]).all():
                rows.append(_failed(name, "the model gave a non-finite output (NaN or inf): "
                                          "no diagnosis"))
            else:
                try:
                    rows.append({**self._report(name, seen[i], maps[i], pred.probabilities[i],
                                                CLASSES[pred.decision[i]],
                                                STAGE_CLASSES[cfg.explain_stage][int(target[i])],
                                                seconds, reports[i]), **score})
                except (OSError, ValueError, RuntimeError) as err:
                    rows.append(_failed(name, "could not draw the report "
                                              f"({err.__class__.__name__}: {err})"))
        return rows

    def _report(self, name: str, seen: np.ndarray, heatmap: np.ndarray, probabilities: np.ndarray,
                decision: str, explained: str, seconds: float, report: Path) -> dict[str, str]:
        t, cfg = self.thresholds, self.cfg
        (self.output_dir / report).parent.mkdir(parents=True, exist_ok=True)
        plot_explanation(
            self.output_dir / report, seen, heatmap, probabilities, CLASSES, decision,
            f"{cfg.method}, stage {cfg.explain_stage}: evidence for '{explained}'\n"
            "red supports it, blue speaks against it",
            f"pneumonia if P >= {t['binary']:.3f}; viral if P(viral | pneumonia) >= "
            f"{t['subtype']:.3f}\n({self.pipeline.calibration.operating_point} operating point)",
            title=name)
        return {"file": name, "status": "ok", "reason": "",
                **{f"p_{c}": f"{probabilities[k]:.6f}" for k, c in enumerate(CLASSES)},
                "decision": decision, "explained_class": explained,
                "attribution_seconds": f"{seconds:.3f}", "report": report.as_posix()}


def _read(path: Path, name: str, accept_any_modality: bool) -> np.ndarray | dict:
    """The decoded image, or the row that says why there is none."""
    try:
        return read_grayscale(path, accept_any_modality)
    except NotChestRadiograph as err:
        return {**_failed(name, err.reason), "status": "not a chest radiograph"}
    except ImageReadError as err:
        return _failed(name, err.reason)


def explain_files(explainer: Explainer, input_dir: Path, files: list[Path]) -> list[dict]:
    """Summary rows for every file, `batch_images` images at a time."""
    size = explainer.cfg.batch_images
    names = [display_name(path.relative_to(input_dir)) for path in files]
    reports = report_names(names)
    rows: list[dict] = []
    for start in tqdm(range(0, len(files), size), desc="explaining", unit="batch"):
        read = {i: _read(files[i], names[i], explainer.cfg.accept_any_modality)
                for i in range(start, min(start + size, len(files)))}
        rows += [r for r in read.values() if isinstance(r, dict)]
        batch = [i for i, r in read.items() if not isinstance(r, dict)]
        if batch:
            rows += explainer.explain([names[i] for i in batch], [read[i] for i in batch],
                                      [reports[i] for i in batch])
    return rows


def explain(cfg: DictConfig) -> dict[str, Any]:
    """Explain every image of cfg.input. Returns the summary rows and the number of failures."""
    check_values(cfg)  # a wrong value stops here, before any checkpoint or image is read
    with open_dict(cfg):  # auto: the first GPU if there is one; bf16 where it is native
        cfg.device = resolve_device(cfg.device)
        cfg.precision = inference_precision(cfg.device, cfg.precision)
    input_dir = Path(cfg.input).expanduser()
    files, problems = scan_inputs(input_dir)
    inputs = [input_dir, *local_references(cfg.model_uri, cfg.binary, cfg.subtype)]
    output_dir = claim_output(cfg.paths.output_dir, inputs, RESULTS, cfg.overwrite, config=cfg)
    explainer = Explainer(cfg, explained_pipeline(cfg, output_dir / "downloads"), output_dir)
    rows = [_failed(display_name(err.path.relative_to(input_dir)), err.reason) for err in problems]
    rows += explain_files(explainer, input_dir, files[: cfg.limit or None])
    rows.sort(key=lambda r: r["file"])
    write_csv(output_dir / "summary.csv", SUMMARY_FIELDS, [[r.get(k, "") for k in SUMMARY_FIELDS]
                                                           for r in rows])
    title = f"Explanations: {display_name(Path(input_dir.name))}"
    if cfg.accept_any_modality:
        title += " (accept_any_modality=true: DICOM of any modality and body part were diagnosed)"
    if cfg.accept_ood:
        title += " (accept_ood=true: images unlike the training X-rays were diagnosed)"
    elif explainer.pipeline.ood_gate is None:
        log.warning("The binary checkpoint has no out-of-distribution gate (trained before it "
                    "existed): every image is diagnosed, whatever it shows")
    (output_dir / "index.html").write_text(index_html(rows, title, CLASSES))
    # withheld (not a chest radiograph, out of distribution) is a decision; failed is not
    failed = sum(r["status"] == "failed" for r in rows)
    withheld = sum(r["status"] not in ("ok", "failed") for r in rows)
    run_id = None
    if cfg.log_to_mlflow:
        from pneumonia.tracking import log_folder_run

        run_id = log_folder_run(cfg.paths.tracking_uri, cfg.paths.artifact_dir, cfg.experiment_name,
                                output_dir, {"method": cfg.method, "stage": cfg.explain_stage,
                                             "accept_any_modality": str(cfg.accept_any_modality),
                                             "accept_ood": str(cfg.accept_ood),
                                             "images": str(len(rows)), "failed": str(failed),
                                             "withheld": str(withheld)})
    return {"output_dir": str(output_dir), "rows": rows, "failed": failed, "withheld": withheld,
            "run_id": run_id}
