"""Fitting the pipeline to a new site (pneumonia.site): labelled calibration, AdaBN, prior
re-estimation, and the protocol that keeps fitting and scoring images apart."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pneumonia.errors import DataError
from pneumonia.evaluate import evaluate
from pneumonia.metrics import youden_threshold
from pneumonia.pipeline import (
    TwoStagePipeline,
    load_stage,
    recorded_split,
    softmax_positive,
    stage_outputs,
)
from pneumonia.site import adapt_batchnorm, estimate_prior, labelled_images, logit_shift
from tests.test_evaluate import _evaluate_cfg


def test_adapt_batchnorm_takes_the_statistics_of_the_given_images_and_changes_nothing_else(trained):
    _, runs = trained
    module = load_stage(runs["binary"]["best_checkpoint"], "binary")
    before = {k: v.clone() for k, v in module.state_dict().items()}
    images = [r for r in recorded_split(module.hparams.data) if r.split == "test"]
    # one batch: the statistics are then exactly those of the images (with several batches they
    # are the mean of the per-batch statistics, as torch.optim.swa_utils.update_bn computes them)
    adapted = adapt_batchnorm(module, images, batch_size=len(images))

    # the first BatchNorm now holds the mean and variance of its inputs over exactly these images
    bn = next(m for m in adapted.modules() if isinstance(m, nn.BatchNorm2d))
    inputs = []
    hook = bn.register_forward_hook(lambda _, args, __: inputs.append(args[0]))
    stage_outputs(adapted, images)
    hook.remove()
    x = torch.cat(inputs)
    torch.testing.assert_close(bn.running_mean, x.mean((0, 2, 3)), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(bn.running_var, x.var((0, 2, 3), unbiased=True), atol=1e-4,
                               rtol=1e-3)
    assert not adapted.training and not bn.training
    # weights unchanged, and the original module untouched
    for key, value in adapted.state_dict().items():
        if "running_" not in key and "num_batches_tracked" not in key:
            torch.testing.assert_close(value, before[key], msg=key)
    for key, value in module.state_dict().items():
        torch.testing.assert_close(value, before[key], msg=key)


def test_prior_re_estimation_recovers_a_known_prior():
    rng = np.random.default_rng(0)
    for true_prior in (0.2, 0.5, 0.8):
        y = rng.random(20_000) < true_prior
        x = rng.normal(np.where(y, 1.0, -1.0), 1.0)
        p = 1 / (1 + np.exp(-2 * x))  # the exact posterior where both classes are equally common
        estimate = estimate_prior(p, prior=0.5)
        assert estimate == pytest.approx(true_prior, abs=0.015)
        # moved to the estimate, the probabilities are the posterior under the true prior
        moved = 1 / (1 + np.exp(-(2 * x + logit_shift(0.5, estimate))))
        exact = 1 / (1 + np.exp(-(2 * x + np.log(true_prior / (1 - true_prior)))))
        assert np.abs(moved - exact).max() < 0.02
    # weights count images: a weight of 0 leaves an image out
    p = np.array([0.9, 0.9, 0.1, 0.1])
    assert estimate_prior(p, 0.5, weights=np.array([1.0, 1.0, 0.0, 0.0])) > 0.99


def _site_folder(records, dest: Path, flip: bool = False) -> Path:
    """A labelled site folder (NORMAL/, PNEUMONIA/, Kermany names) holding copies of these
    images; with `flip`, every normal image filed as pneumonia and every pneumonia as normal."""
    for i, r in enumerate(records):
        pneumonic = (r.label != "normal") != flip
        kind = r.label if r.label != "normal" else ("bacterial", "viral")[i % 2]
        name = (f"person{9000 + i}_{'virus' if kind == 'viral' else 'bacteria'}_1.jpeg" if pneumonic
                else f"IM-{9000 + i}-0001.jpeg")
        target = dest / ("PNEUMONIA" if pneumonic else "NORMAL") / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(r.path, target)
    return dest


def _stages_and_split(trained, split: str):
    """The trained stages' checkpoints and the images of one split they were trained on."""
    work, runs = trained
    refs = {s: runs[s]["best_checkpoint"] for s in ("binary", "subtype")}
    records = recorded_split(load_stage(refs["binary"], "binary").hparams.data)
    return work, refs, [r for r in records if r.split == split]


@pytest.mark.slow
def test_site_calibration_fits_the_thresholds_on_the_site_folder_only(trained, tmp_path):
    work, refs, site_images = _stages_and_split(trained, "train")
    results = {}
    for flip in (False, True):
        folder = _site_folder(site_images, tmp_path / f"site-{flip}", flip)
        results[flip] = evaluate(_evaluate_cfg(work, tmp_path / f"eval-{flip}", **refs,
                                               calibration=str(folder), log_to_mlflow=False))
        # the binary threshold is the site images' Youden threshold, recomputed here
        pipeline = TwoStagePipeline.from_checkpoints(refs["binary"], refs["subtype"])
        site = labelled_images(folder)
        y = np.array([r.label != "normal" for r in site], dtype=int)
        cal = results[flip]["metrics"]["calibration"]
        p = softmax_positive(stage_outputs(pipeline.stages["binary"], site)[0],
                             cal["temperature"]["binary"], cal["bias"]["binary"])
        assert not cal["shifted_copy"]  # a site's own images need no stand-in for a site
        assert cal["thresholds"]["binary"]["youden"] == pytest.approx(youden_threshold(y, p))
        assert cal["validation_images"]["binary"] == len(site) \
            and cal["source"].startswith("site folder")
        assert "site folder" in (tmp_path / f"eval-{flip}" / "report.md").read_text()
    # flipped labels move the threshold, and the decisions with it
    thresholds = [results[f]["metrics"]["calibration"]["thresholds"]["binary"]["youden"]
                  for f in (False, True)]
    assert thresholds[0] != pytest.approx(thresholds[1])
    decisions = [np.array(results[f]["metrics"]["pipeline"]["confusion"]).sum(0)
                 for f in (False, True)]
    assert decisions[0].tolist() != decisions[1].tolist()


@pytest.mark.slow
def test_fitting_and_scoring_images_must_differ_unless_transductive(trained, tmp_path):
    work, refs, test = _stages_and_split(trained, "test")
    # copies: other paths, same bytes
    folder = _site_folder(test[:3] + test[-3:], tmp_path / "site")
    for option in ("calibration", "adapt"):
        with pytest.raises(DataError, match="are also scored"):
            evaluate(_evaluate_cfg(work, tmp_path / f"refused-{option}", **refs,
                                   **{option: str(folder)}, log_to_mlflow=False))
    result = evaluate(_evaluate_cfg(work, tmp_path / "transductive", **refs, adapt=str(folder),
                                    transductive=True, log_to_mlflow=False))
    site = result["metrics"]["site"]
    assert site["transductive"] and site["adaptation"]["images"] == 6
    assert site["adaptation"]["batchnorm_images"] == {"binary": 6, "subtype": 0}
    assert set(site["adaptation"]["priors"]) == {"binary"}  # stage 2 keeps its prior
    report = (tmp_path / "transductive" / "report.md").read_text()
    assert "**Transductive**" in report and "AdaBN" in report
    # the saved pipeline carries the adapted statistics: its binary checkpoint is the adapted one
    model = tmp_path / "transductive" / "model"
    saved = json.loads((model / "artifacts" / "pipeline.json").read_text())
    checkpoint = saved["checkpoints"]["binary"][0]
    adapted = load_stage(model / "artifacts" / f"{checkpoint}.json", "binary")
    original = load_stage(refs["binary"], "binary")
    key = next(k for k in original.state_dict() if k.endswith("running_mean"))
    assert not torch.equal(adapted.state_dict()[key], original.state_dict()[key])
    # stage 2 keeps its statistics (AdaBN on the images stage 1 calls pneumonia cost accuracy)
    kept = load_stage(model / "artifacts" / f"{saved['checkpoints']['subtype'][0]}.json",
                      "subtype")
    trained_2 = load_stage(refs["subtype"], "subtype")
    key = next(k for k in trained_2.state_dict() if k.endswith("running_mean"))
    assert torch.equal(kept.state_dict()[key], trained_2.state_dict()[key])
    assert saved["calibration"]["prior_shift"] == {
        "binary": site["adaptation"]["priors"]["binary"]["logit_shift"], "subtype": 0.0}


def test_bias_corrected_temperature_scaling_recovers_both():
    from pneumonia.pipeline import fit_temperature

    rng = np.random.default_rng(0)
    margin = rng.normal(0, 3, 20_000)  # z1 - z0
    y = rng.random(margin.size) < 1 / (1 + np.exp(-(margin / 2.0 + 0.7)))  # T = 2, b = 0.7
    temperature, bias = fit_temperature(np.stack([np.zeros_like(margin), margin], 1), y)
    assert temperature == pytest.approx(2.0, rel=0.08) and bias == pytest.approx(0.7, abs=0.08)


def test_class_balanced_draw_restores_the_calibration_class_mix():
    from pneumonia.pipeline import Calibration
    from pneumonia.site import class_balanced

    rng = np.random.default_rng(1)
    y = rng.random(4000) < 0.3  # the site: 30 % pneumonia; calibration had 70 %
    margin = 4 * rng.normal(np.where(y, 2.0, -2.0), 1.0) + np.log(0.7 / 0.3)  # exact at 70 %
    cal = Calibration({"binary": 1.0}, {}, 0.99, priors={"binary": 0.7},
                      bias={"binary": 0.0})
    records = list(range(len(y)))  # stand-ins: the draw only indexes them
    drawn = class_balanced(records, np.stack([np.zeros_like(margin), margin], 1), cal)
    assert len(drawn) == len(y) and y[drawn].mean() == pytest.approx(0.7, abs=0.04)


def test_a_new_prior_moves_the_probabilities_not_the_roc_operating_point():
    from pneumonia.pipeline import Calibration, TwoStagePipeline

    logits = {"binary": np.stack([np.zeros(9), np.linspace(-4, 4, 9)], 1),
              "subtype": np.stack([np.zeros(9), np.linspace(-2, 2, 9)], 1)}
    thresholds = {"binary": {"youden": 0.6, "sensitivity": 0.3, "default": 0.5},
                  "subtype": {"youden": 0.4, "default": 0.5}}
    for point in ("youden", "sensitivity", "default"):
        pipeline = TwoStagePipeline(None, None, Calibration(
            {"binary": 1.0, "subtype": 1.0}, thresholds, 0.99, point))
        before = pipeline.predict_logits(logits)
        pipeline.calibration.prior_shift = {"binary": -1.0, "subtype": 0.0}
        after = pipeline.predict_logits(logits)
        assert (after.p_pneumonia < before.p_pneumonia).all()  # the site's posterior is lower
        t = pipeline.stage_thresholds()["binary"]
        # the decision rule p >= threshold holds on the probabilities the pipeline reports
        np.testing.assert_array_equal(after.decision > 0, after.p_pneumonia >= t)
        if point == "default":  # the most probable class under the new prior: fewer pneumonia
            assert t == 0.5 and (after.decision > 0).sum() < (before.decision > 0).sum()
        else:  # a place on the ROC curve: the same decisions, the threshold moved with them
            np.testing.assert_array_equal(after.decision, before.decision)
            assert t == pytest.approx(1 / (1 + np.exp(-(np.log(thresholds["binary"][point]
                                                               / (1 - thresholds["binary"][point]))
                                                        - 1.0))))
