import itertools
from pathlib import Path

import pytest
import timm
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from pneumonia.models import StageClassifier, build_network
from tests.conftest import MODELS, compose_train


def _options(cfg) -> dict:
    model = OmegaConf.to_container(cfg.model, resolve=True)
    model["pretrained"] = False
    return model


def test_every_model_stage_adapter_head_composes(tmp_path):
    combos = list(itertools.product(MODELS, ["binary", "subtype"], ["conv", "none"],
                                    ["linear", "deep_mlp"]))
    for model, stage, adapter, head in combos:
        cfg = compose_train(tmp_path, [f"model={model}", f"stage={stage}",
                                       f"model.adapter={adapter}", f"model.head={head}",
                                       "data.root=/data"])
        assert cfg.model.name == model and cfg.stage.name == stage
        assert timm.is_model(cfg.model.backbone)
        OmegaConf.to_container(cfg.model, resolve=True)
    assert len(combos) == 8 * len(MODELS) and len(MODELS) == 11


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_every_model_adapter_head_builds_and_runs(model, tmp_path):
    cfg = compose_train(tmp_path, [f"model={model}", "data.root=/data"])
    size = cfg.model.input_size
    for adapter, head in itertools.product(["conv", "none"], ["linear", "deep_mlp"]):
        net = build_network(**{**_options(cfg), "adapter": adapter, "head": head}).eval()
        with torch.no_grad():
            logits = net(torch.randn(2, 1, size, size))
        assert logits.shape == (2, 2), (model, adapter, head)


def _trainable(net) -> set[str]:
    return {name for name, p in net.named_parameters() if p.requires_grad}


def test_frozen_features_train_only_the_classifier_and_the_adapter():
    net = build_network("vgg16", adapter="conv", head="linear", freeze="features", input_size=64)
    trainable = _trainable(net)
    # study A: the 1->3 convolution and VGG's dense layers (pre_logits + the new 2-way layer)
    assert {"adapter.weight", "adapter.bias", "backbone.head.fc.weight"} <= trainable
    assert any(n.startswith("backbone.pre_logits") for n in trainable)
    assert not any(n.startswith("backbone.features") for n in trainable)


def test_frozen_batchnorm_keeps_its_statistics_in_train_mode():
    net = build_network("resnet18", adapter="none", head="deep_mlp", freeze="features",
                        input_size=64)
    assert not any(n.startswith("backbone.") for n in _trainable(net))
    assert any(n.startswith("head.") for n in _trainable(net))
    before = {k: v.clone() for k, v in net.backbone.state_dict().items()}
    net.train()
    net(torch.randn(4, 1, 64, 64) * 3 + 1).sum().backward()
    after = net.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_gradients_reach_the_adapter_through_a_frozen_backbone():
    net = build_network("resnet18", adapter="conv", head="linear", freeze="features", input_size=64)
    net(torch.randn(2, 1, 64, 64)).sum().backward()
    assert net.adapter.weight.grad is not None and net.adapter.weight.grad.abs().sum() > 0
    assert net.backbone.conv1.weight.grad is None


def test_lower_freeze_fixes_the_stem_and_first_stages_and_trains_the_rest():
    net = build_network("resnet18", adapter="none", head="linear", freeze="lower", input_size=64)
    trainable = _trainable(net)
    lower = ("backbone.conv1", "backbone.bn1", "backbone.layer1")
    assert trainable == {n for n, _ in net.named_parameters() if not n.startswith(lower)}
    assert any(n.startswith("backbone.layer2") for n in trainable)
    assert type(net.backbone.bn1) is torch.nn.BatchNorm2d  # not FrozenBatchNorm2d: AdaBN adapts it
    frozen = {k: v.clone() for k, v in net.backbone.layer1.state_dict().items()}
    net.train()
    assert not net.backbone.bn1.training and net.backbone.layer2[0].bn1.training
    net(torch.randn(4, 1, 64, 64) * 3 + 1).sum().backward()
    assert all(torch.equal(v, net.backbone.layer1.state_dict()[k]) for k, v in frozen.items())
    assert net.backbone.layer1[0].conv1.weight.grad is None
    assert net.backbone.layer2[0].downsample[0].weight.grad.abs().sum() > 0


def test_unfrozen_network_trains_everything():
    net = build_network("resnet18", adapter="none", head="linear", freeze="none")
    assert _trainable(net) == {n for n, _ in net.named_parameters()}


def test_local_weights_file_is_loaded_and_folded_to_one_channel(tmp_path):
    reference = timm.create_model("resnet18", pretrained=False)
    weights = tmp_path / "resnet18.safetensors"
    save_file(reference.state_dict(), str(weights))
    net = build_network("resnet18", pretrained=str(weights), adapter="none", head="linear")
    # in_chans=1: timm sums the RGB filters of the first convolution
    torch.testing.assert_close(net.backbone.conv1.weight,
                               reference.conv1.weight.sum(dim=1, keepdim=True))
    torch.testing.assert_close(net.backbone.layer4[1].conv2.weight,
                               reference.layer4[1].conv2.weight)
    assert net.backbone.fc.out_features == 2  # the 1000-class layer was dropped
    with_adapter = build_network("resnet18", pretrained=str(weights), adapter="conv", head="linear")
    torch.testing.assert_close(with_adapter.backbone.conv1.weight, reference.conv1.weight)


def test_missing_weights_file_is_named():
    with pytest.raises(FileNotFoundError, match="model.pretrained=/nowhere/w.safetensors"):
        build_network("resnet18", pretrained="/nowhere/w.safetensors")


def test_unknown_backbone_says_where_the_valid_ones_are():
    with pytest.raises(ValueError, match="vgg61.*timm.list_models.*model=<a file of conf/model/>"):
        build_network("vgg61")


@pytest.mark.parametrize("key, value", [("adapter", "rgb"), ("head", "mlp"), ("freeze", "all")])
def test_unknown_option_is_named(key, value):
    with pytest.raises(ValueError, match=f"model.{key}={value!r}"):
        build_network("resnet18", **{key: value})


def test_checkpoint_rebuilds_the_model_from_plain_hparams(tmp_path):
    module = StageClassifier(
        model=dict(name="r18", backbone="resnet18", adapter="conv", head="deep_mlp",
                   freeze="features", input_size=64),
        classes=["normal", "pneumonia"], stage="binary",
        preprocessing=dict(image_size=64, mean=0.45, std=0.22, crop=None),
        optimizer={"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3},
        class_weights=[2.0, 0.7], pretrained=False,
    ).eval()
    import lightning as L

    trainer = L.Trainer(logger=False, enable_checkpointing=False, max_epochs=0)
    trainer.strategy.connect(module)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    loaded = StageClassifier.load_from_checkpoint(path).eval()
    x = torch.randn(3, 1, 64, 64)
    torch.testing.assert_close(loaded(x), module(x))
    assert loaded.hparams.preprocessing["mean"] == 0.45


def _saved_module(tmp_path) -> Path:
    import lightning as L

    module = StageClassifier(
        model=dict(name="r18", backbone="resnet18", input_size=64), classes=["normal", "pneumonia"],
        stage="binary", preprocessing=dict(image_size=64, mean=0.45, std=0.22, crop=None),
        optimizer={"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3},
        pretrained=False)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, max_epochs=0)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    return tmp_path / "m.ckpt"


@pytest.mark.parametrize("group, key, neutral, other", [
    ("model", "norm", "batch", "group"),
    ("model", "mixstyle", 0.0, 0.5),
    ("preprocessing", "equalize", False, True),
    (None, "mixup", 0.0, 0.4),
])
def test_checkpoints_with_retired_options_load_when_off_and_are_refused_when_on(tmp_path, group,
                                                                                 key, neutral,
                                                                                 other):
    path = _saved_module(tmp_path)
    saved = torch.load(path, weights_only=True)

    def with_value(value) -> Path:
        hparams = saved["hyper_parameters"]
        (hparams[group] if group else hparams)[key] = value
        torch.save(saved, tmp_path / "old.ckpt")
        return tmp_path / "old.ckpt"

    loaded = StageClassifier.load_from_checkpoint(with_value(neutral))
    assert key not in (loaded.hparams[group] if group else loaded.hparams)
    name = f"{group}.{key}" if group else key
    with pytest.raises(ValueError, match=f"trained with {name}={other!r}.*git checkout 1fafa00"):
        StageClassifier.load_from_checkpoint(with_value(other))
    with pytest.raises(TypeError, match="unexpected arguments: dropout"):
        StageClassifier.load_from_checkpoint(path, dropout=0.1)


def test_checkpoints_that_recorded_the_augmentation_and_seed_still_load(tmp_path):
    """Earlier modules augmented batches themselves and kept these; the weights do not depend
    on them at inference, so they are dropped whatever their value."""
    path = _saved_module(tmp_path)
    saved = torch.load(path, weights_only=True)
    saved["hyper_parameters"].update(augment={"hflip": 0.5, "gamma": [0.7, 1.4]}, seed=3)
    torch.save(saved, tmp_path / "old.ckpt")
    loaded = StageClassifier.load_from_checkpoint(tmp_path / "old.ckpt")
    assert "augment" not in loaded.hparams and "seed" not in loaded.hparams


@pytest.mark.parametrize("backbone", ["resnet18", "vgg16"])
def test_frozen_features_run_without_a_graph_when_nothing_before_them_trains(backbone):
    net = build_network(backbone, adapter="none", head="linear", freeze="features",
                        input_size=64).train()
    x = torch.randn(2, 1, 64, 64, requires_grad=True)
    features = net.features(x)
    assert not features.requires_grad  # no graph through the frozen backbone
    net(x).sum().backward()
    assert x.grad is None
    assert net.backbone.get_classifier().weight.grad is not None
    # the fast path computes what the plain forward does; eval mode keeps the graph for Grad-CAM
    net.eval()
    torch.testing.assert_close(net(x), net.backbone(x))
    assert net.features(x).requires_grad


def test_with_a_trainable_adapter_the_frozen_features_keep_their_graph():
    net = build_network("resnet18", adapter="conv", head="linear", freeze="features", input_size=64)
    features = net.features(torch.randn(2, 1, 64, 64))
    assert features.requires_grad
    net(torch.randn(2, 1, 64, 64)).sum().backward()
    assert net.adapter.weight.grad is not None and net.adapter.weight.grad.abs().sum() > 0
