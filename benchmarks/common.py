"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pneumonia.hardware import cpu_description

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def header(settings: str) -> None:
    print(f"command: {' '.join(sys.argv)}")
    print(f"machine: {platform.machine()} {cpu_description()}, {torch.get_num_threads()} torch "
          f"threads, torch {torch.__version__}; {settings}")


def full_size_set(source: Path, dest: Path, count: int, seed: int = 0) -> Path:
    """`count` realistic full-size JPEGs (Kermany-layout) made by upscaling 224 px X-rays.

    Sizes follow the original data set: widths about 900-2,900 px, width/height about 1.1-1.7,
    grayscale, JPEG quality 90, with mild sensor-like noise so the files compress (and decode)
    like real radiographs rather than like smooth upscaled images. Reused if already made.
    """
    if (dest / ".complete").is_file():
        return dest
    rng = np.random.default_rng(seed)
    sources = sorted((source / "train" / "NORMAL").glob("*.jpeg"))[: count // 2] + \
        sorted((source / "train" / "PNEUMONIA").glob("*.jpeg"))[: count - count // 2]
    for path in sources:
        width = int(rng.uniform(900, 2900))
        height = int(width / rng.uniform(1.1, 1.7))
        image = Image.open(path).convert("L").resize((width, height), Image.BICUBIC)
        noisy = np.asarray(image, np.float32) + rng.normal(0, 4, (height, width))
        image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
        out = dest / "train" / path.parent.name / path.name
        out.parent.mkdir(parents=True, exist_ok=True)
        image.save(out, quality=90)
    (dest / ".complete").write_text("")
    return dest


def throughput(loader, seconds_limit: float = 1e9, step=None) -> tuple[float, int]:
    """Images per second over one pass of the loader (optionally applying `step` to each batch)."""
    count, start = 0, time.perf_counter()
    for images, _ in loader:
        if step is not None:
            step(images)
        count += len(images)
        if time.perf_counter() - start > seconds_limit:
            break
    return count / (time.perf_counter() - start), count


def print_rows(title: str, rows: list[tuple[str, float]], unit: str,
               higher_is_better: bool) -> None:
    """A table of timings with each row's speed-up over the first one."""
    base = rows[0][1]
    print(f"\n{title}")
    for label, value in rows:
        ratio = value / base if higher_is_better else base / value
        print(f"  {label:<42} {value:9.2f} {unit}   {ratio:5.2f}x")
