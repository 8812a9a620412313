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


class Probabilities(nn.Sequential):
    """Logits -> softmax, so attributions are changes in class probability."""

    def __init__(self, model: nn.Module):
        super().__init__(model, nn.Softmax(dim=1))


def occlusion_map(model: nn.Module, images: torch.Tensor, target: torch.Tensor, window: int = 15,
                  stride: int = 10, baseline: float = 0.0, perturbations_per_eval: int = 32,
                  mode: str = "exact", incremental: bool = True) -> torch.Tensor:
    """Drop in the target probability when a window x window patch is set to `baseline`
    (positive: the patch supported the target class).

    images: (N, 1, H, W) in the model's normalised space; baseline in that space too.
    incremental: pneumonia.explain.occlusion's engine (exact unless mode="approximate"); networks
    it cannot trace or where it saves too little, and incremental=False, run Captum.
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


def gradcam_map(net: nn.Module, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Grad-CAM on the last feature stage of a PneumoniaNet's timm backbone (timm's own
    feature_info), ReLU'd and upsampled to the input size."""
    if not hasattr(net, "backbone"):
        raise ConfigError("method=gradcam explains one network, and this stage averages several "
                          "checkpoints: use method=occlusion or integrated_gradients")
    layer = net.backbone.get_submodule(net.backbone.feature_info[-1]["module"])
    with torch.enable_grad():
        cam = LayerGradCam(Probabilities(net), layer).attribute(
            images, target=target, relu_attributions=True)
    return LayerAttribution.interpolate(cam.detach(), images.shape[-2:], "bilinear")[:, 0]


def integrated_gradients_map(model: nn.Module, images: torch.Tensor, target: torch.Tensor,
                             baseline: float = 0.0) -> torch.Tensor:
    with torch.enable_grad():
        attributions = IntegratedGradients(Probabilities(model)).attribute(
            images.requires_grad_(True), baselines=baseline, target=target, n_steps=32,
            internal_batch_size=32)
    return attributions.detach()[:, 0]


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
        return gradcam_map(net, images, target)
    if method == "integrated_gradients":
        return integrated_gradients_map(net, images, target, baseline)
    raise ConfigError(f"method={method!r} is not one of: {', '.join(METHODS)}")
