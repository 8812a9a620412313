"""The pipeline as an MLflow pyfunc model: logged, moved, registered, served."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import time
import urllib.error
import urllib.request
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
    load_pipeline,
    log_pipeline_model,
    predict_images,
    register_model,
    save_pipeline_model,
    tracking,
)
from pneumonia.stages import CLASSES
from pneumonia.tracking import EXPERIMENT_KIND, experiment_id
from tests import servers
from tests.test_dicom import PATIENT_ID, PATIENT_NAME, _dataset, _save, _xray


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


@pytest.mark.slow
def test_concurrent_requests_each_get_their_own_answer(trained, synthetic_root):
    # the scoring server answers requests in threads sharing one pipeline (found under load:
    # the OOD gate's hooks on the shared network saw the other threads' passes)
    from concurrent.futures import ThreadPoolExecutor

    pipeline = _pipeline(trained[1])
    values = [_b64(p) for p in _images(synthetic_root, 8)]
    sizes = [1 + i % 8 for i in range(48)]
    alone = {n: predict_images(pipeline, values[:n]) for n in set(sizes)}
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda n: predict_images(pipeline, values[:n]), sizes))
    for n, answer in zip(sizes, together):
        pd.testing.assert_frame_equal(answer, alone[n], check_exact=False, rtol=1e-5)


@pytest.fixture(scope="module")
def logged(trained, tmp_path_factory):
    """The pipeline logged as a model of an evaluation-like run: (work, runs, pipeline, info)."""
    work, runs = trained
    uri = f"sqlite:///{work}/mlflow.db"
    client = MlflowClient(uri)
    run = client.create_run(experiment_id(client, "serving-test", str(work / "mlartifacts")))
    pipeline = _pipeline(runs)
    folder = save_pipeline_model(pipeline, tmp_path_factory.mktemp("model") / "model")
    info = log_pipeline_model(folder, run.info.run_id, uri)
    return work, uri, pipeline, info


def _expected(pipeline: TwoStagePipeline, paths: list[Path]) -> np.ndarray:
    """The pipeline's probabilities in process; NaN where its out-of-distribution gate withholds
    the image (a gate fitted on the synthetic set's few validation images flags some)."""
    images = [read_grayscale(p) for p in paths]
    pred = pipeline.predict_batches(pipeline.stage_batches(images))
    return np.where(pred.out_of_distribution[:, None], np.nan, pred.probabilities)


@pytest.mark.slow
def test_logged_model_predicts_as_the_pipeline_and_survives_a_move(logged, synthetic_root,
                                                                   tmp_path):
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
    np.testing.assert_allclose(out[["p_normal", "p_bacterial", "p_viral"]].astype(float).to_numpy(),
                               expected, atol=1e-6)
    withheld = np.isnan(expected).any(axis=1)
    assert set(out["decision"][~withheld]) <= set(CLASSES) and (out["error"][~withheld] == "").all()
    assert out["error"][withheld].str.startswith("out of distribution").all()
    assert (out["threshold_binary"] == 0.42).all() and (out["threshold_subtype"] == 0.55).all()
    # no absolute path inside the model's own files: a moved copy loads and answers the same
    flavor = yaml.safe_load((folder / "MLmodel").read_text())["flavors"]["python_function"]
    assert all(not Path(a["path"]).is_absolute() for a in flavor["artifacts"].values())
    spec = json.loads((folder / "artifacts" / "pipeline.json").read_text())
    assert str(work) not in json.dumps(spec)
    # each stage's initial weights are named (these stages were trained from scratch)
    assert spec["weights"] == {stage: {"source": "none (random initialisation)", "sha256": ""}
                               for stage in ("binary", "subtype")}
    moved = shutil.move(str(folder), str(tmp_path / "elsewhere"))
    assert not folder.exists()
    again = mlflow.pyfunc.load_model(moved).predict(request)
    pd.testing.assert_frame_equal(again, out)
    loaded = load_pipeline(moved, None, None, tmp_path / "unused")
    assert loaded.calibration == pipeline.calibration and loaded.tta
    assert len(loaded.checkpoints["subtype"]) == 2


@pytest.mark.slow
def test_registered_model_loads_by_alias(logged, synthetic_root, tmp_path):
    _, uri, pipeline, info = logged
    version = register_model(info.model_uri, "pneumonia-test", "champion", uri)
    mv = MlflowClient(uri).get_model_version_by_alias("pneumonia-test", "champion")
    assert str(mv.version) == version and mv.source == info.model_uri
    loaded = load_pipeline("models:/pneumonia-test@champion", None, uri, tmp_path / "dl")
    assert loaded.calibration == pipeline.calibration
    paths = _images(synthetic_root, 2)
    np.testing.assert_allclose(_expected(loaded, paths), _expected(pipeline, paths), atol=1e-6)


def test_unreadable_image_answers_for_itself(logged, synthetic_root, tmp_path):
    _, _, pipeline, _ = logged

    good = _images(synthetic_root, 2)
    values = [_b64(good[0]), base64.b64encode(b"hello, not an image").decode(), "%%%", 7,
              _b64(good[1])]
    out = predict_images(pipeline, values)
    assert list(out["error"][[0, 4]]) == ["", ""]
    assert "not a JPEG, PNG or DICOM" in out["error"][1]
    assert "base64" in out["error"][2] and "base64" in out["error"][3]
    # no diagnosis is None, which the scoring server writes as JSON null (NaN is not JSON)
    assert out.loc[1:3, ["p_normal", "ood_score"]].map(lambda v: v is None).all().all()
    assert (out.loc[1:3, "decision"] == "").all()
    probabilities = out.loc[[0, 4], ["p_normal", "p_bacterial", "p_viral"]].astype(float)
    np.testing.assert_allclose(probabilities.to_numpy(), _expected(pipeline, good), atol=1e-6)


def test_requests_are_decoded_in_memory_as_files_are_read(tmp_path, monkeypatch):
    import tempfile

    from PIL import Image

    from pneumonia.errors import NotChestRadiograph
    from pneumonia.serving import decode_image

    chest = _save(_dataset(_xray(), BodyPartExamined="CHEST"), tmp_path / "chest.dcm")
    knee = _save(_dataset(_xray(), BodyPartExamined="KNEE"), tmp_path / "knee.dcm")
    png = tmp_path / "x.png"
    Image.fromarray(read_grayscale(chest)).save(png)

    def no_temporary_files(*args, **kwargs):
        raise AssertionError("a request wrote a temporary file")

    for name in ("TemporaryDirectory", "NamedTemporaryFile", "mkstemp", "mkdtemp"):
        monkeypatch.setattr(tempfile, name, no_temporary_files)
    for path in (chest, png):
        np.testing.assert_array_equal(decode_image(_b64(path)), read_grayscale(path))
    with pytest.raises(NotChestRadiograph, match="BodyPartExamined=KNEE") as err:
        decode_image(_b64(knee))
    assert str(tmp_path) not in str(err.value)


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
    assert linked["pipeline/accuracy"] == pytest.approx(
        result["metrics"]["pipeline"]["metrics"]["accuracy"])
    version = client.get_model_version_by_alias("pneumonia-eval", "champion")
    assert version.source == result["model_uri"] and str(version.version) == result["model_version"]
    # the registered model evaluates to the same figures, with its own calibration
    again = evaluate(_evaluate_cfg(work, tmp_path / "again",
                                   model_uri="models:/pneumonia-eval@champion",
                                   log_to_mlflow=False))
    assert again["metrics"]["pipeline"]["metrics"] == result["metrics"]["pipeline"]["metrics"]
    assert again["metrics"]["calibration"] == result["metrics"]["calibration"]


def _strict(constant: str):
    raise ValueError(f"{constant} is not JSON")  # what JSON.parse and Go's encoding/json say


def _post(url: str, body: bytes) -> tuple[int, dict]:
    """POST and parse the answer as strict JSON (Python's json module accepts NaN by default)."""
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read(), parse_constant=_strict)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}", parse_constant=_strict)


@pytest.mark.slow
def test_mlflow_models_serve_answers_per_image_and_survives_a_bad_request(logged, synthetic_root,
                                                                        tmp_path):
    _, uri, pipeline, info = logged
    register_model(info.model_uri, "pneumonia-serve", "champion", uri)
    good = _images(synthetic_root, 2)
    text = tmp_path / "notes.jpeg"
    text.write_text("this is a text file, not an X-ray")
    dicom = _save(_dataset(read_grayscale(good[1]), BodyPartExamined="CHEST"),
                  tmp_path / "chest.dcm")
    # a chest DICOM by its tags whose pixels (a smooth gradient) are unlike the training X-rays
    unlike = _save(_dataset(_xray(), BodyPartExamined="CHEST"), tmp_path / "gradient.dcm")
    in_process = predict_images(pipeline, [_b64(dicom)]).iloc[0]
    port, log = servers.free_port(), tmp_path / "serve.log"
    process = servers.start([servers.MLFLOW, "models", "serve", "-m",
                             "models:/pneumonia-serve@champion", "--env-manager", "local",
                             "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                            log, {"MLFLOW_TRACKING_URI": uri})
    try:
        servers.wait_ready(process, f"http://127.0.0.1:{port}/ping", log)
        url = f"http://127.0.0.1:{port}/invocations"
        body = json.dumps({"dataframe_records": [{"image": _b64(p)}
                                                 for p in (good[0], text, dicom, unlike)]})
        status, answer = _post(url, body.encode())
        assert status == 200, answer
        rows = answer["predictions"]
        assert rows[0]["error"] == "" and rows[0]["decision"] in CLASSES \
            and rows[0]["ood_score"] <= 1
        assert "not a JPEG, PNG or DICOM" in rows[1]["error"] and rows[1]["decision"] == ""
        assert rows[1]["p_normal"] is None and rows[3]["p_viral"] is None
        # the DICOM is answered as the pipeline answers it in process (diagnosed or withheld)
        assert (rows[2]["error"], rows[2]["decision"]) == (in_process["error"],
                                                           in_process["decision"])
        assert rows[2]["ood_score"] == pytest.approx(in_process["ood_score"], rel=1e-5)
        assert rows[3]["error"].startswith("out of distribution") and rows[3]["decision"] == ""
        assert rows[3]["ood_score"] > 1
        np.testing.assert_allclose([rows[0][c] for c in ("p_normal", "p_bacterial", "p_viral")],
                                   _expected(pipeline, good[:1])[0], atol=1e-6)
        assert rows[0]["threshold_binary"] == 0.42 and rows[0]["threshold_subtype"] == 0.55
        for malformed in (b"{not json",
                          json.dumps({"dataframe_records": [{"picture": "x"}]}).encode()):
            status, answer = _post(url, malformed)
            assert 400 <= status < 500 and answer.get("message"), (status, answer)
        # too many images, or too many bytes, are refused before any image is decoded
        for values, refused in (([""] * 10_000, "10000 images in one request; at most 256"),
                                (["A" * (33 * 2**20)] * 2, "66 MiB of base64 images")):
            body = json.dumps({"dataframe_records": [{"image": v} for v in values]}).encode()
            status, refusal = _post(url, body)
            assert status == 400 and refusal["message"].startswith(refused), refusal
            assert len(json.dumps(refusal)) < 1000  # the request is not echoed back
        status, again = _post(url, json.dumps(
            {"dataframe_records": [{"image": _b64(good[1])}]}).encode())
        assert status == 200 and again["predictions"][0]["error"] == ""
    finally:
        assert servers.stop(process) == []
    served = json.dumps(answer) + json.dumps(rows) + log.read_text(errors="replace")
    assert PATIENT_NAME not in served and PATIENT_ID not in served and "Doe" not in served


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_own_group_script_stops_the_servers_whole_group(tmp_path, sig):
    """What `make mlflow-ui`, `make mlflow-server` and `make serve` run under: stopping the
    script stops every process of the server's group, helpers included."""
    wrapper = servers.start([str(servers.REPO / "scripts" / "own-group.sh"), "sh", "-c",
                             "sleep 300 & sleep 300 & wait"], tmp_path / "log")
    deadline = time.monotonic() + 10
    while not _children(wrapper.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    (group,) = _children(wrapper.pid)
    while len(servers.group_members(group)) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(servers.group_members(group)) == 3  # the shell and its two helpers
    os.kill(wrapper.pid, sig)
    wrapper.wait(timeout=30)
    assert servers.group_members(group) == []


@pytest.mark.slow
def test_experiments_open_on_their_runs(trained, tmp_path):
    """Training's experiments (made by Lightning's logger) and those evaluation and explanation
    make are tagged as model development, so MLflow 3's UI opens them on their runs."""
    work, _ = trained
    client = MlflowClient(f"sqlite:///{work}/mlflow.db")
    for name in ("binary", "subtype"):
        assert client.get_experiment_by_name(name).tags[EXPERIMENT_KIND[0]] == EXPERIMENT_KIND[1]
    fresh = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    made = fresh.get_experiment(experiment_id(fresh, "explain", str(tmp_path / "artifacts")))
    assert made.tags[EXPERIMENT_KIND[0]] == "custom_model_development"


def test_pointing_mlflow_at_a_store_leaves_the_process_as_it_was(tmp_path, monkeypatch):
    """MLflow's setters export MLFLOW_TRACKING_URI/MLFLOW_REGISTRY_URI; left behind, every later
    client and subprocess (a training run, a server test) would log or register there."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry
    from mlflow.tracking._tracking_service import utils as service

    from pneumonia.serving import tracking

    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/outer.db")
    before = service._tracking_uri, registry._registry_uri
    with tracking(f"sqlite:///{tmp_path}/inner.db"):
        assert mlflow.get_registry_uri() == f"sqlite:///{tmp_path}/inner.db"
    assert (service._tracking_uri, registry._registry_uri) == before
    assert "MLFLOW_REGISTRY_URI" not in os.environ
    assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path}/outer.db"
