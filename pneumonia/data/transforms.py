"""Deterministic preprocessing (crop, resize) shared by training and inference, and augmentation."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
import albumentations as A  # noqa: E402


@dataclass(frozen=True)
class ProportionalCrop:
    """Study A's centre crop: bigger images show more than the thorax, so they lose more.

    new_width = (1 - width_fraction * width / max_width) * width, likewise for the height,
    with max_width/max_height measured on the training images. The largest image loses
    `width_fraction` of its width and `height_fraction` of its height.
    """

    max_width: int
    max_height: int
    width_fraction: float = 0.35
    height_fraction: float = 0.20

    def crop_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the centre crop for an image of this size."""
        new_w = max(1, round((1 - self.width_fraction * min(width / self.max_width, 1.0)) * width))
        new_h = max(1, round((1 - self.height_fraction * min(height / self.max_height, 1.0)) * height))
        left, top = (width - new_w) // 2, (height - new_h) // 2
        return left, top, left + new_w, top + new_h

    def __call__(self, image: np.ndarray) -> np.ndarray:
        left, top, right, bottom = self.crop_box(image.shape[1], image.shape[0])
        return image[top:bottom, left:right]


@dataclass(frozen=True)
class Preprocessing:
    """Everything inference needs to see an image the way training did; saved with checkpoints."""

    image_size: int
    mean: float
    std: float
    crop: dict | None = None  # ProportionalCrop fields, or None for no crop

    def to_dict(self) -> dict:
        return asdict(self)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """(H, W) uint8 -> cropped and resized (image_size, image_size) uint8."""
        if self.crop is not None:
            image = ProportionalCrop(**self.crop)(image)
        if image.shape != (self.image_size, self.image_size):
            resized = Image.fromarray(image).resize((self.image_size, self.image_size), Image.BILINEAR)
            image = np.asarray(resized)
        return image

    def normalize(self, image: np.ndarray) -> np.ndarray:
        """uint8 (H, W) -> float32 (1, H, W) in the backbone's normalised space."""
        return ((image.astype(np.float32) / 255.0 - self.mean) / self.std)[None]


def batch_augment(images: torch.Tensor, hflip: float = 0.5, brightness=(-0.1, 0.1),
                  contrast=(0.0, 0.1), scale=None, rotate: float = 0.0, translate: float = 0.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """The same augmentation as `build_augmentation`, on a float batch (N, 1, H, W) in [0, 1].

    Runs on whatever device the batch is on; each image draws its own parameters. Order:
    flip, affine (zoom `scale`, rotation up to `rotate` degrees, shift up to `translate` of
    the side; black outside the image), then brightness and contrast.
    """
    n, device = images.shape[0], images.device

    def uniform(bounds) -> torch.Tensor:
        lo, hi = bounds or (0.0, 0.0)
        return (torch.rand(n, 1, 1, 1, generator=generator, device=device) * (hi - lo) + lo)

    if hflip:
        flip = flip_mask(n, hflip, generator, device)
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    if scale or rotate or translate:
        images = random_affine(images, uniform(scale or (1.0, 1.0)), uniform((-rotate, rotate)),
                               uniform((-translate, translate)), uniform((-translate, translate)))
    alpha, beta = 1 + uniform(contrast), uniform(brightness)
    return apply_brightness_contrast(images, alpha, beta)


def flip_mask(n: int, hflip: float, generator: torch.Generator | None = None,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """Which of n images to mirror: the first draw of `batch_augment`, shared with the feature
    cache so that both paths mirror the same images for the same generator."""
    return torch.rand(n, generator=generator, device=device) < hflip


def random_affine(images: torch.Tensor, scale, degrees, shift_x, shift_y) -> torch.Tensor:
    """Zoom by `scale` (> 1 enlarges), rotate by `degrees`, shift by a fraction of the side;
    each argument (N, 1, 1, 1)."""
    angle = degrees.flatten() * math.pi / 180
    cos, sin, inv = angle.cos(), angle.sin(), 1 / scale.flatten()
    theta = torch.stack([
        torch.stack([cos * inv, -sin * inv, -2 * shift_x.flatten()], 1),
        torch.stack([sin * inv, cos * inv, -2 * shift_y.flatten()], 1),
    ], 1)
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def apply_brightness_contrast(images: torch.Tensor, alpha, beta) -> torch.Tensor:
    """albumentations 2.0.8's formula on [0, 1] images: clip(img * alpha + beta)."""
    return (images * alpha + beta).clamp_(0.0, 1.0)


def build_augmentation(hflip: float = 0.5, brightness=(-0.1, 0.1), contrast=(0.0, 0.1),
                       scale=None, rotate: float = 0.0, translate: float = 0.0) -> A.Compose:
    """Train-time augmentation on uint8 images (the path without the preprocessed cache).

    albumentations 2.0.8 applies contrast as img * (1 + c) + b * 255 (not centred on the mean).
    Flip, brightness and contrast match `batch_augment` exactly for the same parameters; the
    affine step is the same transform drawn the same way, not bit-identical.
    """
    transforms = []
    if hflip:
        transforms.append(A.HorizontalFlip(p=hflip))
    if scale or rotate or translate:
        transforms.append(A.Affine(scale=tuple(scale or (1.0, 1.0)), rotate=(-rotate, rotate),
                                   translate_percent=(-translate, translate), fill=0, p=1.0))
    if brightness is not None or contrast is not None:
        transforms.append(
            A.RandomBrightnessContrast(
                brightness_limit=tuple(brightness or (0.0, 0.0)),
                contrast_limit=tuple(contrast or (0.0, 0.0)),
                brightness_by_max=True,
                p=1.0,
            )
        )
    return A.Compose(transforms)
