"""Backbones by name through timm, study A's channel adapter, and the two heads."""

from __future__ import annotations

import timm
import torch
from timm.models import PretrainedCfg, group_modules
from torch import nn

from pneumonia.checks import check_choice
from pneumonia.errors import ConfigError
from pneumonia.models.weights import resolve_weights

ADAPTERS = ("conv", "none")
HEADS = ("linear", "deep_mlp")
FREEZE = ("features", "lower", "none")


class DeepMLPHead(nn.Module):
    """Study B's head: 4x4 pooling, dense 1024-512-256-128-64-32 (ReLU), BatchNorm, dense."""

    def __init__(self, channels: int, feature_size: tuple[int, int], num_classes: int = 2):
        super().__init__()
        pool = min(4, *feature_size)
        pooled = (feature_size[0] // pool) * (feature_size[1] // pool)
        widths = [channels * pooled, 1024, 512, 256, 128, 64, 32]
        layers: list[nn.Module] = [nn.AvgPool2d(pool), nn.Flatten()]
        for n_in, n_out in zip(widths, widths[1:]):
            layers += [nn.Linear(n_in, n_out), nn.ReLU(inplace=True)]
        layers += [nn.BatchNorm1d(widths[-1]), nn.Linear(widths[-1], num_classes)]
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


class PneumoniaNet(nn.Module):
    """Grayscale image (N, 1, S, S) -> class logits (N, num_classes). In training, frozen features
    with nothing trainable before them run without an autograd graph; eval mode keeps the graph,
    which Grad-CAM and integrated gradients need."""

    def __init__(self, adapter: nn.Module, backbone: nn.Module, head: nn.Module | None,
                 frozen_features: bool = False, fixed: tuple[nn.Module, ...] = ()):
        super().__init__()
        self.adapter = adapter
        self.backbone = backbone
        self.head = head  # None: the backbone's own (reset) timm classifier
        self.frozen_features = frozen_features
        self.fixed = fixed  # modules of the backbone that stay in eval mode (model.freeze=lower)

    def train(self, mode: bool = True) -> PneumoniaNet:
        super().train(mode)
        for module in self.fixed:  # their BatchNorm keeps its statistics in training too
            module.eval()
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.adapter(x)
        if (self.training and self.frozen_features
                and not any(p.requires_grad for p in self.adapter.parameters())):
            with torch.no_grad():
                return self.backbone.forward_features(x)
        return self.backbone.forward_features(x)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            return self.backbone.forward_head(features)
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))


def check_backbone(name: str) -> None:
    if not timm.is_model(name):
        raise ConfigError(
            f"model.backbone={name!r} is not a timm model: give a name from timm.list_models(), "
            "or model=<a file of conf/model/> for this project's configs"
        )


def _head_trainable_names(backbone: nn.Module) -> list[str]:
    """The timm classifier, plus VGG's dense pre-logits block (study A trains all dense layers)."""
    names = [backbone.pretrained_cfg["classifier"]]
    pre_logits = getattr(backbone, "pre_logits", None)
    if isinstance(pre_logits, nn.Module) and list(pre_logits.parameters()):
        names.append("pre_logits")
    return names


def _lower_half(backbone: nn.Module) -> list[str]:
    """The modules of the stem and the first half of the stages: the first half of timm's
    coarse parameter groups, the classifier's group not counted (EfficientNet-Lite0: the stem
    and blocks 0-2, at 112-28 px of 224; ResNet-18: the stem and layer1)."""
    groups = list(group_modules(backbone, backbone.group_matcher(coarse=True)).values())
    return [name for group in groups[:(len(groups) - 1) // 2] for name in group]


def build_network(
    backbone: str,
    pretrained: bool | str = False,
    adapter: str = "none",
    head: str = "linear",
    freeze: str = "none",
    input_size: int = 224,
    num_classes: int = 2,
    **_: object,
) -> PneumoniaNet:
    """The network for one stage from plain options (the same options are stored in checkpoints;
    other keys, such as the config's `name`, are ignored)."""
    check_choice("model.adapter", adapter, ADAPTERS)
    check_choice("model.head", head, HEADS)
    check_choice("model.freeze", freeze, FREEZE)
    in_chans = 3 if adapter == "conv" else 1  # in_chans=1: timm sums the RGB filters of conv 1
    if adapter == "conv":
        # A trainable 1->3 convolution; starting as "copy gray into R, G and B" keeps the
        # pretrained filters meaningful from the first step.
        adapter_module: nn.Module = nn.Conv2d(1, 3, kernel_size=1)
        nn.init.ones_(adapter_module.weight)
        nn.init.zeros_(adapter_module.bias)
    else:
        adapter_module = nn.Identity()
    check_backbone(backbone)
    file = resolve_weights(backbone, pretrained).file  # None: random initialisation
    # timm's own loader reads the file: it adapts in_chans and drops a classifier of the wrong size
    overlay = {"pretrained_cfg_overlay": dict(file=str(file))} if file else {}
    net = timm.create_model(backbone, pretrained=file is not None, in_chans=in_chans,
                            num_classes=num_classes if head == "linear" else 0, **overlay)
    if file is not None and head == "linear":
        # The new classifier starts at zero over the pretrained features (as BiT's heads do):
        # timm's EfficientNet init draws it from U(+-1/sqrt(num_classes)), which for 2 classes
        # gave first logits of std ~4 that study A's recipe took epochs to undo
        # (docs/notes/studies-real-weights.md).
        nn.init.zeros_(net.get_classifier().weight)
        nn.init.zeros_(net.get_classifier().bias)
    head_module = None
    if head == "deep_mlp":
        with torch.no_grad():  # in eval mode: the probe must not move BatchNorm's statistics
            features = net.eval().forward_features(torch.zeros(1, in_chans, input_size, input_size))
        net.train()
        head_module = DeepMLPHead(features.shape[1], tuple(features.shape[2:]), num_classes)
    fixed = ()
    if freeze == "features":
        # Frozen BatchNorm becomes FrozenBatchNorm2d: no running-stat updates in train mode.
        timm.utils.freeze(net)
        if head_module is None:
            timm.utils.unfreeze(net, _head_trainable_names(net))
    elif freeze == "lower":
        # Ordinary BatchNorm kept in eval mode, not FrozenBatchNorm2d: the same computation,
        # 2.7x faster at inference on a CPU (bf16, channels-last), and AdaBN can adapt it
        names = _lower_half(net)
        timm.utils.freeze(net, names, include_bn_running_stats=False)
        fixed = tuple(net.get_submodule(name) for name in names)
    return PneumoniaNet(adapter_module, net, head_module, frozen_features=freeze == "features",
                        fixed=fixed)


def normalization_stats(backbone: str, mode: str) -> tuple[float, float]:
    """One-channel (mean, std): the backbone's ImageNet statistics averaged, or plain [0, 1]."""
    check_choice("data.normalization", mode, ("backbone", "unit"))
    if mode == "unit":
        return 0.0, 1.0
    cfg = timm.get_pretrained_cfg(backbone) or PretrainedCfg()  # its default: ImageNet's
    return float(sum(cfg.mean) / len(cfg.mean)), float(sum(cfg.std) / len(cfg.std))


def interpolation(backbone: str) -> str:
    """The resize its weights were trained with (timm's pretrained config): bicubic or bilinear."""
    cfg = timm.get_pretrained_cfg(backbone) or PretrainedCfg()
    return "bicubic" if cfg.interpolation == "bicubic" else "bilinear"
