"""Reading X-ray files: one place that turns a file into a grayscale uint8 array."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".png", ".dcm"})


class ImageReadError(ValueError):
    """A file that should be an X-ray could not be read."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


@contextmanager
def _open_image(path: Path):
    """PIL's open, with its decompression-bomb warning (over about 89 megapixels) made an error:
    a real chest X-ray is under 10 megapixels, and a bomb must not exhaust memory."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as img:
                yield img
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
            raise ImageReadError(path, f"refused: too many pixels for an X-ray ({err})") from err


def _unreadable(path: Path, reason: str) -> ImageReadError:
    """The error for a file PIL could not read; an empty file says so plainly."""
    size = path.stat().st_size if path.exists() else 0
    return ImageReadError(path, "empty file" if size == 0 else reason)


def is_image_file(path: Path) -> bool:
    """True for files this project reads; hidden files such as `.DS_Store` are not."""
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES


def image_size(path: Path | str) -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels.

    Also catches files that are not images and JPEGs cut short (no end-of-image marker),
    so bad files are found before training starts rather than in the middle of an epoch.
    """
    path = Path(path)
    if path.suffix.lower() == ".dcm":
        ds = _read_dicom(path, pixels=False)
        return int(ds.Columns), int(ds.Rows)
    try:
        with _open_image(path) as img:
            width, height = img.size
            fmt = img.format
    except (UnidentifiedImageError, OSError) as err:
        raise _unreadable(path, f"not a readable image ({err.__class__.__name__})") from err
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


def _stretch_to_uint8(arr: np.ndarray) -> np.ndarray:
    """High-bit-depth pixels to 8 bits over the image's own range (X-rays rarely fill 16 bits)."""
    arr = arr.astype(np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    return np.round((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _read_dicom(path: Path, pixels: bool = True):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=not pixels)
    except (InvalidDicomError, OSError, ValueError, EOFError) as err:
        raise ImageReadError(path, f"not a readable DICOM file ({err.__class__.__name__})") from err
    if "Rows" not in ds or "Columns" not in ds or (pixels and "PixelData" not in ds):
        raise ImageReadError(path, "DICOM file has no pixel data")
    return ds


def read_dicom(path: Path | str) -> np.ndarray:
    """DICOM to (H, W) uint8: modality and VOI LUT (windowing) applied, MONOCHROME1 inverted.

    Only pixels leave this function: no patient identifier reaches any output.
    """
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    path = Path(path)
    ds = _read_dicom(path)
    try:
        arr = ds.pixel_array
    except Exception as err:  # compressed transfer syntax without a decoder, bad length...
        raise ImageReadError(path, f"cannot decode DICOM pixel data ({err})") from err
    if arr.ndim != 2:
        raise ImageReadError(path, f"expected one grayscale frame, got pixel array of shape {arr.shape}")
    arr = apply_voi_lut(apply_modality_lut(arr, ds), ds).astype(np.float64)
    if ds.get("PhotometricInterpretation", "MONOCHROME2") == "MONOCHROME1":
        arr = arr.max() - arr  # MONOCHROME1: high values are dark
    return _stretch_to_uint8(arr)


def read_grayscale(path: Path | str) -> np.ndarray:
    """Decode an X-ray file into an (H, W) uint8 array.

    JPEG and PNG (8 or 16 bit; grayscale, RGB, RGBA or CMYK, colour converted to luminance)
    and DICOM (.dcm). 8-bit pixels are kept as they are; deeper ones are stretched to 8 bits.
    """
    path = Path(path)
    if path.suffix.lower() == ".dcm":
        return read_dicom(path)
    try:
        with _open_image(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                return _stretch_to_uint8(np.asarray(img))
            return np.asarray(img.convert("L"), dtype=np.uint8)
    except ImageReadError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise _unreadable(path, f"cannot decode image ({err})") from err


def display_name(path: Path) -> str:  # TEMPORARY until the io hardening lands
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def scan_inputs(folder: Path) -> tuple[list[Path], list[ImageReadError]]:  # TEMPORARY
    if not folder.is_dir():
        raise FileNotFoundError(f"input={folder} does not exist or is not a folder")
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)), []
