"""The out-of-distribution gate: how unlike the training X-rays an image is, from stage 1's features.

An image's score is the squared Mahalanobis distance of its globally pooled stage-1 features
(`PneumoniaNet.features`, averaged over the map) to a Gaussian fitted on the training split's
features (mean and a Ledoit-Wolf shrunk covariance), divided by the threshold: the validation
split's (1 - fraction) quantile of that distance. A score above 1 is out of distribution, so a
fraction `fraction` of validation images is flagged by construction. Fitted at the end of
training on the training and validation splits only, and stored in the checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.covariance import LedoitWolf
from torch.utils.data import DataLoader, Dataset, Subset

# Training images the Gaussian is fitted on, at most (evenly spaced through the split): enough
# for the covariance of the widest backbone here (DenseNet-121, 1,024 features) with shrinkage.
MAX_FIT_IMAGES = 4096


@dataclass
class OODGate:
    mean: torch.Tensor  # (C,)
    precision: torch.Tensor  # (C, C): inverse of the shrunk covariance
    threshold: float  # squared distance flagged above (the validation quantile)
    fraction: float  # the fraction of validation images flagged
    images: dict[str, int]  # images the gate was fitted on, per split

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """(N,) scores of (N, C, H, W) feature maps or (N, C) pooled features; > 1 is flagged."""
        pooled = features.float().mean((2, 3)) if features.ndim == 4 else features.float()
        centred = pooled - self.mean.to(pooled.device)
        distance = ((centred @ self.precision.to(pooled.device)) * centred).sum(1)
        return distance / self.threshold

    def state(self) -> dict:
        """Plain tensors and numbers, for a checkpoint loaded with weights_only=True."""
        return {"mean": self.mean, "precision": self.precision, "threshold": self.threshold,
                "fraction": self.fraction, "images": dict(self.images)}

    @classmethod
    def from_state(cls, state: dict) -> OODGate:
        return cls(**state)

    @classmethod
    def fit(cls, train: torch.Tensor, val: torch.Tensor, fraction: float) -> OODGate:
        """From (N, C) pooled features of training images (the Gaussian) and validation images
        (the threshold)."""
        if not 0 < fraction < 0.5:
            raise ValueError(f"ood.fraction={fraction} must lie in (0, 0.5)")
        estimate = LedoitWolf().fit(train.double().numpy())
        gate = cls(torch.from_numpy(estimate.location_).float(),
                   torch.from_numpy(estimate.precision_).float(), 1.0, fraction,
                   {"train": len(train), "val": len(val)})
        gate.threshold = float(np.quantile(gate.score(val).numpy(), 1 - fraction))
        return gate


@torch.inference_mode()
def pooled_features(features: Callable[[torch.Tensor], torch.Tensor], data: Dataset,
                    batch_size: int = 64, device: str = "cpu", num_workers: int = 0,
                    limit: int | None = None) -> torch.Tensor:
    """(N, C) globally pooled outputs of `features` (a network part on `device`) over a data set
    of (input, target) pairs, at most `limit` of them, evenly spaced."""
    if limit is not None and len(data) > limit:
        data = Subset(data, np.linspace(0, len(data) - 1, limit).round().astype(int).tolist())
    out = [features(x.to(device)).float().mean((2, 3)).cpu()
           for x, _ in DataLoader(data, batch_size=batch_size, num_workers=num_workers)]
    return torch.cat(out)
