"""One training epoch of a small backbone on the CPU: decode every epoch vs preprocessed cache.

python -m benchmarks.epoch [--root ../shared/data/kermany224] [--model resnet18] [--size 128]

Reports the epoch's wall time, images per second and the share of it the training loop
spent waiting for the next batch. The cache is built before the timed epoch (its one-off
build time is printed); both runs use the same loader workers, batch size and model.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import SHARED_DATA, header
from pneumonia.data import KermanyDataModule
from pneumonia.data.transforms import batch_augment
from pneumonia.models import build_network

AUGMENT = {"hflip": 0.5, "brightness": [-0.1, 0.1], "contrast": [0.0, 0.1]}
MEAN, STD = 0.45, 0.23


def epoch(dm: KermanyDataModule, net, limit: int | None) -> tuple[float, float, int]:
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net.train()
    wait = 0.0
    count = 0
    start = tick = time.perf_counter()
    for i, (images, targets) in enumerate(dm.train_dataloader()):
        wait += time.perf_counter() - tick
        if images.dtype == torch.uint8:  # cached: augment and normalise the batch, as the module does
            images = (batch_augment(images.float() / 255, **AUGMENT) - MEAN) / STD
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(net(images), targets).backward()
        optimizer.step()
        count += len(images)
        tick = time.perf_counter()
        if limit and i + 1 >= limit:
            break
    total = time.perf_counter() - start
    return total, wait / total, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=SHARED_DATA / "kermany224")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None, help="stop after this many batches")
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/pneumonia-bench/cache/epoch"))
    args = parser.parse_args()
    header(f"{args.model} from scratch at {args.size}px, batch {args.batch}, {args.workers} workers")
    common = dict(root=args.root, stage="binary", image_size=args.size, mean=MEAN, std=STD,
                  crop={"enabled": True}, augment=AUGMENT, batch_size=args.batch, num_workers=args.workers)
    results = {}
    for name, extra in (("decode every epoch", {}), ("preprocessed cache", {"cache": True, "cache_dir": args.cache_dir})):
        dm = KermanyDataModule(**common, **extra)
        start = time.perf_counter()
        dm.prepare_data()
        if extra:
            print(f"cache build (once): {time.perf_counter() - start:.1f} s")
        torch.manual_seed(0)
        net = build_network(args.model, input_size=args.size)
        results[name] = epoch(dm, net, args.limit)
    base = results["decode every epoch"][2] / results["decode every epoch"][0]
    for name, (seconds, waiting, count) in results.items():
        rate = count / seconds
        print(f"  {name:<20} {seconds:7.1f} s for {count} images  {rate:6.1f} images/s  "
              f"{rate / base:4.2f}x  waiting for data {100 * waiting:4.1f} %")


if __name__ == "__main__":
    main()
