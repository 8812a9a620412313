"""The feature cache: the head on stored features computes what the full network computes,
training on it writes an ordinary checkpoint, and the cache follows the weights and settings."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import pneumonia.config  # noqa: F401  (registers the config schemas)
from pneumonia.config import validate
from pneumonia.data.features import (
    FrozenFeatures,
    build_feature_cache,
    feature_key,
    frozen_weights_digest,
)
from pneumonia.models import build_network
from tests.conftest import compose_train

# float32 features; the full network and the cached path differ only in how the convolutions
# are batched, which moves logits by ~1e-6 here: 1e-4 leaves room for other CPUs' kernels.
LOGIT_TOLERANCE = dict(atol=1e-4, rtol=1e-4)
MEAN, STD = 0.45, 0.22


def _images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Smooth random uint8 images with a left/right intensity slope."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (n, size // 8, size // 8)).astype(np.float32)
    images = np.kron(coarse, np.ones((8, 8), np.float32)) * np.linspace(0.3, 1.0, size)
    return images.astype(np.uint8)


def _frozen(backbone: str, head: str = "linear", size: int = 48, seed: int = 0, pretrained=False):
    torch.manual_seed(seed)
    return build_network(backbone, pretrained=pretrained, adapter="none", head=head,
                         freeze="features", input_size=size)


def _normalised(images: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(images)[:, None].float() / 255 - MEAN) / STD


@pytest.mark.parametrize("backbone, head", [("resnet18", "linear"), ("vgg16", "linear"),
                                            ("mobilenetv3_large_100", "deep_mlp")])
def test_head_on_cached_features_equals_the_full_network(backbone, head, tmp_path):
    images = _images(6, 64)
    net = _frozen(backbone, head, size=64)
    features = build_feature_cache(images, "images", net, MEAN, STD, cache_dir=tmp_path,
                                   batch_size=4)
    assert features.dtype == np.float32 and features.shape[0] == 6 and features.ndim == 4
    assert net.training  # built in eval mode, the mode given back
    net.eval()
    with torch.no_grad():
        cached = net.classify(torch.from_numpy(np.array(features)))
        torch.testing.assert_close(cached, net(_normalised(images)), **LOGIT_TOLERANCE)


def test_the_data_module_serves_the_features_it_is_handed(synthetic_root, tmp_path):
    """The one seam: the data module gets a FrozenFeatures built from the network and serves
    exactly what that network's frozen part computes from the cached images."""
    from pneumonia.train import build_datamodule, build_module

    cfg = compose_train(tmp_path, ["experiment=study_b", f"data.root={synthetic_root}",
                                   "model.pretrained=false", "model.input_size=64"])
    datamodule = build_datamodule(cfg)
    with pytest.raises(RuntimeError, match="use_features"):
        datamodule.dataset("val")
    module = build_module(cfg, datamodule)
    assert module.cached_features
    val = datamodule.dataset("val")
    features = torch.stack([val[i][0] for i in range(len(val))])
    pre = datamodule.preprocessing
    module.net.eval()
    with torch.no_grad():
        expected = module.net.features(_normalised_with(datamodule.cached_images("val"), pre))
    torch.testing.assert_close(features, expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="data.augment=null"):
        build_datamodule(compose_train(tmp_path, [*FEATURES, f"data.root={synthetic_root}",
                                                  "model.input_size=64"]))
    with pytest.raises(ValueError, match="model.freeze=features"):
        FrozenFeatures(build_network("resnet18", freeze="none"), MEAN, STD)


def _normalised_with(images: np.ndarray, pre) -> torch.Tensor:
    return torch.from_numpy(np.stack([pre.normalize(image) for image in images]))


def _weighted_val_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                       batch: int) -> float:
    """Lightning's epoch val/loss: per-batch weighted cross-entropy, averaged by batch size."""
    total = sum(F.cross_entropy(logits[i:i + batch], targets[i:i + batch], weight=weights).item()
                * len(targets[i:i + batch]) for i in range(0, len(targets), batch))
    return total / len(targets)


@pytest.mark.slow
def test_training_on_cached_features_writes_a_normal_checkpoint(synthetic_root, tmp_path):
    from torchmetrics.functional.classification import binary_auroc

    from pneumonia.pipeline import load_stage
    from pneumonia.stages import stage_targets
    from pneumonia.train import build_datamodule, train

    cfg = compose_train(tmp_path, [
        "model=resnet18", "model.pretrained=false", "model.freeze=features", "model.input_size=64",
        "data.feature_cache=true", "data.augment=null",
        f"data.root={synthetic_root}", "data.num_workers=0", "data.batch_size=4", "debug=short",
        "logger=none"])
    result = train(cfg)
    assert len(list((tmp_path / "cache" / "preprocessed").glob("*.f32"))) == 3  # train, val, test

    # The checkpoint loads through the evaluation pipeline (strictly: backbone weights included)
    # and the full network on images reproduces the validation scores of the head on features.
    module = load_stage(result["best_checkpoint"], "binary")
    assert not module.cached_features
    datamodule = build_datamodule(cfg)
    images = torch.from_numpy(np.array(datamodule.cached_images("val")))[:, None].float() / 255
    pre = module.hparams.preprocessing
    targets = torch.tensor(stage_targets("binary", (r.label for r in datamodule.splits["val"])))
    with torch.no_grad():
        logits = module((images - pre["mean"]) / pre["std"])
    metrics = result["metrics"]
    assert _weighted_val_loss(logits, targets, module.class_weights, 4) == pytest.approx(
        metrics["val/loss"], abs=1e-5)
    assert binary_auroc(logits.softmax(1)[:, 1], targets).item() == pytest.approx(
        metrics["val/auroc"], abs=1e-6)
    assert (logits.argmax(1) == targets).float().mean().item() == pytest.approx(
        metrics["val/acc"], abs=1e-6)


def test_feature_cache_is_reused_and_rebuilt_when_weights_or_settings_change(tmp_path):
    images, cache = _images(6, 48), tmp_path / "cache"

    def build(net, key="images"):
        return np.array(build_feature_cache(images, key, net, MEAN, STD, cache_dir=cache))

    def files():
        return sorted(cache.glob("*.f32"))

    first = build(_frozen("resnet18", seed=0))
    (made,) = files()
    mtime = made.stat().st_mtime_ns
    # the same weights (pretrained=false with the same seed initialises identically): reused
    np.testing.assert_array_equal(build(_frozen("resnet18", seed=0)), first)
    assert files() == [made] and made.stat().st_mtime_ns == mtime
    # another seed is another random backbone: its own cache
    other_seed = build(_frozen("resnet18", seed=1))
    assert len(files()) == 2 and not np.allclose(other_seed, first)
    # a weights file: the seed no longer matters (the reset classifier trains, so is not hashed)
    reference = build_network("resnet18", adapter="none", head="linear").backbone.state_dict()
    weights = tmp_path / "w.safetensors"
    save_file({k: v for k, v in reference.items() if not k.startswith("fc.")}, str(weights))
    from_file = build(_frozen("resnet18", seed=2, pretrained=str(weights)))
    assert len(files()) == 3
    np.testing.assert_array_equal(build(_frozen("resnet18", seed=3, pretrained=str(weights))),
                                  from_file)
    assert len(files()) == 3
    # another weights file, other preprocessed images: rebuilt
    save_file({k: v * 1.01 for k, v in reference.items() if not k.startswith("fc.")}, str(weights))
    build(_frozen("resnet18", seed=2, pretrained=str(weights)))
    assert len(files()) == 4
    net = _frozen("resnet18", seed=0)
    build(net, key="other images")
    assert len(files()) == 5
    digest = frozen_weights_digest(net)
    assert feature_key("k", "resnet18", digest) != feature_key("k", "resnet34", digest)


def test_damaged_feature_file_is_detected_and_rebuilt(tmp_path):
    images, net = _images(4, 48), _frozen("resnet18")
    good = np.array(build_feature_cache(images, "images", net, MEAN, STD, cache_dir=tmp_path))
    (array_file,) = tmp_path.glob("*.f32")
    raw = bytearray(array_file.read_bytes())
    raw[1000:1400] = bytes(400)  # silently damaged bytes, same size
    array_file.write_bytes(bytes(raw))
    np.testing.assert_array_equal(build_feature_cache(images, "images", net, MEAN, STD, tmp_path),
                                  good)
    array_file.write_bytes(bytes(raw[:4000]))  # truncated
    np.testing.assert_array_equal(build_feature_cache(images, "images", net, MEAN, STD, tmp_path),
                                  good)
    assert len(list(tmp_path.glob("*.f32"))) == 1 and not list(tmp_path.glob("*.tmp*"))


FEATURES = ["model=mobilenet", "model.pretrained=false", "data.feature_cache=true", "logger=none"]
VALID = [*FEATURES, "data.augment=null", "data.root=/nonexistent"]


@pytest.mark.parametrize("overrides, message", [
    ([*VALID, "model.freeze=none"], r"Set model.freeze=features \(now none\)"),
    ([*VALID, "model.adapter=conv"], r"model.adapter=none \(now conv, which trains\)"),
    ([*FEATURES, "data.root=/nonexistent"], r"data.augment=null \(now augmenting: \{'hflip': 0.5"),
    ([*VALID, "data.cache=false"], r"data.cache=true"),
])
def test_feature_cache_where_something_before_the_head_changes_fails_naming_the_keys(tmp_path,
                                                                                     overrides,
                                                                                     message):
    from pneumonia.train import train

    validate(compose_train(tmp_path, VALID))  # the valid combination passes
    cfg = compose_train(tmp_path, overrides)
    with pytest.raises(ValueError, match=r"data.feature_cache=true .*" + message
                                         + r".*data.feature_cache=false"):
        validate(cfg)
    with pytest.raises(ValueError, match="data.feature_cache=true"):
        train(cfg)  # at start-up, before the (missing) data folder is looked at
    assert not (tmp_path / "run").exists()


def test_study_a_with_the_feature_cache_names_every_key_to_change(tmp_path):
    cfg = compose_train(tmp_path, ["experiment=study_a", "data.root=/data",
                                   "data.feature_cache=true"])
    with pytest.raises(ValueError) as err:
        validate(cfg)
    for key in ("model.adapter=none", "data.augment=null"):
        assert key in str(err.value)


def test_study_b_is_one_recipe_with_the_papers_three_backbones(tmp_path):
    for backbone in ("mobilenet", "xception", "inception_v3"):
        cfg = compose_train(tmp_path, ["experiment=study_b", f"model={backbone}",
                                       "data.root=/data"])
        validate(cfg)
        assert cfg.model.name == backbone and cfg.model.head == "deep_mlp"
        assert cfg.model.input_size == 256 and cfg.optimizer.lr == 1e-3
        assert cfg.data.feature_cache and cfg.data.augment is None \
            and cfg.model.freeze == "features"
    default = compose_train(tmp_path, ["experiment=study_b", "data.root=/data"])
    assert default.model.name == "mobilenet"
