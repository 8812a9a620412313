"""Reading X-ray files: one place that turns a file into a grayscale uint8 array."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".png"})


class ImageReadError(ValueError):
    """A file that should be an X-ray could not be read."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


def is_image_file(path: Path) -> bool:
    """True for files this project reads; hidden files such as `.DS_Store` are not."""
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES


def image_size(path: Path | str) -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels.

    Also catches files that are not images and JPEGs cut short (no end-of-image marker),
    so bad files are found before training starts rather than in the middle of an epoch.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            width, height = img.size
            fmt = img.format
    except (UnidentifiedImageError, OSError) as err:
        size = path.stat().st_size if path.exists() else 0
        reason = "empty file" if size == 0 else f"not a readable image ({err.__class__.__name__})"
        raise ImageReadError(path, reason) from err
    if width <= 0 or height <= 0:
        raise ImageReadError(path, f"image has no pixels ({width}x{height})")
    if fmt == "JPEG" and not _jpeg_has_end_marker(path):
        raise ImageReadError(path, "truncated JPEG (no end-of-image marker)")
    return width, height


def _jpeg_has_end_marker(path: Path, tail: int = 4096) -> bool:
    # Some writers pad after the marker, so look at the last few KiB, not the last 2 bytes.
    with path.open("rb") as f:
        f.seek(0, 2)
        f.seek(max(0, f.tell() - tail))
        return b"\xff\xd9" in f.read()


def read_grayscale(path: Path | str) -> np.ndarray:
    """Decode an image file into an (H, W) uint8 array; RGB files are converted to luminance."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode == "I;16" or img.mode == "I":
                # 16-bit grayscale: scale to 8 bits over the full dynamic range of the type.
                arr = np.asarray(img, dtype=np.float32) / 257.0
                return np.clip(arr, 0, 255).astype(np.uint8)
            return np.asarray(img.convert("L"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ImageReadError(path, f"cannot decode image ({err})") from err
