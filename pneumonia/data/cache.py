"""A preprocessed-image cache: decode, crop and resize each image once, then memory-map it.

Each split's images are stored as one uint8 array (N, S, S) in `<cache_dir>/<key>.u8`, with
`<key>.json` beside it. The key hashes the data files (path, size, modification time) and
the preprocessing settings, so any change makes a new cache; the JSON holds a checksum of
the array, so a damaged file is detected and rebuilt, never used. The feature cache
(`pneumonia.data.features`) stores its arrays through the same `cached_array`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from tqdm import tqdm

from pneumonia.data.kermany import Record, unreadable_error
from pneumonia.data.transforms import Preprocessing, ProportionalCrop
from pneumonia.errors import ImageReadError
from pneumonia.io import read_grayscale

log = logging.getLogger(__name__)
VERSION = 1
# JPEG draft mode decodes at 1/2, 1/4 or 1/8 scale in the DCT; the image is still at least
# twice the target size before the final resize, so the result stays close to a full decode.
DRAFT_MARGIN = 2.0
# Space a cache leaves free on its disk, for the logs, checkpoints and other programs there.
FREE_MARGIN = 256 * 2**20
_DISK_ADVICE = "free some space, point paths.cache_dir at a larger disk, or set data.cache=false"


def decode_preprocessed(path: Path, pre: Preprocessing) -> np.ndarray:
    """The (S, S) uint8 image `pre` would give, decoding JPEGs at reduced size where exact
    enough."""
    if path.suffix.lower() not in (".jpeg", ".jpg"):
        return pre(read_grayscale(path))
    try:
        with Image.open(path) as img:
            width, height = img.size
            box = (ProportionalCrop(**pre.crop).crop_box(width, height) if pre.crop
                   else (0, 0, width, height))
            scale = DRAFT_MARGIN * pre.image_size / min(box[2] - box[0], box[3] - box[1])
            if scale < 1:
                img.draft("L", (math.ceil(width * scale), math.ceil(height * scale)))
            img = img.convert("L")
            sx, sy = img.width / width, img.height / height
            scaled = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
            out = img.resize((pre.image_size, pre.image_size), Image.BILINEAR, box=scaled)
            return np.asarray(out, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError) as err:  # a sound header over broken pixel data
        raise ImageReadError(path, f"cannot decode image ({err})") from err


def cache_key(records: list[Record], pre: Preprocessing) -> str:
    digest = hashlib.sha256(json.dumps({"version": VERSION, "pre": pre.to_dict()},
                                       sort_keys=True).encode())
    for r in records:
        stat = r.path.stat()
        digest.update(f"{r.path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def _checksum(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=16)).hexdigest()


def _valid(array_file: Path, meta_file: Path, shape: tuple[int, ...], nbytes: int) -> bool:
    try:  # a missing file is an OSError too
        meta = json.loads(meta_file.read_text())
        size = array_file.stat().st_size
    except (OSError, ValueError):
        return False
    return (size == nbytes and meta.get("shape") == list(shape)
            and meta.get("checksum") == _checksum(array_file))


def _check_free_space(folder: Path, nbytes: int) -> None:
    """Refuses a cache that would not fit with FREE_MARGIN to spare, before anything is written:
    reserving it would take the disk's last free bytes (a huge model.input_size asks terabytes)."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if nbytes + FREE_MARGIN > free:
        raise OSError(errno.ENOSPC, f"the cache in {folder} needs {nbytes:,} bytes (and "
                      f"{FREE_MARGIN:,} left free) but its disk has {free:,} bytes free: "
                      + _DISK_ADVICE)


def _reserve(path: Path, nbytes: int) -> None:
    """Allocate the file's blocks now, so a full disk is a clear error here and not a bus
    error (SIGBUS, which kills the process) at the first write into the memory map."""
    with path.open("wb") as f:
        try:
            if hasattr(os, "posix_fallocate") and nbytes > 0:  # not on macOS
                os.posix_fallocate(f.fileno(), 0, nbytes)
            else:
                f.truncate(nbytes)
        except OSError as err:
            free = shutil.disk_usage(path.parent).free
            raise OSError(err.errno, f"cannot reserve {nbytes:,} bytes for the cache file {path} "
                          f"({free:,} bytes free on that disk; {err.strerror}): "
                          + _DISK_ADVICE) from err


def cached_array(array_file: Path, shape: tuple[int, ...], dtype, fill: Callable[[np.memmap], None],
                 meta: dict) -> np.memmap:
    """A read-only memory map of `array_file`, first built by `fill` unless a valid one exists.

    Valid means: the JSON beside it (same name, `.json`) records this shape and the file's
    checksum. Building writes a temporary file and moves it into place, so a killed build
    never leaves a file that looks valid. `meta` is stored in the JSON for people to read.
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    meta_file = array_file.with_suffix(".json")
    if not _valid(array_file, meta_file, shape, nbytes):
        if array_file.exists():
            log.warning("Cache %s is damaged or incomplete: rebuilding it", array_file)
        _check_free_space(array_file.parent, nbytes)
        array_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = array_file.with_suffix(f".tmp{os.getpid()}")
        try:
            _reserve(tmp, nbytes)
            out = np.memmap(tmp, dtype=dtype, mode="r+", shape=shape)
            fill(out)
            out.flush()
            del out
            meta = {"shape": list(shape), "dtype": dtype.name, "checksum": _checksum(tmp), **meta}
            tmp.replace(array_file)
            meta_file.write_text(json.dumps(meta))
        finally:
            tmp.unlink(missing_ok=True)
    return np.memmap(array_file, dtype=dtype, mode="r", shape=shape)


def build_cache(records: list[Record], pre: Preprocessing, cache_dir: Path, workers: int = 0,
                desc: str = "caching") -> np.memmap:
    """The split's preprocessed images, built now if no valid cache exists (in parallel)."""
    if not records:
        return np.zeros((0, pre.image_size, pre.image_size), np.uint8)
    workers = workers or min(8, os.cpu_count() or 1)

    def fill(out: np.memmap) -> None:
        failed: list[ImageReadError] = []

        def work(i: int) -> None:
            try:
                out[i] = decode_preprocessed(records[i].path, pre)
            except ImageReadError as err:
                failed.append(err)

        # PIL releases the GIL while decoding and resizing, so threads run in parallel.
        with ThreadPoolExecutor(workers) as pool:
            list(tqdm(pool.map(work, range(len(records))), total=len(records), desc=desc,
                      unit="image", leave=False))
        if failed:  # all of them at once, before the first epoch
            raise unreadable_error(records[0].path.parents[2], sorted(failed, key=str),
                                   "undecodable")

    return cached_array(cache_dir / f"{cache_key(records, pre)}.u8",
                        (len(records), pre.image_size, pre.image_size), np.uint8, fill,
                        {"images": len(records), "preprocessing": pre.to_dict(),
                         "version": VERSION})
