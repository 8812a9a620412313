"""Reading X-ray files: one place that turns a file into a grayscale uint8 array.

Accepted inputs: JPEG (.jpeg, .jpg), PNG (.png) and DICOM (.dcm), one frame each, whose content
matches the suffix, at least MIN_SIDE pixels on each side and no more elongated than MAX_ASPECT.
DICOM must also be a chest radiograph by its tags (see _check_chest_radiograph) unless the caller
passes accept_any_modality=True. Everything else is refused with an ImageReadError that names the
file and says why. docs/formats.md lists the DICOM transfer syntaxes and their decoders.
"""

from __future__ import annotations

import io
import logging
import os
import stat
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from pneumonia.errors import ImageReadError, MissingInputError, NotChestRadiograph, display_name

IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".png", ".dcm"})
# The formats PIL may report for each suffix. MPO is how PIL names a JPEG that carries a
# multi-picture index (some cameras and scanners write one); a one-frame MPO is a plain JPEG.
SUFFIX_FORMATS = {".jpeg": ("JPEG", "MPO"), ".jpg": ("JPEG", "MPO"), ".png": ("PNG",)}
# Smallest accepted side in pixels. Models here see 224-299 px; below 64 px an X-ray carries no
# diagnostic detail, and such a file is a thumbnail, an icon or a placeholder, not a radiograph.
MIN_SIDE = 64
# Largest accepted ratio of the longer side to the shorter one. Chest radiographs are close to
# square (detector plates are 35x43 cm or 43x43 cm, Kermany images lie within about 1:2), so a
# ratio over 1:5 is a strip, a banner or a corrupt header, and squashing it to a square input
# would give a confident answer on a picture that is not a chest.
MAX_ASPECT = 5.0
# Percentiles mapped to black and white for deep pixels that carry no window of their own: a
# few saturated or dead pixels (burned-in labels, detector defects) then cannot decide the
# contrast of the whole image.
WINDOW_PERCENTILES = (0.5, 99.5)
_DEEP_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
# Modalities of projection radiographs (DICOM PS3.3 C.7.3.1.1.1): CR computed radiography, DX
# digital radiography, RG conventional film/screen radiography (a digitised chest film is still a
# chest radiograph). PX (dental panoramic), MG (mammography), IO (intra-oral), XA and RF
# (fluoroscopy) are projection images too, but never of a chest, so they are refused.
RADIOGRAPH_MODALITIES = frozenset({"CR", "DX", "RG"})
# BodyPartExamined values that name the chest: CHEST (PS3.16 Annex L, CID 4031), LUNG (CID 4031)
# and THORAX / LUNGS, which vendors write. Combined regions (CHESTABDOMEN, a neonatal
# "babygram") are refused: the models here learnt from chest films only.
CHEST_BODY_PARTS = frozenset({"CHEST", "THORAX", "LUNG", "LUNGS"})
# Photometric interpretations read: grayscale, and colour encodings that may hold a grayscale
# image in three equal channels (pydicom converts the YBR ones to RGB while decoding).
_COLOUR_PHOTOMETRICS = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")
_PHOTOMETRICS = ("MONOCHROME1", "MONOCHROME2", *_COLOUR_PHOTOMETRICS)
# The first bytes of a PNG and of a JPEG file (DICOM's marker follows a preamble: _dicom_header).
_IMAGE_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8")
log = logging.getLogger(__name__)
# What the DICOM readers read from: a file (path.open) or a request's bytes (io.BytesIO), opened
# afresh at each use; the Path beside it names the source in messages.
Opener = Callable[[], BinaryIO]


def _file_kind(mode: int) -> str:
    """A plain-words name for what a stat mode describes."""
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device file"
    return "not a regular file"


def _require_regular_file(path: Path) -> None:
    """Refuses a missing path, or one that is not a regular file, before anything opens it
    (opening a FIFO would wait forever for a writer; a device file may never end)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError as err:
        raise ImageReadError(path, "no such file (or a broken symbolic link)") from err
    except OSError as err:
        reason = err.strerror or err.__class__.__name__
        raise ImageReadError(path, f"cannot open ({reason})") from err
    if not stat.S_ISREG(mode):
        raise ImageReadError(path, f"{_file_kind(mode)}, not an image file; not read")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise ImageReadError(path, f"unsupported file type (suffix {path.suffix or 'none'}); "
                                   "expected JPEG (.jpeg, .jpg), PNG (.png) or DICOM (.dcm)")


@contextmanager
def _open_image(path: Path, source: BinaryIO | None = None):
    """PIL's open (of `source`, else the file `path`), with its decompression-bomb warning (over
    about 89 megapixels) made an error: a real chest X-ray is under 10 megapixels, and a bomb
    must not exhaust memory."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path if source is None else source) as img:
                yield img
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
            raise ImageReadError(path, f"refused: too many pixels for an X-ray ({err})") from err


def _dicom_header(head: bytes) -> bool:
    """True when the bytes hold the 128-byte DICOM preamble and the 'DICM' marker."""
    return head[128:132] == b"DICM"


def _unreadable(path: Path, reason: str) -> ImageReadError:
    """The error for a file PIL could not read; an empty file, or a DICOM file under another
    suffix, says so plainly."""
    if path.stat().st_size == 0:
        return ImageReadError(path, "empty file")
    with path.open("rb") as f:
        head = f.read(132)
    if _dicom_header(head):
        return ImageReadError(path, f"content is DICOM, not {path.suffix.lower()[1:].upper()}; "
                                    "rename it to .dcm")
    return ImageReadError(path, reason)


def is_image_file(path: Path) -> bool:
    """True for files this project reads; hidden files such as `.DS_Store` are not."""
    return (path.is_file() and not path.name.startswith(".")
            and path.suffix.lower() in IMAGE_SUFFIXES)


def _check_shape(path: Path, width: int, height: int) -> None:
    """Refuses images with no pixels, smaller than MIN_SIDE, or more elongated than MAX_ASPECT."""
    if width <= 0 or height <= 0:
        raise ImageReadError(path, f"image has no pixels ({width}x{height})")
    if min(width, height) < MIN_SIDE:
        raise ImageReadError(path, f"image too small for an X-ray ({width}x{height} pixels; "
                                   f"each side needs at least {MIN_SIDE})")
    if max(width, height) / min(width, height) > MAX_ASPECT:
        raise ImageReadError(path, f"implausible shape for a chest X-ray ({width}x{height} pixels; "
                                   f"sides may differ by at most 1:{MAX_ASPECT:g})")


def _check_header(path: Path, img: Image.Image, expected: tuple[str, ...] | None = None) -> None:
    """Refuses content unlike the suffix (or `expected`), several frames, or a bad shape."""
    expected = expected or SUFFIX_FORMATS[path.suffix.lower()]
    if img.format not in expected:
        raise ImageReadError(path, f"content is {img.format or 'an unknown format'}, not "
                                   f"{expected[0]} as the suffix {path.suffix} says; "
                                   "only JPEG, PNG and DICOM are read")
    frames = getattr(img, "n_frames", 1)
    if frames > 1:
        raise ImageReadError(path, f"{frames} frames (animated or multi-page image); "
                                   "expected a single X-ray")
    _check_shape(path, *img.size)


def image_size(path: Path | str) -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels.

    Also catches files that are not images, content that does not match the suffix, multi-frame
    files, implausible sizes and JPEGs cut short (no end-of-image marker), so bad files are found
    before training starts rather than in the middle of an epoch. DICOM passes the same
    chest-radiograph gate as in read_grayscale.
    """
    path = Path(path)
    _require_regular_file(path)
    if path.suffix.lower() == ".dcm":
        ds = _read_dicom(path, pixels=False)
        return int(ds.Columns), int(ds.Rows)
    try:
        with _open_image(path) as img:
            _check_header(path, img)
            width, height = img.size
            fmt = img.format
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise _unreadable(path, f"not a readable image ({err.__class__.__name__})") from err
    if fmt in ("JPEG", "MPO"):
        with path.open("rb") as f:  # writers may pad after the marker: read the last 4 KiB
            f.seek(max(0, path.stat().st_size - 4096))
            if b"\xff\xd9" not in f.read():
                raise ImageReadError(path, "truncated JPEG (no end-of-image marker)")
    return width, height


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


def _dicom_format_error(path: Path, opener: Opener, err: Exception) -> ImageReadError:
    """The error for a .dcm file pydicom cannot read, naming the real format when PIL knows it."""
    try:
        with opener() as f, Image.open(f) as img:
            found = img.format
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):  # not an image either
        return ImageReadError(path, f"not a readable DICOM file ({err.__class__.__name__})")
    return ImageReadError(path, f"content is {found}, not DICOM as the suffix .dcm says")


# The groups a DICOM dataset written without preamble and file meta starts with: its own file
# meta (0002) or, mostly, identifying data (0008). Read as a tag in either byte order.
_BARE_DATASET_GROUPS = frozenset({0x0002, 0x0008})


def _looks_like_bare_dataset(opener: Opener) -> bool:
    """True when the file starts with a tag of a _BARE_DATASET_GROUPS group, as a dataset without
    preamble and file meta does. Text and other formats do not, so they are never force-read."""
    with opener() as f:
        head = f.read(2)
    return len(head) == 2 and any(int.from_bytes(head, order) in _BARE_DATASET_GROUPS
                                  for order in ("little", "big"))


def _dcmread(path: Path, opener: Opener, pixels: bool):
    """pydicom's read. A dataset without preamble and file meta (older systems write them) is read
    with force=True and a logged warning, but only when it begins like a DICOM dataset and then
    holds a SOP Class UID or a Modality, so bytes that merely start alike are not taken for one."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with opener() as f:
            return pydicom.dcmread(f, stop_before_pixels=not pixels)
    except InvalidDicomError:
        if not _looks_like_bare_dataset(opener):
            raise
    with opener() as f:
        ds = pydicom.dcmread(f, stop_before_pixels=not pixels, force=True)
    if "SOPClassUID" not in ds and "Modality" not in ds:  # one of them is in every DICOM object
        raise InvalidDicomError("neither file meta nor SOP Class UID nor Modality")
    log.warning("%s: DICOM without preamble or file meta; read with force=True", display_name(path))
    return ds


def _set_missing_transfer_syntax(ds) -> None:
    """Names the transfer syntax when the file meta has none, so the pixel decoder knows the byte
    order. pydicom's docs set implicit VR little endian for such files; the encoding pydicom
    detected while reading is that in their case and also right for explicit VR files."""
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    if "TransferSyntaxUID" not in ds.file_meta:
        implicit, little = ds.original_encoding
        explicit = ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        ds.file_meta.TransferSyntaxUID = explicit if implicit is False else ImplicitVRLittleEndian


def _tag_text(ds, keyword: str) -> str:
    """A code-string tag's value, stripped and upper-case; '' when absent or empty."""
    return str(ds.get(keyword, "") or "").strip().upper()


def _check_chest_radiograph(path: Path, ds) -> None:
    """Refuses, with NotChestRadiograph, a dataset whose Modality or BodyPartExamined says it is
    not a chest radiograph. Modality is mandatory in every image object; without it only a
    one-channel Secondary Capture (how converters store a digitised film) is accepted, with a
    warning. The reason names only the deciding tags, never a patient identifier."""
    from pydicom.uid import SecondaryCaptureImageStorage

    modality, part = _tag_text(ds, "Modality"), _tag_text(ds, "BodyPartExamined")
    if not modality:
        if (ds.get("SOPClassUID") != SecondaryCaptureImageStorage
                or int(ds.get("SamplesPerPixel") or 1) != 1):
            raise NotChestRadiograph(path, "not a chest radiograph (Modality missing)")
        log.warning("%s: DICOM Secondary Capture without Modality; read as a radiograph",
                    display_name(path))
    elif modality not in RADIOGRAPH_MODALITIES:
        raise NotChestRadiograph(path, f"not a chest radiograph (Modality={modality})")
    if part and part not in CHEST_BODY_PARTS:
        raise NotChestRadiograph(path, f"not a chest radiograph (Modality={modality or 'missing'}, "
                                       f"BodyPartExamined={part})")


def _check_dicom_header(path: Path, ds, pixels: bool) -> None:
    """Refuses a header without pixels, with several frames, an unread photometric
    interpretation or a bad size, as an image's header is checked."""
    if "Rows" not in ds or "Columns" not in ds or (pixels and "PixelData" not in ds):
        raise ImageReadError(path, "DICOM file has no pixel data")
    try:
        frames, width, height = int(ds.get("NumberOfFrames") or 1), int(ds.Columns), int(ds.Rows)
    except (TypeError, ValueError) as err:
        reason = f"DICOM header has an invalid size or frame count ({err})"
        raise ImageReadError(path, reason) from err
    if frames > 1:
        raise ImageReadError(path, f"{frames} frames (multi-frame DICOM); expected a single X-ray")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric not in _PHOTOMETRICS:
        raise ImageReadError(path, f"photometric interpretation {photometric} is not read; "
                                   "expected a grayscale radiograph")
    if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
        raise ImageReadError(path, f"refused: too many pixels for an X-ray ({width}x{height})")
    _check_shape(path, width, height)


def _read_dicom(path: Path, pixels: bool = True, accept_any_modality: bool = False,
                opener: Opener | None = None):
    """The pydicom dataset (of the file `path`, or what `opener` gives): a chest radiograph by
    its tags (unless accept_any_modality), its header checked like an image's."""
    from pydicom.errors import InvalidDicomError

    opener = opener or (lambda: path.open("rb"))
    try:
        ds = _dcmread(path, opener, pixels)
    except (InvalidDicomError, OSError, ValueError, EOFError) as err:
        raise _dicom_format_error(path, opener, err) from err
    _set_missing_transfer_syntax(ds)
    if not accept_any_modality:
        _check_chest_radiograph(path, ds)
    _check_dicom_header(path, ds, pixels)
    return ds


def _dicom_pixels(path: Path, ds) -> np.ndarray:
    """The stored pixels of one frame as (H, W). A colour frame (RGB, or YBR that pydicom turned
    into RGB) is a grayscale radiograph when its three channels are equal, and refused otherwise."""
    from pydicom.uid import JPEGExtended12Bit

    try:
        arr = ds.pixel_array
    except Exception as err:  # compressed transfer syntax without a decoder, bad length...
        reason = f"cannot decode DICOM pixel data ({' '.join(str(err).split())})"
        if ds.file_meta.get("TransferSyntaxUID") == JPEGExtended12Bit:
            reason += "; 12-bit JPEG Extended needs the optional extra pneumonia[gpl-decoders]"
        raise ImageReadError(path, reason) from err
    colour = ds.get("PhotometricInterpretation") in _COLOUR_PHOTOMETRICS
    if colour and arr.ndim == 3 and arr.shape[-1] == 3:
        if not (arr == arr[..., :1]).all():
            raise ImageReadError(path, "colour image (RGB with differing channels); "
                                       "expected a grayscale radiograph")
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise ImageReadError(path, f"expected one grayscale frame, got pixel array of shape "
                                   f"{arr.shape}")
    return arr


def read_dicom(path: Path | str, accept_any_modality: bool = False) -> np.ndarray:
    """DICOM to (H, W) uint8: modality LUT, then the file's own window (VOI LUT) when it has one,
    else the WINDOW_PERCENTILES window; MONOCHROME1 inverted.

    Refuses, with NotChestRadiograph, what is not a chest radiograph by its tags, unless
    accept_any_modality (the caller then labels its report). Only pixels leave this function:
    no patient identifier reaches any output.
    """
    path = Path(path)
    _require_regular_file(path)
    return _dicom_to_uint8(path, _read_dicom(path, accept_any_modality=accept_any_modality))


def _dicom_to_uint8(path: Path, ds) -> np.ndarray:
    """A checked dataset's one frame as (H, W) uint8 (read_dicom's docstring says how)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    arr = _dicom_pixels(path, ds)
    # the file's own window: centre and width, or a VOI LUT
    windowed = ("WindowCenter" in ds and "WindowWidth" in ds) or "VOILUTSequence" in ds
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


def read_grayscale(path: Path | str, accept_any_modality: bool = False) -> np.ndarray:
    """Decode an X-ray file into an (H, W) uint8 array.

    JPEG and PNG (8 or 16 bit; grayscale, RGB, RGBA or CMYK, colour converted to luminance)
    and DICOM (.dcm). 8-bit pixels are kept as they are; deeper ones without a window of their
    own map their WINDOW_PERCENTILES to black and white. Refuses what image_size refuses.
    accept_any_modality skips the DICOM chest-radiograph gate (JPEG and PNG carry no tags).
    """
    path = Path(path)
    _require_regular_file(path)
    if path.suffix.lower() == ".dcm":
        return _dicom_to_uint8(path, _read_dicom(path, accept_any_modality=accept_any_modality))
    return _decode_image(path)


def _decode_image(path: Path, source: BinaryIO | None = None,
                  expected: tuple[str, ...] | None = None) -> np.ndarray:
    """A JPEG or PNG (from `source`, else the file `path`) as (H, W) uint8, its header checked
    first; colour becomes luminance, deep pixels are windowed."""
    try:
        with _open_image(path, source) as img:
            _check_header(path, img, expected)
            img.load()
            if img.mode in _DEEP_MODES:
                return window_to_uint8(np.asarray(img))
            return np.asarray(img.convert("L"), dtype=np.uint8)
    except ImageReadError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        error = _unreadable if source is None else ImageReadError  # only a file can be looked at
        raise error(path, f"cannot decode image ({err})") from err


def decode_grayscale(data: bytes) -> np.ndarray:
    """`read_grayscale` for a file's bytes (a request's image): JPEG, PNG or DICOM recognised by
    content, checked and decoded the same way (DICOM must be a chest radiograph), with nothing
    written to disk. Errors name the source `image`."""
    name = Path("image")
    if _dicom_header(data):
        return _dicom_to_uint8(name, _read_dicom(name, opener=lambda: io.BytesIO(data)))
    if not data.startswith(_IMAGE_SIGNATURES):
        raise ImageReadError(name, "not a JPEG, PNG or DICOM file (unrecognised content)")
    return _decode_image(name, io.BytesIO(data), ("JPEG", "MPO", "PNG"))


def _walk(folder: Path, root: Path, files: list[Path], problems: list[ImageReadError]) -> None:
    """Sorts every visible entry under folder into `files` and `problems`, entering real folders
    (not folders behind symbolic links). A folder that cannot be listed becomes a problem."""
    try:
        with os.scandir(folder) as it:
            entries = [e for e in it if not e.name.startswith(".")]
    except OSError as err:
        problems.append(ImageReadError(folder, f"cannot list folder ({err.strerror})"))
        return
    for entry in entries:
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            _walk(path, root, files, problems)
        elif (reason := _entry_problem(path, root)) is None:
            files.append(path)
        else:
            problems.append(ImageReadError(path, reason))


def _entry_problem(path: Path, root: Path) -> str | None:
    """Why an entry is not read, or None for a regular file or a link to one inside root."""
    try:
        mode = path.lstat().st_mode
    except OSError as err:
        return f"cannot inspect ({err.strerror})"
    if not stat.S_ISLNK(mode):
        return None if stat.S_ISREG(mode) else f"{_file_kind(mode)}, not an image file; not read"
    try:
        target = path.resolve(strict=True)
        target_mode = target.stat().st_mode
    except (OSError, RuntimeError):  # RuntimeError: a loop of links
        return "broken symbolic link (its target does not exist); not followed"
    if not stat.S_ISREG(target_mode):
        return f"symbolic link to {_file_kind(target_mode)}; not followed"
    if not target.is_relative_to(root):
        return "symbolic link to a file outside the input folder; not followed"
    return None


def scan_inputs(folder: Path) -> tuple[list[Path], list[ImageReadError]]:
    """The files to read under an input folder, and the entries that are not read, with why.

    Looks at every visible entry (no part of its path starts with '.'), sorted. Regular files
    and symbolic links to a regular file inside the folder are returned as files (whatever
    their suffix: the reader reports non-images). Links that leave the folder, broken links,
    links to folders, FIFOs, sockets and device files become problems; none is opened.
    Raises FileNotFoundError when the folder does not exist or is not a folder.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise MissingInputError(f"input={display_name(folder)} does not exist or is not a folder")
    files: list[Path] = []
    problems: list[ImageReadError] = []
    _walk(folder, folder.resolve(), files, problems)
    problems.sort(key=lambda err: err.path)
    return sorted(files), problems
