"""The calibrated two-stage pipeline as one artifact, an MLflow pyfunc model folder, and the one
loader of pipelines.

The folder (docs/deploy.md) holds each stage's weights (every ensemble member's) as safetensors
with the JSON that rebuilds it, `pipeline.json` (classes, calibration, thresholds, TTA, weights
provenance, versions) and `metadata.json` (the contract, pneumonia.metadata); the model is
"models from code" (model_code.py) with this package as its code, and pins every dependency in
requirements.txt: it loads in a fresh environment without the project, and nothing in it is
unpickled. No absolute path is stored. `evaluate.py` writes it into its output folder (`model/`)
and, with MLflow, logs it. The request and answer columns are INPUT and OUTPUTS
(`predict_images`).
"""

from __future__ import annotations

import base64
import binascii
import importlib.metadata
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.tracking import MlflowClient
from mlflow.tracking._model_registry import utils as registry_utils
from mlflow.tracking._tracking_service import utils as tracking_utils
from mlflow.types import ColSpec, Schema
from PIL import Image

from pneumonia.checkpoints import resolve_all, save_stage_weights
from pneumonia.errors import CheckpointError, ImageReadError
from pneumonia.io import decode_grayscale
from pneumonia.metadata import (
    MAX_REQUEST_BYTES,
    MAX_REQUEST_IMAGES,
    NONFINITE_ERROR,
    OOD_ERROR,
    write_metadata,
)
from pneumonia.pipeline import Calibration, TwoStagePipeline, stage_members
from pneumonia.stages import CLASSES, STAGE_CLASSES
from pneumonia.tracking import environment

MODEL_NAME = "pipeline"  # the logged model's name inside an evaluation run
_OLD_FORMAT = (": an evaluation folder of an earlier version, whose pipeline.json named its "
               "checkpoints by absolute path; re-create the model folder with evaluate.py "
               "binary=<checkpoint> subtype=<checkpoint>, which writes <output folder>/model")
PROBABILITIES = tuple(f"p_{c}" for c in CLASSES)
OUTPUTS = (*PROBABILITIES, "ood_score", "decision", "threshold_binary", "threshold_subtype",
           "error")
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "image")]),
    outputs=Schema([ColSpec("string" if c in ("decision", "error") else "double", c)
                    for c in OUTPUTS]))
INPUT = {"column": "image", "content": "base64 text of one JPEG, PNG or DICOM file",
         "diagnosed": "chest radiographs (a DICOM header of another modality is refused)"}
_CHUNK = 16


def decode_image(value: Any) -> np.ndarray:
    """An (H, W) uint8 image from base64 text of JPEG, PNG or DICOM bytes.

    Raises ImageReadError whose reason names no file path and carries no DICOM identifier."""
    if not isinstance(value, str):
        raise ImageReadError("image", "expected base64 text of a JPEG, PNG or DICOM file")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ImageReadError("image", "not valid base64 text") from None
    return decode_grayscale(data)  # decoded from memory: nothing is written to disk


def _row(probabilities: np.ndarray | None, score: float, decision: int,
         error: str) -> dict[str, Any]:
    """One output row without the thresholds; with an `error`, no probabilities or decision."""
    values = np.full(len(PROBABILITIES), np.nan) if error else probabilities
    return {**dict(zip(PROBABILITIES, map(float, values))), "ood_score": float(score),
            "decision": "" if error else CLASSES[decision], "error": error}


def predict_images(pipeline: TwoStagePipeline, values: list[Any]) -> pd.DataFrame:
    """One output row per input value; one that cannot be read or that the gate flags gets no
    probabilities (null), no decision and its error."""
    decoded, rows = {}, {}
    for i, value in enumerate(values):
        try:
            decoded[i] = decode_image(value)
        except ImageReadError as err:
            rows[i] = _row(None, float("nan"), -1, err.reason)
    keys = list(decoded)
    for start in range(0, len(keys), _CHUNK):  # preprocessed and predicted together
        chunk = keys[start:start + _CHUNK]
        pred = pipeline.predict_batches(pipeline.stage_batches([decoded[i] for i in chunk]))
        for i, probabilities, decision, ood, score in zip(chunk, pred.probabilities, pred.decision,
                                                          pred.out_of_distribution, pred.ood_score):
            error = OOD_ERROR if ood else "" if decision >= 0 else NONFINITE_ERROR
            rows[i] = _row(probabilities, score, decision, error)
    frame = pd.DataFrame([rows[i] for i in range(len(values))], columns=list(OUTPUTS))
    for stage, threshold in pipeline.stage_thresholds().items():
        frame[f"threshold_{stage}"] = threshold
    # No diagnosis is null in the JSON answer: NaN is not JSON, and strict parsers refuse it.
    return frame.astype(object).where(frame.notna(), None)


class RequestRefused(MlflowException):
    """A request over the limits: HTTP 400 with this message alone. MLflow's scoring server
    prefixes an MlflowException's message with the whole request it failed on (hundreds of
    MB here), so the message keeps its own text."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)
        self._refusal = message

    @property
    def message(self) -> str:
        return self._refusal

    @message.setter
    def message(self, _value: str) -> None:
        pass


def check_request(values: list[Any]) -> None:
    """Refuse a request over MAX_REQUEST_IMAGES images or MAX_REQUEST_BYTES of base64 text,
    before any image is decoded."""
    if len(values) > MAX_REQUEST_IMAGES:
        raise RequestRefused(f"{len(values)} images in one request; at most "
                             f"{MAX_REQUEST_IMAGES}: split it into several requests")
    size = sum(len(v) for v in values if isinstance(v, str))
    if size > MAX_REQUEST_BYTES:
        raise RequestRefused(f"{size / 2**20:.0f} MiB of base64 images in one request; at most "
                             f"{MAX_REQUEST_BYTES // 2**20} MiB: split it into several requests")


class PipelineModel(mlflow.pyfunc.PythonModel):
    """MLflow's view of the pipeline: a DataFrame with `image` in, one row per image out."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        """The pipeline the model folder's artifacts describe (paths as MLflow resolved them)."""
        spec = json.loads(Path(context.artifacts["pipeline"]).read_text())
        if tuple(spec["classes"]) != CLASSES:
            raise CheckpointError(f"the model's classes {spec['classes']} are not {CLASSES}")
        paths = {stage: [context.artifacts[key] for key in keys]
                 for stage, keys in spec["checkpoints"].items()}
        self.pipeline = TwoStagePipeline.from_checkpoints(paths["binary"], paths["subtype"],
                                                          tta=spec["tta"])
        self.pipeline.calibration = Calibration(**spec["calibration"])

    def predict(self, context: mlflow.pyfunc.PythonModelContext, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Rows of OUTPUTS for the `image` column of `model_input` (`check_request`'s limits)."""
        values = list(model_input["image"])
        check_request(values)
        return predict_images(self.pipeline, values)


def model_artifacts(pipeline: TwoStagePipeline, folder: Path,
                    evaluation: dict | None = None) -> dict[str, str]:
    """Writes each stage's weights (every ensemble member's, as the pipeline holds them, adapted
    or not) as safetensors with the JSON that rebuilds the network, pipeline.json and
    metadata.json into `folder`; returns them as pyfunc artifacts (key -> file)."""
    spec = {"format": 2, "classes": list(CLASSES), "input": INPUT, "outputs": list(OUTPUTS),
            "tta": pipeline.tta, "checkpoints": {},
            "calibration": asdict(pipeline.calibration),
            "thresholds": pipeline.stage_thresholds(),
            "weights": {stage: dict(pipeline.stages[stage].hparams["weights"])
                        for stage in STAGE_CLASSES},
            "versions": environment()}
    for stage in STAGE_CLASSES:
        members = stage_members(pipeline.stages[stage])
        spec["checkpoints"][stage] = [f"{stage}_{i}" for i in range(len(members))]
        for key, member in zip(spec["checkpoints"][stage], members):
            save_stage_weights(member, folder / key)
    (folder / "pipeline.json").write_text(json.dumps(spec, indent=2))
    write_metadata(folder / "metadata.json", pipeline, spec, evaluation)
    return {_artifact_key(path): str(path) for path in sorted(folder.iterdir())}


def _artifact_key(path: Path) -> str:
    """binary_0.json -> binary_0 (what pipeline.json names), binary_0.safetensors ->
    binary_0_tensors, pipeline.json -> pipeline."""
    return path.stem + ("_tensors" if path.suffix == ".safetensors" else "")


def input_example() -> pd.DataFrame:
    """One small synthetic PNG as base64 text: the request shape the model accepts."""
    ramp = np.add.outer(np.arange(96), np.arange(96)).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, format="PNG")
    return pd.DataFrame({"image": [base64.b64encode(buffer.getvalue()).decode("ascii")]})


def requirements() -> list[str]:
    """Every package the project depends on (pyproject's dependencies, extras left out) pinned to
    the version installed here; a local build tag (torch's +cu130) is dropped."""
    pinned = []
    for requirement in importlib.metadata.requires("pneumonia") or []:
        if "extra ==" in requirement:
            continue
        name = re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0]
        pinned.append(f"{name}=={importlib.metadata.version(name).split('+')[0]}")
    return pinned


@contextmanager
def tracking(uri: str | None) -> Iterator[None]:
    """MLflow's fluent API pointed at `uri` (tracking and registry) for the block; afterwards the
    process is as it was. MLflow's setters also export MLFLOW_TRACKING_URI and
    MLFLOW_REGISTRY_URI, which later clients and every subprocess would inherit, so those are
    restored too, and URIs that were unset are unset again (MLflow keeps them in its modules)."""
    saved_env = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    saved_tracking, saved_registry = tracking_utils._tracking_uri, registry_utils._registry_uri
    if uri:
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved_tracking)  # None unsets it
        registry_utils._registry_uri = saved_registry
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _pyfunc_options() -> dict[str, Any]:
    """What MLflow is told of the model besides its artifacts: the model as code (model_code.py,
    no cloudpickle), this package's source as code_paths, the pinned requirements."""
    package = Path(__file__).resolve().parent
    return dict(python_model=str(package / "model_code.py"), code_paths=[str(package)],
                signature=SIGNATURE, input_example=input_example(),
                pip_requirements=requirements())


def save_pipeline_model(pipeline: TwoStagePipeline, folder: Path, overwrite: bool = False,
                        evaluation: dict | None = None) -> Path:
    """Writes the pipeline as a model folder (no tracking server involved); `evaluation`, the
    metrics evaluate() reports, gives metadata.json its headline figures."""
    if folder.exists() and overwrite:
        shutil.rmtree(folder)
    with tempfile.TemporaryDirectory() as staging:
        mlflow.pyfunc.save_model(path=str(folder),
                                 artifacts=model_artifacts(pipeline, Path(staging), evaluation),
                                 **_pyfunc_options())
    for cache in (folder / "code").rglob("__pycache__"):
        shutil.rmtree(cache)
    return folder


def log_pipeline_model(folder: Path, run_id: str, tracking_uri: str) -> ModelInfo:
    """Logs a model folder that `save_pipeline_model` wrote, its weights, pipeline.json and
    metadata.json as they are, as an MLflow 3 logged model of run `run_id`."""
    artifacts = {_artifact_key(path): str(path) for path in (folder / "artifacts").iterdir()}
    with tracking(tracking_uri), mlflow.start_run(run_id=run_id):
        return mlflow.pyfunc.log_model(name=MODEL_NAME, artifacts=artifacts, **_pyfunc_options())


def register_model(model_uri: str, name: str, alias: str | None, tracking_uri: str) -> str:
    """Registers a logged model as a new version of `name` (with `alias`); returns the version."""
    with tracking(tracking_uri):
        version = mlflow.register_model(model_uri, name).version
    if alias:
        MlflowClient(tracking_uri, registry_uri=tracking_uri).set_registered_model_alias(
            name, alias, version)
    return str(version)


def load_pipeline(model: str | None, stages: dict | None, tracking_uri: str | None,
                  downloads: Path, tta: bool = False) -> TwoStagePipeline:
    """The one loader: a calibrated pipeline from `model` (a model folder, an evaluation's output
    folder, `models:/<name>@<alias>`, `models:/<id>` or `runs:/<id>/pipeline`), else an
    uncalibrated one from `stages` ({"binary": ref, "subtype": ref}, each a checkpoint, run
    folder, MLflow run id or `latest`, or a list of them, averaged)."""
    if not model:
        paths = {s: resolve_all(stages[s], s, tracking_uri, downloads / s) for s in STAGE_CLASSES}
        return TwoStagePipeline.from_checkpoints(paths["binary"], paths["subtype"], tta=tta)
    local = Path(model).expanduser()
    if (local / "model" / "MLmodel").is_file():  # an evaluation's output folder
        local = local / "model"
    if local.exists():
        if not (local / "MLmodel").is_file():
            old = local.name == "pipeline.json" or (local / "pipeline.json").is_file()
            raise CheckpointError(f"{model} is not a model folder (no MLmodel file)"
                                  + (_OLD_FORMAT if old else ""))
        model = str(local.resolve())
    else:
        downloads.mkdir(parents=True, exist_ok=True)
    with tracking(tracking_uri):
        loaded = mlflow.pyfunc.load_model(model,
                                          dst_path=None if local.exists() else str(downloads))
    return loaded.unwrap_python_model().pipeline
