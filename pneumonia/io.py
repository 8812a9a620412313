"""Reading X-ray files: one place that turns a file into a grayscale uint8 array."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".png", ".dcm"})
# Percentiles mapped to black and white for deep pixels that carry no window of their own: a
# few saturated or dead pixels (burned-in labels, detector defects) then cannot decide the
# contrast of the whole image.
WINDOW_PERCENTILES = (0.5, 99.5)
_DEEP_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


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
    return (path.is_file() and not path.name.startswith(".")
            and path.suffix.lower() in IMAGE_SUFFIXES)


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


def _stretch_to_uint8(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Pixels from lo..hi to 0..255, clipped outside; all black when the range is empty."""
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    scaled = (arr.astype(np.float64) - lo) * (255.0 / (hi - lo))
    return np.round(np.clip(scaled, 0.0, 255.0)).astype(np.uint8)


def window_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Deep pixels without a window of their own to 8 bits: the WINDOW_PERCENTILES of the image
    become black and white, so a few extreme pixels cannot flatten the contrast. An image
    whose percentiles coincide (mostly one value) falls back to its full range."""
    arr = arr.astype(np.float64)
    lo, hi = (float(v) for v in np.percentile(arr, WINDOW_PERCENTILES))
    if hi <= lo:
        lo, hi = float(arr.min()), float(arr.max())
    return _stretch_to_uint8(arr, lo, hi)


def _has_window(ds) -> bool:
    """True when the DICOM file carries its own window (centre and width, or a VOI LUT)."""
    return ("WindowCenter" in ds and "WindowWidth" in ds) or "VOILUTSequence" in ds


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


def _dicom_pixels(path: Path, ds) -> np.ndarray:
    """The stored pixel array of one grayscale frame."""
    try:
        arr = ds.pixel_array
    except Exception as err:  # compressed transfer syntax without a decoder, bad length...
        raise ImageReadError(path, f"cannot decode DICOM pixel data ({err})") from err
    if arr.ndim != 2:
        raise ImageReadError(path, f"expected one grayscale frame, got pixel array of shape "
                                   f"{arr.shape}")
    return arr


def read_dicom(path: Path | str) -> np.ndarray:
    """DICOM to (H, W) uint8: modality LUT, then the file's own window (VOI LUT) when it has one,
    else the WINDOW_PERCENTILES window; MONOCHROME1 inverted.

    Only pixels leave this function: no patient identifier reaches any output.
    """
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    path = Path(path)
    ds = _read_dicom(path)
    arr, windowed = _dicom_pixels(path, ds), _has_window(ds)
    try:  # pydicom raises several types on bad values (a width of 0, a LUT of the wrong size)
        arr = apply_modality_lut(arr, ds)
        if windowed:
            arr = apply_voi_lut(arr, ds)
    except Exception as err:
        raise ImageReadError(path, f"cannot apply the DICOM rescale or window ({err})") from err
    arr = np.asarray(arr, dtype=np.float64)
    if ds.get("PhotometricInterpretation", "MONOCHROME2") == "MONOCHROME1":
        arr = -arr  # MONOCHROME1: high values are dark
    if windowed:  # the window already chose what is black and white
        return _stretch_to_uint8(arr, float(arr.min()), float(arr.max()))
    return window_to_uint8(arr)


def _pil_to_uint8(img: Image.Image) -> np.ndarray:
    """A decoded PIL image as (H, W) uint8; colour becomes luminance, deep pixels are windowed."""
    if img.mode in _DEEP_MODES:
        return window_to_uint8(np.asarray(img))
    return np.asarray(img.convert("L"), dtype=np.uint8)


def read_grayscale(path: Path | str) -> np.ndarray:
    """Decode an X-ray file into an (H, W) uint8 array.

    JPEG and PNG (8 or 16 bit; grayscale, RGB, RGBA or CMYK, colour converted to luminance)
    and DICOM (.dcm). 8-bit pixels are kept as they are; deeper ones without a window of their
    own map their WINDOW_PERCENTILES to black and white.
    """
    path = Path(path)
    if path.suffix.lower() == ".dcm":
        return read_dicom(path)
    try:
        with _open_image(path) as img:
            img.load()
            return _pil_to_uint8(img)
    except ImageReadError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise _unreadable(path, f"cannot decode image ({err})") from err
