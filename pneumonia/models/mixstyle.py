"""MixStyle (Zhou et al., ICLR 2021): mix feature statistics between training images.

The Kermany test images shift the backbone's feature statistics (docs/results.md: AdaBN on
the test images recovers most of stage 1's lost specificity). MixStyle is the inductive
counterpart: during training, after some stages, each image's channel means and standard
deviations are replaced by a random mix of its own and another image's, so the classifier
cannot lean on them. It does nothing in eval mode and adds no parameters, so checkpoints
load the same with or without it. It did not help the CPU recipe (docs/results.md). Its
draws come from torch's global generator, so a resumed run does not repeat them exactly.
"""

from __future__ import annotations

import torch
from torch import nn


class MixStyle(nn.Module):
    """With probability `p` per training batch, x -> normalised x * mixed std + mixed mean,
    mixing weights drawn from Beta(alpha, alpha) per image, partners a random permutation."""

    def __init__(self, p: float = 0.5, alpha: float = 0.1, eps: float = 1e-6):
        super().__init__()
        self.p, self.alpha, self.eps = p, alpha, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.shape[0] < 2 or torch.rand(()) >= self.p:
            return x
        n = x.shape[0]
        xf = x.float()  # statistics in float32 under bf16 autocast
        mean = xf.mean(dim=(2, 3), keepdim=True).detach()
        std = (xf.var(dim=(2, 3), keepdim=True) + self.eps).sqrt().detach()
        weight = torch.distributions.Beta(self.alpha, self.alpha).sample((n, 1, 1, 1)).to(x.device)
        partner = torch.randperm(n, device=x.device)
        mixed_mean = weight * mean + (1 - weight) * mean[partner]
        mixed_std = weight * std + (1 - weight) * std[partner]
        return ((xf - mean) / std * mixed_std + mixed_mean).to(x.dtype)

    def hook(self, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        return self(output)


def add_mixstyle(backbone: nn.Module, p: float, alpha: float = 0.1) -> MixStyle:
    """Apply MixStyle to the outputs of a timm backbone's feature stages after the first and
    before the last (ResNet: layer1-3; DenseNet: denseblock1-3), as the paper does. Returns the
    module: register it on the network so that train() and eval() reach it."""
    mixstyle = MixStyle(p, alpha)
    names = [info["module"] for info in backbone.feature_info][1:-1]
    for name in names:
        backbone.get_submodule(name).register_forward_hook(mixstyle.hook)
    return mixstyle
