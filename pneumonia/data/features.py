"""A feature cache for frozen backbones: the frozen part runs once per image, then only the head.

When nothing before the head trains (model.freeze=features, model.adapter=none) and no image
is augmented (data.augment=null, as in study B's recipes), an image's features never change.
They are computed once, in eval mode, and stored beside the preprocessed images as one float32
array (N, C, H, W) per split by `cached_array`. `FrozenFeatures` is the one seam between the
network and the data module (`KermanyDataModule.use_features`).

float32, not float16: the head then sees what the full network would compute, up to float
rounding; float16 would halve the file but add about 1e-3 relative error and overflow past
65504 on backbones with unbounded activations.

The key covers the split's image key, the backbone and a hash of the frozen weights themselves,
so hub weights, a weights file and a seeded random initialisation are all identified by the
numbers the features are computed with: other weights make another cache, the same reuse it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from pneumonia.data.cache import cached_array
from pneumonia.data.transforms import normalize
from pneumonia.errors import ConfigError

if TYPE_CHECKING:  # for type hints only: the data side runs without the models package
    from pneumonia.models.network import PneumoniaNet

VERSION = 2
DTYPE = np.float32


def frozen_weights_digest(net: PneumoniaNet) -> str:
    """blake2b of the tensors the features are computed with (adapter and backbone, except
    the parameters that train, such as timm's classifier)."""
    trainable = {name for name, p in net.named_parameters() if p.requires_grad}
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in net.state_dict().items():
        if name in trainable or not name.startswith(("adapter.", "backbone.")):
            continue
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


def feature_key(image_key: str, backbone: str, weights: str) -> str:
    spec = {"version": VERSION, "images": image_key, "backbone": backbone, "weights": weights,
            "dtype": np.dtype(DTYPE).name}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]


def check_cacheable(net: PneumoniaNet) -> None:
    if not net.frozen_features or any(p.requires_grad for p in net.adapter.parameters()):
        raise ConfigError("the feature cache needs frozen features and no trainable adapter "
                          "(model.freeze=features, model.adapter=none)")


@torch.inference_mode()
def compute_features(net: PneumoniaNet, images: np.ndarray, mean: float,
                     std: float) -> torch.Tensor:
    """Features of uint8 images (n, S, S), normalised as `Preprocessing.normalize` does it."""
    device = next(net.parameters()).device
    x = torch.from_numpy(np.array(images, dtype=np.float32))[:, None].to(device).div_(255.0)
    return net.features(normalize(x, mean, std))


def build_feature_cache(images: np.ndarray, image_key: str, net: PneumoniaNet, mean: float,
                        std: float, cache_dir: Path, batch_size: int = 32,
                        device: torch.device | str | None = None) -> np.memmap:
    """(N, C, H, W) float32 features of the frozen part for the preprocessed `images`, computed
    in eval mode on `device` (default: the network's) unless a valid cache exists."""
    check_cacheable(net)
    home, was_training = next(net.parameters()).device, net.training
    net.eval().to(device or home)
    try:
        size = images.shape[-1]
        shape = tuple(compute_features(net, np.zeros((1, size, size), np.uint8),
                                       mean, std).shape[1:])
        if len(images) == 0:
            return np.zeros((0, *shape), DTYPE)
        backbone = (getattr(net.backbone, "pretrained_cfg", {}).get("architecture")
                    or type(net.backbone).__name__)
        key = feature_key(image_key, backbone, frozen_weights_digest(net))

        def fill(out: np.memmap) -> None:
            for start in tqdm(range(0, len(images), batch_size), desc="features", unit="batch",
                              leave=False):
                block = images[start:start + batch_size]
                features = compute_features(net, block, mean, std)
                out[start:start + len(block)] = features.float().cpu().numpy()

        return cached_array(Path(cache_dir) / f"{key}.f32", (len(images), *shape), DTYPE, fill,
                            {"images": image_key, "backbone": backbone, "version": VERSION})
    finally:
        net.train(was_training).to(home)


class FrozenFeatures:
    """A data module's feature extractor (`KermanyDataModule.use_features`): the cached
    features of `net`'s frozen part, normalised with `mean` and `std`. It holds the network
    itself, so the features are hashed from the weights in use when the data is asked for
    (after a resumed run has restored its weights)."""

    def __init__(self, net: PneumoniaNet, mean: float, std: float, batch_size: int = 32):
        check_cacheable(net)
        self.net, self.mean, self.std, self.batch_size = net, mean, std, batch_size

    def __call__(self, images: np.ndarray, image_key: str, cache_dir: Path,
                 device: torch.device | None = None) -> np.ndarray:
        return build_feature_cache(images, image_key, self.net, self.mean, self.std, cache_dir,
                                   self.batch_size, device)
