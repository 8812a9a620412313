"""The from-scratch recipe's options: flip test-time augmentation, seed ensembles and the
augmentation settings' checks (the augmentation itself: tests/test_augment.py)."""

import json
from pathlib import Path

import pytest
import torch

from pneumonia.checkpoints import load_stage
from pneumonia.errors import CheckpointError
from pneumonia.explain.attribution import attribution_map
from pneumonia.pipeline import StageEnsemble, forward_outputs, load_stages
from pneumonia.serving import load_pipeline
from tests.conftest import compose_train


class _Stage(torch.nn.Module):
    """A stage stand-in: logits from a small network, its OOD score the image's mean pixel."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(),
                                       torch.nn.LazyLinear(2))

    def forward(self, x):
        return self.net(x)

    def outputs(self, x):
        return self.net(x), x.mean((1, 2, 3))


def test_tta_averages_the_image_and_its_mirror():
    torch.manual_seed(0)
    net = _Stage()
    images = torch.randn(3, 1, 8, 8)
    images[..., :4] += 1.0  # the mirror image differs
    expected = (net(images) + net(images.flip(-1))) / 2
    logits, ood = forward_outputs(net, images, tta=True)
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(ood, images.mean((1, 2, 3)))  # scored on the image as given
    symmetric = images + images.flip(-1)
    torch.testing.assert_close(forward_outputs(net, symmetric, tta=True)[0], net(symmetric))


def test_config_rejects_bad_recipe_values(tmp_path):
    from pneumonia.config import validate

    for override, key in [("data.augment.scale=[1.1,0.9]", "data.augment.scale"),
                          ("data.augment.scale=[0,1.1]", "data.augment.scale"),
                          ("data.augment.rotate=-5", "data.augment.rotate"),
                          ("data.augment.translate=1.5", "data.augment.translate")]:
        cfg = compose_train(tmp_path, ["data.root=/x", override])
        with pytest.raises(ValueError, match=key):
            validate(cfg)


def _checkpoints(runs, stage):
    """Two checkpoints of one stage with different weights: the best one and a perturbed copy."""
    best = Path(runs[stage]["best_checkpoint"])
    other = best.parent / "perturbed.ckpt"
    if not other.is_file():
        saved = torch.load(best, weights_only=True)
        generator = torch.Generator().manual_seed(0)
        for value in saved["state_dict"].values():
            if value.is_floating_point():
                value.add_(torch.randn(value.shape, generator=generator) * 0.05)
        torch.save(saved, other)
    return [str(best), str(other)]


@pytest.mark.slow
def test_an_ensemble_averages_its_members_logits(trained, tmp_path):
    work, runs = trained
    paths = _checkpoints(runs, "binary")
    ensemble = load_stages(paths, "binary")
    members = [load_stage(Path(p), "binary") for p in paths]
    images = torch.randn(4, 1, 64, 64)
    with torch.no_grad():
        outputs = [m(images) for m in members]
        assert not torch.allclose(*outputs)  # the members differ, so the mean is a real test
        torch.testing.assert_close(ensemble(images), (outputs[0] + outputs[1]) / 2)
    assert ensemble.hparams.preprocessing == members[0].hparams.preprocessing
    # a member preprocessed differently cannot join
    saved = torch.load(paths[1], weights_only=True)
    saved["hyper_parameters"]["preprocessing"]["image_size"] = 32
    odd = tmp_path / "odd.ckpt"
    torch.save(saved, odd)
    with pytest.raises(CheckpointError, match="preprocessing differs"):
        load_stages([paths[0], str(odd)], "binary")
    with pytest.raises(ValueError, match="gradcam explains one network"):
        attribution_map("gradcam", ensemble.net, images[:1], torch.tensor([1]))


@pytest.mark.slow
def test_evaluation_of_ensembles_with_tta_is_recorded_and_reloads(trained, tmp_path):
    from pneumonia.evaluate import evaluate
    from tests.test_evaluate import _evaluate_cfg

    work, runs = trained
    cfg = _evaluate_cfg(work, tmp_path / "report", binary=_checkpoints(runs, "binary"),
                        subtype=runs["subtype"]["run_id"], tta=True, log_to_mlflow=True)
    result = evaluate(cfg)
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["tta"] is True \
        and metrics["checkpoints"]["binary"] == _checkpoints(runs, "binary")
    pipeline = load_pipeline(str(tmp_path / "report" / "model"), None, None, tmp_path / "unused")
    assert pipeline.tta is True and isinstance(pipeline.stages["binary"], StageEnsemble)
    from mlflow.tracking import MlflowClient

    tags = MlflowClient(cfg.paths.tracking_uri).get_run(result["run_id"]).data.tags
    assert tags["binary_checkpoint"] == ",".join(_checkpoints(runs, "binary"))
    assert tags["subtype_run_id"] == runs["subtype"]["run_id"]


def _job(folder: Path, job: int, stage: str, checkpoint: str, status: str = "COMPLETED") -> None:
    (folder / f"{job}_{stage}").mkdir(parents=True)
    (folder / f"{job}_{stage}" / "job_result.json").write_text(json.dumps(
        {"job": job, "status": status, "stage": stage, "best_checkpoint": checkpoint,
         "run_id": None}))


def test_sweep_checkpoints_group_by_stage_and_refuse_failed_jobs(tmp_path):
    from pneumonia.sweep import sweep_checkpoints

    for job, (stage, ckpt) in enumerate([("binary", "b0"), ("subtype", "s0"), ("binary", "b1")]):
        _job(tmp_path / "ok", job, stage, ckpt)
    assert sweep_checkpoints(tmp_path / "ok") == {"binary": ["b0", "b1"], "subtype": ["s0"]}
    _job(tmp_path / "bad", 0, "binary", "b0")
    _job(tmp_path / "bad", 1, "binary", "", status="FAILED")
    with pytest.raises(ValueError, match=r"job\(s\) 1 failed"):
        sweep_checkpoints(tmp_path / "bad")
    with pytest.raises(FileNotFoundError, match="no job_result.json"):
        sweep_checkpoints(tmp_path / "empty")


@pytest.mark.slow
def test_evaluate_a_sweep_averages_each_stages_jobs(trained, tmp_path):
    from pneumonia.evaluate import evaluate
    from tests.test_evaluate import _evaluate_cfg

    work, runs = trained
    binary = _checkpoints(runs, "binary")
    for job, (stage, ckpt) in enumerate([("binary", binary[0]), ("binary", binary[1]),
                                         ("subtype", runs["subtype"]["best_checkpoint"])]):
        _job(tmp_path / "sweep", job, stage, ckpt)
    cfg = _evaluate_cfg(work, tmp_path / "report", sweep=str(tmp_path / "sweep"),
                        log_to_mlflow=False)
    evaluate(cfg)
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["checkpoints"] == {"binary": binary,
                                      "subtype": runs["subtype"]["best_checkpoint"]}
    cfg = _evaluate_cfg(work, tmp_path / "other", sweep=str(tmp_path / "sweep"), binary=binary[0])
    with pytest.raises(ValueError, match="not both"):
        evaluate(cfg)
