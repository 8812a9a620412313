"""The pipeline as an MLflow pyfunc model: logged, moved, registered, served."""

from __future__ import annotations

import base64
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from pneumonia.io import read_grayscale
from pneumonia.pipeline import Calibration, TwoStagePipeline
from pneumonia.serving import (
    OUTPUTS,
    load_pipeline_model,
    log_pipeline_model,
    register_model,
    tracking,
)
from pneumonia.stages import CLASSES
from pneumonia.tracking import experiment_id


def _pipeline(runs: dict) -> TwoStagePipeline:
    """The trained stages (stage 2 as a two-member ensemble) with a calibration that is not
    the identity, so that a model that dropped it would answer differently."""
    binary = runs["binary"]["best_checkpoint"]
    subtype = runs["subtype"]["best_checkpoint"]
    pipeline = TwoStagePipeline.from_checkpoints(binary, [subtype, subtype], tta=True)
    pipeline.calibration = Calibration({"binary": 1.7, "subtype": 0.6},
                                       {"binary": {"youden": 0.42, "default": 0.5},
                                        "subtype": {"youden": 0.55, "default": 0.5}},
                                       target_sensitivity=0.99, operating_point="youden")
    return pipeline


def _images(root: Path, n: int = 4) -> list[Path]:
    return sorted(root.rglob("*.jpeg"))[:n]


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


@pytest.fixture(scope="module")
def logged(trained, tmp_path_factory):
    """The pipeline logged as a model of an evaluation-like run: (work, runs, pipeline, info)."""
    work, runs = trained
    uri = f"sqlite:///{work}/mlflow.db"
    client = MlflowClient(uri)
    run = client.create_run(experiment_id(client, "serving-test", str(work / "mlartifacts")))
    pipeline = _pipeline(runs)
    info = log_pipeline_model(pipeline, run.info.run_id, uri)
    return work, uri, pipeline, info


def _expected(pipeline: TwoStagePipeline, paths: list[Path]) -> np.ndarray:
    images = [read_grayscale(p) for p in paths]
    return pipeline.predict_batches(pipeline.stage_batches(images)).probabilities


@pytest.mark.slow
def test_logged_model_predicts_as_the_pipeline_and_survives_a_move(logged, synthetic_root, tmp_path):
    work, uri, pipeline, info = logged
    paths = _images(synthetic_root)
    request = pd.DataFrame({"image": [_b64(p) for p in paths]})
    assert info.model_id and info.model_uri == f"models:/{info.model_id}"
    (tmp_path / "download").mkdir()
    with tracking(uri):
        folder = Path(mlflow.artifacts.download_artifacts(info.model_uri,
                                                          dst_path=str(tmp_path / "download")))
    out = mlflow.pyfunc.load_model(str(folder)).predict(request)
    assert list(out.columns) == list(OUTPUTS)
    expected = _expected(pipeline, paths)
    np.testing.assert_allclose(out[["p_normal", "p_bacterial", "p_viral"]].to_numpy(), expected,
                               atol=1e-6)
    assert set(out["decision"]) <= set(CLASSES) and (out["error"] == "").all()
    assert (out["threshold_binary"] == 0.42).all() and (out["threshold_subtype"] == 0.55).all()
    # no absolute path inside the model's own files: a moved copy loads and answers the same
    flavor = yaml.safe_load((folder / "MLmodel").read_text())["flavors"]["python_function"]
    assert all(not Path(a["path"]).is_absolute() for a in flavor["artifacts"].values())
    assert str(work) not in (folder / "artifacts" / "pipeline.json").read_text()
    moved = shutil.move(str(folder), str(tmp_path / "elsewhere"))
    assert not folder.exists()
    again = mlflow.pyfunc.load_model(moved).predict(request)
    pd.testing.assert_frame_equal(again, out)
    loaded = load_pipeline_model(moved, None, tmp_path / "unused")
    assert loaded.calibration == pipeline.calibration and loaded.tta
    assert len(loaded.checkpoints["subtype"]) == 2


@pytest.mark.slow
def test_registered_model_loads_by_alias(logged, synthetic_root, tmp_path):
    _, uri, pipeline, info = logged
    version = register_model(info.model_uri, "pneumonia-test", "champion", uri)
    mv = MlflowClient(uri).get_model_version_by_alias("pneumonia-test", "champion")
    assert str(mv.version) == version and mv.source == info.model_uri
    loaded = load_pipeline_model("models:/pneumonia-test@champion", uri, tmp_path / "dl")
    paths = _images(synthetic_root, 2)
    np.testing.assert_allclose(_expected(loaded, paths), _expected(pipeline, paths), atol=1e-6)


def test_unreadable_image_answers_for_itself(logged, synthetic_root, tmp_path):
    _, _, pipeline, _ = logged
    from pneumonia.serving import predict_images

    good = _images(synthetic_root, 2)
    values = [_b64(good[0]), base64.b64encode(b"hello, not an image").decode(), "%%%", 7,
              _b64(good[1])]
    out = predict_images(pipeline, values)
    assert list(out["error"][[0, 4]]) == ["", ""]
    assert "not a JPEG, PNG or DICOM" in out["error"][1]
    assert "base64" in out["error"][2] and "base64" in out["error"][3]
    assert out.loc[1:3, "p_normal"].isna().all() and (out.loc[1:3, "decision"] == "").all()
    np.testing.assert_allclose(out.loc[[0, 4], ["p_normal", "p_bacterial", "p_viral"]].to_numpy(),
                               _expected(pipeline, good), atol=1e-6)


@pytest.mark.slow
def test_evaluation_logs_registers_and_reevaluates_the_model(trained, tmp_path):
    from pneumonia.evaluate import evaluate
    from tests.test_evaluate import _evaluate_cfg

    work, runs = trained
    cfg = _evaluate_cfg(work, tmp_path / "report", binary=runs["binary"]["best_checkpoint"],
                        subtype=runs["subtype"]["best_checkpoint"], register="pneumonia-eval")
    result = evaluate(cfg)
    client = MlflowClient(cfg.paths.tracking_uri)
    model_id = result["model_uri"].removeprefix("models:/")
    model = client.get_logged_model(model_id)
    assert model.source_run_id == result["run_id"]
    linked = {m.key: m.value for m in model.metrics}
    assert linked["pipeline/accuracy"] == pytest.approx(result["metrics"]["pipeline"]["metrics"]["accuracy"])
    version = client.get_model_version_by_alias("pneumonia-eval", "champion")
    assert version.source == result["model_uri"] and str(version.version) == result["model_version"]
    # the registered model evaluates to the same figures, with its own calibration
    again = evaluate(_evaluate_cfg(work, tmp_path / "again", model="models:/pneumonia-eval@champion",
                                   log_to_mlflow=False))
    assert again["metrics"]["pipeline"]["metrics"] == result["metrics"]["pipeline"]["metrics"]
    assert again["metrics"]["calibration"] == result["metrics"]["calibration"]

