"""Attribution maps for a batch of images: occlusion (default), Grad-CAM, integrated gradients.

Every method explains the *probability* of a target class of one stage, and returns one
(H, W) map per image in the coordinates of the image that stage saw.
"""

from __future__ import annotations

import torch
from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam, Occlusion
from torch import nn

from pneumonia.errors import ConfigError
from pneumonia.explain.occlusion import incremental_occlusion_map, saves_work

METHODS = ("occlusion", "gradcam", "integrated_gradients")


class Probabilities(nn.Module):
    """Logits -> softmax, so attributions are changes in class probability."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).softmax(dim=1)


def occlusion_map(model: nn.Module, images: torch.Tensor, target: torch.Tensor, window: int = 15,
                  stride: int = 10, baseline: float = 0.0, perturbations_per_eval: int = 32,
                  mode: str = "exact", incremental: bool = True) -> torch.Tensor:
    """Drop in the target probability when a window x window patch is set to `baseline`.

    images: (N, 1, H, W) in the model's normalised space; baseline in that space too.
    `perturbations_per_eval` occluded copies of an image go through the network per pass.
    Positive values: the patch supported the target class.
    incremental: recompute each layer only where the patch changes it (pneumonia.explain.occlusion),
    exact unless mode="approximate" (drill-down, pneumonia.explain.occlusion); networks that
    torch.fx cannot trace or where that saves too little by the engine's own count, and
    incremental=False, run every copy through Captum (exact).
    """
    if incremental and saves_work(model, images[:1], window, stride, perturbations_per_eval):
        return incremental_occlusion_map(model, images, target, window, stride, baseline,
                                         perturbations_per_eval, mode)
    with torch.inference_mode(False), torch.no_grad():
        attributions = Occlusion(Probabilities(model)).attribute(
            images,
            sliding_window_shapes=(1, window, window),
            strides=(1, stride, stride),
            baselines=baseline,
            target=target,
            perturbations_per_eval=perturbations_per_eval,
        )
    return attributions[:, 0]


def gradcam_map(model: nn.Module, layer: nn.Module, images: torch.Tensor,
                target: torch.Tensor) -> torch.Tensor:
    """Grad-CAM on `layer`, ReLU'd and upsampled to the input size."""
    with torch.enable_grad():
        cam = LayerGradCam(Probabilities(model), layer).attribute(
            images, target=target, relu_attributions=True)
    return LayerAttribution.interpolate(cam.detach(), images.shape[-2:], "bilinear")[:, 0]


def integrated_gradients_map(model: nn.Module, images: torch.Tensor, target: torch.Tensor,
                             baseline: float = 0.0, steps: int = 32,
                             internal_batch_size: int = 32) -> torch.Tensor:
    with torch.enable_grad():
        attributions = IntegratedGradients(Probabilities(model)).attribute(
            images.requires_grad_(True), baselines=baseline, target=target, n_steps=steps,
            internal_batch_size=internal_batch_size)
    return attributions.detach()[:, 0]


def gradcam_layer(net: nn.Module) -> nn.Module:
    """The last feature stage of a PneumoniaNet's timm backbone (timm's own feature_info)."""
    if not hasattr(net, "backbone"):
        raise ConfigError("method=gradcam explains one network, and this stage averages several "
                          "checkpoints: use method=occlusion or integrated_gradients")
    return net.backbone.get_submodule(net.backbone.feature_info[-1]["module"])


def attribution_map(method: str, net: nn.Module, images: torch.Tensor, target: torch.Tensor,
                    window: int = 15, stride: int = 10, baseline: float = 0.0,
                    perturbations_per_eval: int = 32,
                    occlusion_mode: str = "exact") -> torch.Tensor:
    """(N, H, W) attribution of `target` for a batch, by the named method."""
    net.eval()
    if method == "occlusion":
        return occlusion_map(net, images, target, window, stride, baseline, perturbations_per_eval,
                             occlusion_mode)
    if method == "gradcam":
        return gradcam_map(net, gradcam_layer(net), images, target)
    if method == "integrated_gradients":
        return integrated_gradients_map(net, images, target, baseline)
    raise ConfigError(f"method={method!r} is not one of: {', '.join(METHODS)}")
