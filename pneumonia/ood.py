"""The out-of-distribution gate: how unlike the training X-rays an image is, from stage 1's
features (docs/formats.md: where it acts and what it catches).

Each feature stage timm lists for the backbone (`feature_info`) describes an image by each
channel's spatial mean and standard deviation (the mean only for stages wider than MAX_DIMS / 2
channels). Per stage, a Gaussian is fitted to the training split's descriptions (mean and
Ledoit-Wolf shrunk covariance) and the squared Mahalanobis distance is divided by the validation
images' (1 - fraction) quantile of it; an image's score is its largest stage score divided by the
same quantile of that largest score. Above 1 is out of distribution, so `fraction` of the
validation images are flagged by construction (research/ood_features.py chose the stages).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from functools import partial

import numpy as np
import torch
from sklearn.covariance import ledoit_wolf
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from pneumonia.errors import ConfigError

# Training images the Gaussians are fitted on, at most (evenly spaced through the split).
MAX_FIT_IMAGES = 4096
# Dimensions of one stage's description at most: a precision matrix of 2,048^2 floats is 16 MB.
MAX_DIMS = 2048


def describe(maps: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) feature maps -> (N, 2C) channel means and standard deviations over space
    (the means only, (N, C), when 2C would exceed MAX_DIMS)."""
    maps = maps.float()
    mean = maps.mean((2, 3))
    if 2 * maps.shape[1] > MAX_DIMS:
        return mean
    return torch.cat([mean, maps.flatten(2).std(2, correction=0)], 1)


@contextmanager
def watching(backbone: nn.Module, stages: list[str] | None = None) -> Iterator[dict[str, list]]:
    """While inside, every forward pass of `backbone` in this thread appends each stage's
    description (`describe`) to the yielded {stage: [batches]}; stages default to timm's
    feature_info. The hooks sit on the shared network: a served model scores concurrent requests
    in several threads, and each must see only its own passes."""
    modules = dict(backbone.named_modules())
    names = stages if stages is not None else [info["module"] for info in backbone.feature_info]
    seen: dict[str, list] = {name: [] for name in names}
    thread = threading.get_ident()

    def record(name, _module, _inputs, output):
        if threading.get_ident() == thread and isinstance(output, torch.Tensor) \
                and output.ndim == 4:
            seen[name].append(describe(output))

    handles = [modules[name].register_forward_hook(partial(record, name)) for name in names]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def check_fraction(fraction: float) -> None:
    if not 0 < fraction < 0.5:
        raise ConfigError(f"ood_fraction={fraction} must lie in (0, 0.5): the fraction of "
                          "validation images the out-of-distribution gate flags")


@dataclass
class OODGate:
    stages: list[str]  # backbone module names whose outputs are described
    means: list[torch.Tensor]  # per stage (D,)
    precisions: list[torch.Tensor]  # per stage (D, D): inverse of the shrunk covariance
    scales: list[float]  # per stage: the validation quantile of the squared distance
    threshold: float  # the validation quantile of the largest scaled stage distance
    fraction: float  # the fraction of validation images flagged
    images: dict[str, int]  # images the gate was fitted on, per split

    def stage_scores(self, described: dict[str, torch.Tensor]) -> torch.Tensor:
        """(stages, N) squared distances, each divided by its stage's scale."""
        out = []
        for name, mean, precision, scale in zip(self.stages, self.means, self.precisions,
                                                self.scales):
            centred = described[name] - mean.to(described[name].device)
            out.append(((centred @ precision.to(centred.device)) * centred).sum(1) / scale)
        return torch.stack(out)

    def score(self, described: dict[str, torch.Tensor]) -> torch.Tensor:
        """(N,) scores of images from their stage descriptions; above 1 is flagged."""
        return self.stage_scores(described).amax(0) / self.threshold

    def state(self) -> dict:
        """Plain tensors, lists and numbers, for a checkpoint loaded with weights_only=True."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_state(cls, state: dict) -> OODGate:
        return cls(**state)

    @classmethod
    def fit(cls, train: dict[str, torch.Tensor], val: dict[str, torch.Tensor],
            fraction: float) -> OODGate:
        """From the stage descriptions of training images (the Gaussians) and validation images
        (the scales and the threshold)."""
        check_fraction(fraction)
        stages = list(train)
        means, precisions = zip(*(gaussian(train[name]) for name in stages))
        images = {"train": len(train[stages[0]]), "val": len(val[stages[0]])}
        gate = cls(stages, list(means), list(precisions), [1.0] * len(stages), 1.0, fraction,
                   images)
        gate.scales = [float(np.quantile(s.numpy(), 1 - fraction)) for s in gate.stage_scores(val)]
        gate.threshold = float(np.quantile(gate.score(val).numpy(), 1 - fraction))
        return gate


def gaussian(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and precision of the Ledoit-Wolf shrunk covariance of (N, D) descriptions; that
    covariance is positive definite, so a Cholesky factor inverts it (faster than sklearn's
    LedoitWolf estimator, which inverts by an eigendecomposition)."""
    x = x.double()
    covariance, _ = ledoit_wolf(x.numpy())
    precision = torch.cholesky_inverse(torch.linalg.cholesky(torch.from_numpy(covariance)))
    return x.mean(0).float(), precision.float()


@torch.inference_mode()
def stage_descriptions(net: nn.Module, data: Dataset, batch_size: int = 64, device: str = "cpu",
                       num_workers: int = 0, limit: int | None = None) -> dict[str, torch.Tensor]:
    """{stage: (N, D)} descriptions of a data set of (image, target) pairs run through `net`
    (a PneumoniaNet on `device`), at most `limit` images, evenly spaced."""
    if limit is not None and len(data) > limit:
        data = Subset(data, np.linspace(0, len(data) - 1, limit).round().astype(int).tolist())
    with watching(net.backbone) as seen:
        for x, _ in DataLoader(data, batch_size=batch_size, num_workers=num_workers):
            net(x.to(device))
    return {name: torch.cat(batches).cpu() for name, batches in seen.items() if batches}
