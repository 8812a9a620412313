"""The out-of-distribution gate: fitted on validation only, stored in the checkpoint, applied by
evaluate, explain and the served model."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import torch
from sklearn.covariance import LedoitWolf

from pneumonia.checkpoints import AtomicCheckpointIO, load_stage, read_checkpoint
from pneumonia.data.transforms import Preprocessing
from pneumonia.evaluate import evaluate
from pneumonia.explain.run import explain
from pneumonia.ood import MAX_DIMS, OODGate, describe, gaussian, stage_descriptions
from pneumonia.pipeline import ScoredImages, TwoStagePipeline, recorded_split
from pneumonia.serving import predict_images
from tests.test_evaluate import _evaluate_cfg
from tests.test_explain import _explain_cfg
from tests.test_serving import _b64, _images


def test_the_gate_flags_its_fraction_of_validation_and_what_lies_elsewhere():
    generator = torch.Generator().manual_seed(0)
    mixing = {"early": torch.randn(8, 8, generator=generator),
              "late": torch.randn(16, 16, generator=generator)}

    def draw(n, shift=None):  # two stages' descriptions of n images; `shift` moves one stage
        return {k: torch.randn(n, len(m), generator=generator) @ m + (4.0 if k == shift else 0.0)
                for k, m in mixing.items()}

    gate = OODGate.fit(draw(3000), draw(1000), fraction=0.05)
    assert (gate.score(draw(2000)) > 1).float().mean() == pytest.approx(0.05, abs=0.02)
    for stage in mixing:  # an image unlike the training images at any one stage is flagged
        assert (gate.score(draw(200, shift=stage)) > 1).all()
    # plain tensors and numbers: it survives a weights-only load unchanged
    buffer = io.BytesIO()
    torch.save(gate.state(), buffer)
    buffer.seek(0)
    again = OODGate.from_state(torch.load(buffer, weights_only=True))
    images = draw(8)
    torch.testing.assert_close(again.score(images), gate.score(images))
    for fraction in (0.0, 0.5):
        with pytest.raises(ValueError, match="ood_fraction"):
            OODGate.fit(draw(100), draw(100), fraction)


@pytest.mark.parametrize("n, d", [(500, 40), (30, 200)])  # also fewer images than dimensions
def test_the_gaussian_is_sklearns_ledoit_wolf_estimate(n, d):
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(n)) * torch.linspace(0.1, 3, d)
    mean, precision = gaussian(x)
    reference = LedoitWolf().fit(x.double().numpy())
    torch.testing.assert_close(mean, torch.from_numpy(reference.location_).float())
    torch.testing.assert_close(precision, torch.from_numpy(reference.precision_).float(),
                               rtol=1e-4, atol=1e-4 * float(precision.abs().max()))


def test_a_stage_is_described_by_its_channels_mean_and_spread():
    maps = torch.zeros(2, 3, 4, 4)
    maps[0, 1] = 5.0  # a flat channel: mean 5, no spread
    maps[1, 2, :2] = 2.0  # half the map 2, half 0: mean 1, standard deviation 1
    torch.testing.assert_close(describe(maps),
                               torch.tensor([[0, 5, 0, 0, 0, 0], [0, 0, 1, 0, 0, 1.0]]))
    wide = torch.randn(2, MAX_DIMS // 2 + 1, 2, 2)
    torch.testing.assert_close(describe(wide), wide.mean((2, 3)))  # too wide for the spread too


def _largest_scaled(module, records) -> np.ndarray:
    """The gate's largest per-stage scaled distance of each image (its score before the
    threshold)."""
    data = ScoredImages(records, "binary", Preprocessing(**module.hparams.preprocessing))
    return module.ood.stage_scores(stage_descriptions(module.net, data)).amax(0).numpy()


@pytest.mark.slow
def test_the_gate_is_fitted_on_validation_and_travels_in_the_checkpoint(trained):
    _, runs = trained
    saved = read_checkpoint(runs["binary"]["best_checkpoint"])
    # stage 1 guards the input
    assert "ood" not in read_checkpoint(runs["subtype"]["best_checkpoint"])
    module = load_stage(runs["binary"]["best_checkpoint"], "binary")
    assert module.ood.fraction == 0.01 and module.ood.threshold == saved["ood"]["threshold"]
    records = recorded_split(module.hparams.data)
    split = {s: [r for r in records if r.split == s] for s in ("train", "val", "test")}
    assert module.ood.images == {"train": len(split["train"]), "val": len(split["val"])}
    # the threshold is the validation images' 99th percentile, not the test images'
    assert module.ood.threshold == pytest.approx(
        np.quantile(_largest_scaled(module, split["val"]), 0.99), rel=1e-4)
    assert module.ood.threshold != pytest.approx(
        np.quantile(_largest_scaled(module, split["test"]), 0.99), rel=1e-2)
    assert module.ood.stages == [info["module"] for info in module.net.backbone.feature_info]


def _with_threshold(source, dest, threshold: float):
    """A copy of a binary checkpoint whose gate flags every image scoring above `threshold`."""
    saved = read_checkpoint(source)
    saved["ood"]["threshold"] = threshold
    AtomicCheckpointIO().save_checkpoint(saved, dest)
    return str(dest)


@pytest.mark.slow
def test_flagged_images_get_no_diagnosis_unless_accepted(trained, synthetic_root, tmp_path):
    work, runs = trained
    flag_all = {**runs, "binary": {"best_checkpoint": _with_threshold(
        runs["binary"]["best_checkpoint"], tmp_path / "strict.ckpt", 1e-12)}}
    folder = synthetic_root / "test" / "NORMAL"
    result = explain(_explain_cfg(work, folder, tmp_path / "a", flag_all, log_to_mlflow=False,
                                  limit=2))
    assert [r["status"] for r in result["rows"]] == ["out of distribution"] * 2
    assert (result["failed"], result["withheld"]) == (0, 2)  # a decision, not a failure: exit 0
    assert all(float(r["ood_score"]) > 1 and "p_normal" not in r for r in result["rows"])
    accepted = explain(_explain_cfg(work, folder, tmp_path / "b", flag_all, log_to_mlflow=False,
                                    limit=2, accept_ood=True))
    assert [r["status"] for r in accepted["rows"]] == ["ok"] * 2
    assert "accept_ood=true" in (tmp_path / "b" / "index.html").read_text()
    with (tmp_path / "b" / "summary.csv").open() as f:
        assert all(float(row["ood_score"]) > 1 for row in csv.DictReader(f))

    # the served model withholds them too
    pipeline = TwoStagePipeline.from_checkpoints(flag_all["binary"]["best_checkpoint"],
                                                 runs["subtype"]["best_checkpoint"])
    pipeline.calibration = TwoStagePipeline.uncalibrated()
    out = predict_images(pipeline, [_b64(p) for p in _images(synthetic_root, 2)])
    assert out["decision"].tolist() == ["", ""] and out["p_normal"].isna().all()
    assert out["error"].str.startswith("out of distribution").all() and (out["ood_score"] > 1).all()


@pytest.mark.slow
def test_evaluation_reports_what_the_gate_would_withhold(trained, tmp_path):
    work, runs = trained
    module = load_stage(runs["binary"]["best_checkpoint"], "binary")
    test = [r for r in recorded_split(module.hparams.data) if r.split == "test"]
    raw, half = np.sort(_largest_scaled(module, test)), len(test) // 2
    # a threshold between two test images' distances: the upper half of them is flagged
    binary = _with_threshold(runs["binary"]["best_checkpoint"], tmp_path / "half.ckpt",
                             float(raw[half - 1] + raw[half]) / 2)
    result = evaluate(_evaluate_cfg(work, tmp_path / "eval", binary=binary,
                                    subtype=runs["subtype"]["best_checkpoint"],
                                    log_to_mlflow=False))
    ood = result["metrics"]["ood"]
    assert ood["flagged"] == len(ood["flagged_images"]) == len(test) - half
    assert all(image["score"] > 1 for image in ood["flagged_images"])
    without = ood["without_flagged"]
    assert without["binary"]["images"] == len(test) - ood["flagged"]
    assert result["metrics"]["binary"]["images"] == len(test)  # the main figures keep every image
    report = (tmp_path / "eval" / "report.md").read_text()
    assert f"would withhold **{ood['flagged']} of these images**" in report
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["ood"]["flagged"] \
        == ood["flagged"]

