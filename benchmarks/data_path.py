"""Images per second delivered to the model: preprocessed cache vs decoding JPEGs every epoch.

python -m benchmarks.data_path [--full-size 300] [--workdir /tmp/pneumonia-bench]

Both paths deliver the same thing, a normalised, augmented (flip, brightness, contrast)
batch of (1, S, S) tensors, augmented per image in the dataset by the same albumentations
pipeline: the plain path decodes, crops and resizes each JPEG first; the cached path reads
the preprocessed uint8 image from the memory-mapped cache. Same loader settings for both.
The one-off cache build time is reported separately.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks.common import SHARED_DATA, full_size_set, header, throughput
from pneumonia.data import KermanyDataModule

AUGMENT = {"hflip": 0.5, "brightness": [-0.1, 0.1], "contrast": [0.0, 0.1]}


def measure(root: Path, size: int, cache_dir: Path, workers: int, batch: int) -> None:
    common = dict(root=root, stage="binary", image_size=size, mean=0.45, std=0.23, val_fraction=0.1,
                  crop={"enabled": True}, augment=AUGMENT, batch_size=batch, num_workers=workers)
    plain = KermanyDataModule(**common)
    cached = KermanyDataModule(**common, cache=True, cache_dir=cache_dir)
    start = time.perf_counter()
    cached.prepare_data()
    build = time.perf_counter() - start
    n = len(plain.splits["train"])
    plain_rate, _ = throughput(plain.train_dataloader())
    cached_rate, _ = throughput(cached.train_dataloader())
    print(f"\n{root} ({n} images) -> {size}x{size}, batch {batch}, {workers} loader workers")
    print(f"  decode every epoch: {plain_rate:8.1f} images/s")
    print(f"  preprocessed cache: {cached_rate:8.1f} images/s   {cached_rate / plain_rate:6.1f}x")
    print(f"  cache build (once): {build:8.1f} s ({n / build:.1f} images/s, threads)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full-size", type=int, default=300, help="full-size JPEGs to make")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/pneumonia-bench"))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--skip-224", action="store_true", help="only the full-size set")
    args = parser.parse_args()
    header(f"image size {args.size}, loader workers {args.workers}")
    full = full_size_set(SHARED_DATA / "kermany224", args.workdir / "fullsize", args.full_size)
    for root in [full] + ([] if args.skip_224 else [SHARED_DATA / "kermany224"]):
        cache_dir = args.workdir / "cache" / root.name
        measure(root, args.size, cache_dir, args.workers, args.batch)


if __name__ == "__main__":
    main()
