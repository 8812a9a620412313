"""The two-stage pipeline and the evaluation report, end to end on synthetic data."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from pneumonia.errors import CheckpointError, DataError, OutputError
from pneumonia.evaluate import evaluate
from pneumonia.explain.run import explain
from pneumonia.metrics import youden_threshold
from pneumonia.pipeline import combine, fit_temperature, softmax_positive
from pneumonia.serving import load_pipeline
from tests.conftest import CONF, tree_hashes


def test_composed_probabilities_sum_to_one_and_reduce_to_each_stage():
    rng = np.random.default_rng(0)
    p, r = rng.random(50), rng.random(50)  # P(pneumonia), P(viral | pneumonia)
    probs = combine(p, r)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    np.testing.assert_allclose(1 - probs[:, 0], p)  # stage 1 is P(not normal)
    # stage 2 given pneumonia
    np.testing.assert_allclose(probs[:, 2] / (probs[:, 1] + probs[:, 2]), r)
    assert (probs >= 0).all()


def test_softmax_positive_matches_torch():
    import torch

    z = np.array([[0.3, -1.2], [2.0, 2.5]])
    expected = torch.softmax(torch.tensor(z) / 2.0, dim=1)[:, 1].numpy()
    np.testing.assert_allclose(softmax_positive(z, 2.0), expected)


def _evaluate_cfg(work: Path, out: Path, **values):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("evaluate", overrides=["bootstrap.samples=50", "num_workers=0"])
    with open_dict(cfg):
        cfg.paths.work_dir = str(work)
        cfg.paths.tracking_uri = f"sqlite:///{work}/mlflow.db"
        cfg.paths.output_dir = str(out)
        for key, value in values.items():
            cfg[key] = value
    return cfg


@pytest.mark.slow
def test_evaluation_report_end_to_end(trained, tmp_path, read_only_data):
    work, runs = trained
    before = tree_hashes(read_only_data)
    # one stage by checkpoint path, the other by MLflow run id; `latest` resolves to the same;
    # the data: a read-only copy of the training folder
    cfg = _evaluate_cfg(work, tmp_path / "report", binary=runs["binary"]["best_checkpoint"],
                        subtype=runs["subtype"]["run_id"], data={"root": str(read_only_data)})
    from pneumonia.checkpoints import resolve

    latest = resolve("latest", "subtype", cfg.paths.tracking_uri, tmp_path / "dl")
    assert latest == Path(runs["subtype"]["best_checkpoint"]).resolve()
    result = evaluate(cfg)
    assert tree_hashes(read_only_data) == before  # only ever read
    out = tmp_path / "report"
    for name in ("metrics.json", "predictions.csv", "report.md", "model/MLmodel",
                 "model/artifacts/pipeline.json",
                 "confusion_binary.png", "confusion_subtype.png", "confusion_pipeline.png",
                 "roc_binary.png", "roc_subtype.png", "reliability.png"):
        assert (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())
    pipeline = load_pipeline(str(out), None, None, tmp_path / "unused")  # its model/ folder
    # the model folder is the one artifact: moved elsewhere it still loads, and explains
    moved = Path(shutil.copytree(out / "model", tmp_path / "elsewhere" / "model"))
    assert load_pipeline(str(moved), None, None, tmp_path / "x").calibration == pipeline.calibration
    from tests.test_explain import _explain_cfg

    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(next((read_only_data / "test" / "PNEUMONIA").iterdir()), images)
    explained = explain(_explain_cfg(work, images, tmp_path / "explained", runs,
                                     model_uri=str(moved), binary=None, subtype=None))
    assert [r["status"] for r in explained["rows"]] in (["ok"], ["out of distribution"])
    test = [r for r in pipeline.split() if r.split == "test"]
    # the confusion matrix counts every test image exactly once
    assert np.sum(metrics["pipeline"]["confusion"]) == len(test) == metrics["n_images"]
    rows = (out / "predictions.csv").read_text().splitlines()
    assert len(rows) == len(test) + 1
    assert rows[0] == "path,truth,p_normal,p_bacterial,p_viral,decision"
    assert metrics["training_runs"] == {"binary": runs["binary"]["run_id"],
                                        "subtype": runs["subtype"]["run_id"]}
    for section in ("binary", "subtype", "pipeline"):
        lo, hi = metrics[section]["ci"]["accuracy"]
        assert lo <= metrics[section]["metrics"]["accuracy"] <= hi

    # Thresholds come from validation images and their copy under held-out acquisition changes:
    # recomputed from those logits they agree, recomputed from test logits they do not.
    val = [r for r in pipeline.split() if r.split == "val"]
    cal = metrics["calibration"]
    assert cal["shifted_copy"]
    y_val = np.array([r.label != "normal" for r in val], dtype=int)
    y_test = np.array([r.label != "normal" for r in test], dtype=int)
    calibrated = (cal["temperature"]["binary"], cal["bias"]["binary"])
    z_val = np.vstack([pipeline.outputs(val, shifted=s)[0]["binary"] for s in (False, True)])
    # the temperature and bias too: fitted on the pooled images, not on validation alone
    assert calibrated == pytest.approx(fit_temperature(z_val, np.r_[y_val, y_val]), rel=1e-4)
    assert calibrated != pytest.approx(fit_temperature(z_val[: len(val)], y_val), rel=1e-4)
    p_val = softmax_positive(z_val, *calibrated)
    p_test = softmax_positive(pipeline.outputs(test)[0]["binary"], *calibrated)
    assert cal["thresholds"]["binary"]["youden"] == pytest.approx(
        youden_threshold(np.r_[y_val, y_val], p_val))
    assert cal["thresholds"]["binary"]["youden"] != pytest.approx(youden_threshold(y_test, p_test))

    from mlflow.tracking import MlflowClient

    client = MlflowClient(cfg.paths.tracking_uri)
    run = client.get_run(result["run_id"])
    assert run.data.tags["binary_run_id"] == runs["binary"]["run_id"]
    assert run.data.tags["subtype_run_id"] == runs["subtype"]["run_id"]
    assert "report.md" in {a.path for a in client.list_artifacts(result["run_id"])}
    assert run.data.metrics["pipeline/accuracy"] \
        == pytest.approx(metrics["pipeline"]["metrics"]["accuracy"])

    # an earlier report is never overwritten unless asked
    before = (out / "metrics.json").read_bytes()
    with pytest.raises(OutputError, match="already holds results .*nothing was overwritten"):
        evaluate(cfg)
    assert (out / "metrics.json").read_bytes() == before


@pytest.mark.slow
def test_bad_evaluation_inputs(trained, tmp_path, synthetic_root):
    work, runs = trained
    binary, subtype = runs["binary"]["best_checkpoint"], runs["subtype"]["best_checkpoint"]
    swapped = _evaluate_cfg(work, tmp_path / "a", binary=subtype, subtype=binary)
    with pytest.raises(CheckpointError, match="is a 'subtype' checkpoint; pass it as subtype="):
        evaluate(swapped)
    missing = _evaluate_cfg(work, tmp_path / "b", binary="0123456789abcdef0123456789abcdef",
                            subtype=subtype)
    with pytest.raises(CheckpointError,
                       match="binary=0123456789abcdef0123456789abcdef: MLflow run not found"):
        evaluate(missing)
    elsewhere = _evaluate_cfg(tmp_path, tmp_path / "b2", binary="latest", subtype="latest")
    with pytest.raises(CheckpointError,
                       match="binary=latest: no finished run in MLflow experiment"):
        evaluate(elsewhere)
    with pytest.raises(CheckpointError, match="no such checkpoint file or run folder"):
        evaluate(_evaluate_cfg(work, tmp_path / "c", binary="/nowhere/x.ckpt", subtype=subtype))
    not_a_checkpoint = tmp_path / "notes.ckpt"
    not_a_checkpoint.write_text("hello")
    with pytest.raises(CheckpointError, match="notes.ckpt: not a loadable checkpoint"):
        evaluate(_evaluate_cfg(work, tmp_path / "d", binary=str(not_a_checkpoint), subtype=subtype))
    # a subtype checkpoint trained on another split: its training images may be our test images
    import torch

    for key, value in (("split_seed", 7), ("skip_bad", True)):  # every key the split depends on
        other = tmp_path / f"other_{key}.ckpt"
        ckpt = torch.load(subtype, weights_only=True)
        ckpt["hyper_parameters"]["data"][key] = value
        torch.save(ckpt, other)
        with pytest.raises(CheckpointError, match="trained on different splits"):
            evaluate(_evaluate_cfg(work, tmp_path / f"f{key}", binary=binary, subtype=str(other)))
    # a copy of the data without test images
    no_test = tmp_path / "no_test"
    shutil.copytree(synthetic_root, no_test, ignore=shutil.ignore_patterns("test"))
    empty = _evaluate_cfg(work, tmp_path / "e", binary=binary, subtype=subtype)
    with open_dict(empty):
        empty.data.root = str(no_test)
    with pytest.raises(DataError, match="the test split of .*no_test holds no images"):
        evaluate(empty)


@pytest.mark.slow
def test_an_unreadable_test_image_is_reported_and_the_rest_scored(trained, synthetic_root,
                                                                   tmp_path):
    from tests.conftest import corrupt_pixels

    work, runs = trained
    data = tmp_path / "data"
    shutil.copytree(synthetic_root, data)
    broken = sorted((data / "test" / "NORMAL").glob("*.jpeg"))[0]
    corrupt_pixels(Path(shutil.copy(broken, tmp_path / "source.jpeg")), broken)
    cfg = _evaluate_cfg(work, tmp_path / "out", binary=runs["binary"]["best_checkpoint"],
                        subtype=runs["subtype"]["best_checkpoint"], log_to_mlflow=False)
    with open_dict(cfg):
        cfg.data.root = str(data)
    metrics = evaluate(cfg)["metrics"]
    total = len(list((data / "test").rglob("*.jpeg")))
    assert metrics["unscored_images"] == [
        {"path": str(broken),
         "reason": "cannot decode image (broken data stream when reading image file)"}]
    assert metrics["n_images"] == metrics["pipeline"]["images"] == total - 1
    assert str(broken) in (tmp_path / "out" / "report.md").read_text()


def test_an_old_evaluation_folder_says_how_to_recreate_it(tmp_path):
    (tmp_path / "pipeline.json").write_text('{"checkpoints": {"binary": "/abs/binary.ckpt"}}')
    for reference in (tmp_path, tmp_path / "pipeline.json"):
        with pytest.raises(CheckpointError, match="earlier version.*evaluate.py binary="):
            load_pipeline(str(reference), None, None, tmp_path / "dl")
