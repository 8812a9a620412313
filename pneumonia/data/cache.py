"""A preprocessed-image cache: decode, crop and resize each image once, then memory-map it.

Each split's images are stored as one uint8 array (N, S, S) in `<cache_dir>/<key>.u8`, with
`<key>.json` beside it. The key hashes the data files (path, size, modification time) and
the preprocessing settings, so any change makes a new cache; the JSON holds a checksum of
the array, so a damaged file is detected and rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from pneumonia.data.kermany import Record
from pneumonia.data.transforms import Preprocessing, ProportionalCrop
from pneumonia.io import read_grayscale

log = logging.getLogger(__name__)
VERSION = 1
# JPEG draft mode decodes at 1/2, 1/4 or 1/8 scale in the DCT; the image is still at least
# twice the target size before the final resize, so the result stays close to a full decode.
DRAFT_MARGIN = 2.0


def decode_preprocessed(path: Path, pre: Preprocessing, draft: bool = True) -> np.ndarray:
    """The (S, S) uint8 image `pre` would give, decoding JPEGs at reduced size where exact enough."""
    if not draft or path.suffix.lower() not in (".jpeg", ".jpg"):
        return pre(read_grayscale(path))
    with Image.open(path) as img:
        width, height = img.size
        box = ProportionalCrop(**pre.crop).crop_box(width, height) if pre.crop else (0, 0, width, height)
        scale = DRAFT_MARGIN * pre.image_size / min(box[2] - box[0], box[3] - box[1])
        if scale < 1:
            img.draft("L", (math.ceil(width * scale), math.ceil(height * scale)))
        img = img.convert("L")
        sx, sy = img.width / width, img.height / height
        scaled = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
        out = img.resize((pre.image_size, pre.image_size), Image.BILINEAR, box=scaled)
        return pre.finish(np.asarray(out, dtype=np.uint8))


def cache_key(records: list[Record], pre: Preprocessing) -> str:
    digest = hashlib.sha256(json.dumps({"version": VERSION, "pre": pre.to_dict()}, sort_keys=True).encode())
    for r in records:
        stat = r.path.stat()
        digest.update(f"{r.path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def _checksum(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _valid(array_file: Path, meta_file: Path, shape: tuple[int, ...]) -> bool:
    if not (array_file.is_file() and meta_file.is_file()):
        return False
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError):
        return False
    if array_file.stat().st_size != int(np.prod(shape)) or meta.get("shape") != list(shape):
        return False
    return meta.get("checksum") == _checksum(array_file)


def build_cache(records: list[Record], pre: Preprocessing, cache_dir: Path, workers: int = 0,
                desc: str = "caching") -> np.memmap:
    """The split's preprocessed images, built now if no valid cache exists (in parallel)."""
    if not records:
        return np.zeros((0, pre.image_size, pre.image_size), np.uint8)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = cache_key(records, pre)
    array_file, meta_file = cache_dir / f"{key}.u8", cache_dir / f"{key}.json"
    shape = (len(records), pre.image_size, pre.image_size)
    if not _valid(array_file, meta_file, shape):
        if array_file.exists():
            log.warning("Cache %s is damaged or incomplete: rebuilding it", array_file)
        tmp = array_file.with_suffix(f".tmp{os.getpid()}")
        out = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=shape)
        workers = workers or min(8, os.cpu_count() or 1)

        def work(i: int) -> None:
            out[i] = decode_preprocessed(records[i].path, pre)

        try:
            # PIL releases the GIL while decoding and resizing, so threads run in parallel.
            with ThreadPoolExecutor(workers) as pool:
                list(tqdm(pool.map(work, range(len(records))), total=len(records), desc=desc,
                          unit="image", leave=False))
            out.flush()
            del out
            meta = {"shape": list(shape), "checksum": _checksum(tmp), "images": len(records),
                    "preprocessing": pre.to_dict(), "version": VERSION}
            tmp.replace(array_file)
            meta_file.write_text(json.dumps(meta))
        finally:
            tmp.unlink(missing_ok=True)
    return np.memmap(array_file, dtype=np.uint8, mode="r", shape=shape)
