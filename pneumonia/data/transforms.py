"""Deterministic preprocessing (crop, resize, normalisation) shared by training and inference,
and the training augmentation."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np
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
        new_h = max(1, round((1 - self.height_fraction * min(height / self.max_height, 1.0))
                             * height))
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
            resized = Image.fromarray(image).resize((self.image_size, self.image_size),
                                                    Image.BILINEAR)
            image = np.asarray(resized)
        return image

    def normalize(self, image: np.ndarray) -> np.ndarray:
        """uint8 (H, W) -> float32 (1, H, W) in the backbone's normalised space."""
        return normalize(image.astype(np.float32) / 255.0, self.mean, self.std)[None]


def normalize(pixels, mean: float, std: float):
    """Pixel values in [0, 1] (a number, array or tensor) -> the backbone's normalised space:
    the one place the project applies a backbone's mean and std."""
    return (pixels - mean) / std


class Augmentation:
    """Training augmentation of preprocessed uint8 (S, S) images, each draw fixed by
    (seed, epoch, image index), for the decoded and the cached path alike.

    A flip with probability `hflip`; one affine step (zoom drawn from `scale` for both axes,
    rotation up to `rotate` degrees, shift up to `translate` of the side, black outside); then
    brightness and contrast, which albumentations applies as img * (1 + c) + b * 255 (not
    centred on the mean). Each transform is reseeded from its own stream before each image, so
    its draws do not depend on the others: a resumed run repeats them, and the number of loader
    workers changes nothing.
    """

    def __init__(self, seed: int = 0, hflip: float = 0.5, brightness=(-0.1, 0.1),
                 contrast=(0.0, 0.1), scale=None, rotate: float = 0.0, translate: float = 0.0):
        self.seed = seed
        transforms: list[A.BasicTransform] = []
        if hflip:
            transforms.append(A.HorizontalFlip(p=hflip))
        if scale or rotate or translate:
            transforms.append(A.Affine(scale=tuple(scale or (1.0, 1.0)), keep_ratio=True,
                                       rotate=(-rotate, rotate),
                                       translate_percent=(-translate, translate), fill=0, p=1.0))
        if brightness is not None or contrast is not None:
            transforms.append(A.RandomBrightnessContrast(
                brightness_limit=tuple(brightness or (0.0, 0.0)),
                contrast_limit=tuple(contrast or (0.0, 0.0)), brightness_by_max=True, p=1.0))
        self.compose = A.Compose(transforms)

    def __call__(self, image: np.ndarray, epoch: int, index: int) -> np.ndarray:
        """The augmented copy of uint8 `image` (S, S) for this epoch and image index."""
        streams = np.random.SeedSequence([self.seed, epoch, index]).generate_state(
            len(self.compose.transforms) + 1)
        self.compose.set_random_seed(int(streams[0]))  # also seeds every transform with it...
        for transform, stream in zip(self.compose.transforms, streams[1:]):
            transform.set_random_seed(int(stream))  # ...so each one gets its own stream after
        return self.compose(image=image)["image"]
