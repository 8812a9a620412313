"""Deterministic preprocessing (crop, resize, normalisation) shared by training and inference,
and the training augmentation."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
import albumentations as A  # noqa: E402
import cv2  # noqa: E402  (installed with albumentations)


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


RESAMPLING = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


@dataclass(frozen=True)
class Preprocessing:
    """Everything inference needs to see an image the way training did; saved with checkpoints.

    `__call__` crops and resizes (with the weights' own `interpolation`, timm's pretrained
    config); `normalize` standardises the intensities per image (`standardize`) and applies the
    backbone's mean and std. Augmentation sits between the two, so an acquisition change drawn
    in training meets the same standardisation as a new site's image."""

    image_size: int
    mean: float
    std: float
    crop: dict | None = None  # ProportionalCrop fields, or None for no crop
    # the defaults are what checkpoints made before these options did
    interpolation: str = "bilinear"
    standardize: str = "none"

    def to_dict(self) -> dict:
        return asdict(self)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """(H, W) uint8 -> cropped and resized (image_size, image_size) uint8."""
        if self.crop is not None:
            image = ProportionalCrop(**self.crop)(image)
        if image.shape != (self.image_size, self.image_size):
            resized = Image.fromarray(image).resize((self.image_size, self.image_size),
                                                    RESAMPLING[self.interpolation])
            image = np.asarray(resized)
        return image

    def normalize(self, image: np.ndarray) -> np.ndarray:
        """uint8 (H, W) -> float32 (1, H, W), standardised, in the backbone's normalised space."""
        pixels = standardize(image, self.standardize).astype(np.float32) / 255.0
        return normalize(pixels, self.mean, self.std)[None]


STANDARDIZATIONS = ("none", "stretch", "equalize", "clahe")


def standardize(image: np.ndarray, method: str) -> np.ndarray:
    """A per-image intensity standardisation of a uint8 (H, W) image (data.standardize):
    none; stretch (its 1st-99th percentiles to 0-255); equalize (global histogram
    equalisation); clahe (contrast-limited adaptive equalisation, clip 2, 8x8 tiles)."""
    if method == "none":
        return image
    if method == "stretch":
        low, high = np.percentile(image, [1, 99])
        scaled = (image.astype(np.float32) - low) * (255.0 / max(high - low, 1.0))
        return np.clip(scaled, 0, 255).round().astype(np.uint8)
    if method == "equalize":
        return cv2.equalizeHist(np.ascontiguousarray(image))
    if method == "clahe":
        return cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(
            np.ascontiguousarray(image))
    raise ValueError(f"unknown standardisation {method!r}; one of {STANDARDIZATIONS}")


def _shot_noise(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    photons = 150.0  # a low dose: Poisson noise whose variance follows the signal
    return np.clip(rng.poisson(image / 255.0 * photons) / photons * 255.0, 0, 255)


def _collimation(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = image.shape
    dy, dx = int(h * rng.uniform(0.04, 0.10)), int(w * rng.uniform(0.08, 0.15))
    out = np.zeros_like(image)
    out[dy:h - dy, dx:w - dx] = image[dy:h - dy, dx:w - dx]
    return out


def _tone_curve(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    x, k = image / 255.0, rng.uniform(5.0, 9.0)  # an S-shaped window: harder mid-tones
    curve = 1 / (1 + np.exp(-k * (x - 0.5)))
    low, high = 1 / (1 + np.exp(k / 2)), 1 / (1 + np.exp(-k / 2))
    return (curve - low) / (high - low) * 255.0


# Acquisition changes that no training augmentation draws (data.augment has gamma, Gaussian noise
# and blur, a 3x3 sharpen, JPEG and downscaling): validation images under these stand in for a
# new site when the operating point is chosen (TwoStagePipeline.calibrate).
HELD_OUT_SHIFTS = {
    "clahe": lambda x, rng: cv2.createCLAHE(clipLimit=3.0, tileGridSize=(4, 4)).apply(x),
    "unsharp mask": lambda x, rng: cv2.addWeighted(x, 1.8, cv2.GaussianBlur(x, (0, 0), 4.0),
                                                   -0.8, 0),
    "shot noise": _shot_noise,
    "collimation": _collimation,
    "tone curve": _tone_curve,
    "median filter": lambda x, rng: cv2.medianBlur(x, 5),
}


def held_out_shift(image: np.ndarray, index: int) -> np.ndarray:
    """uint8 `image` under the held-out acquisition change `index` picks (each in turn), its
    random draws fixed by `index`."""
    name = list(HELD_OUT_SHIFTS)[index % len(HELD_OUT_SHIFTS)]
    shifted = HELD_OUT_SHIFTS[name](np.ascontiguousarray(image), np.random.default_rng(index))
    return np.clip(np.asarray(shifted, np.float32), 0, 255).round().astype(np.uint8)


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
    centred on the mean). Then the acquisition changes a new site brings (docs/site.md), each
    drawn with probability `acquisition` where set: `gamma` [low, high], Gaussian `noise`
    (std range, fraction of 255), `blur` (Gaussian sigma range, px) or else `sharpen` (alpha
    range), `jpeg` quality range, `downscale` (resolution kept, range). Each transform is
    reseeded from its own stream before each image, so its draws do not depend on the others:
    a resumed run repeats them, and the number of loader workers changes nothing.
    """

    def __init__(self, seed: int = 0, hflip: float = 0.5, brightness=(-0.1, 0.1),
                 contrast=(0.0, 0.1), scale=None, rotate: float = 0.0, translate: float = 0.0,
                 acquisition: float = 0.5, gamma=None, noise=None, blur=None, sharpen=None,
                 jpeg=None, downscale=None):
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
        p = acquisition
        if gamma:
            transforms.append(A.RandomGamma(gamma_limit=(100 * gamma[0], 100 * gamma[1]), p=p))
        if blur and sharpen:
            transforms.append(A.OneOf([A.GaussianBlur(sigma_limit=tuple(blur), blur_limit=0),
                                       A.Sharpen(alpha=tuple(sharpen), lightness=(1.0, 1.0))],
                                      p=p))
        elif blur:
            transforms.append(A.GaussianBlur(sigma_limit=tuple(blur), blur_limit=0, p=p))
        elif sharpen:
            transforms.append(A.Sharpen(alpha=tuple(sharpen), lightness=(1.0, 1.0), p=p))
        if downscale:
            transforms.append(A.Downscale(scale_range=tuple(downscale), p=p, interpolation_pair={
                "downscale": cv2.INTER_AREA, "upscale": cv2.INTER_LINEAR}))
        if noise:
            transforms.append(A.GaussNoise(std_range=tuple(noise), p=p))
        if jpeg:
            transforms.append(A.ImageCompression(quality_range=tuple(jpeg), p=p))
        self.compose = A.Compose(transforms)

    def __call__(self, image: np.ndarray, epoch: int, index: int) -> np.ndarray:
        """The augmented copy of uint8 `image` (S, S) for this epoch and image index."""
        streams = np.random.SeedSequence([self.seed, epoch, index]).generate_state(
            len(self.compose.transforms) + 1)
        self.compose.set_random_seed(int(streams[0]))  # also seeds every transform with it...
        for transform, stream in zip(self.compose.transforms, streams[1:]):
            transform.set_random_seed(int(stream))  # ...so each one gets its own stream after
        return self.compose(image=image)["image"]
