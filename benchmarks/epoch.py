"""One training epoch on the CPU: decoding every epoch vs the preprocessed cache, or, with
`--frozen`, a frozen backbone (study B's setup) on the preprocessed cache vs the feature cache.

python -m benchmarks.epoch [--root ../shared/data/kermany224] [--model resnet18] [--size 128]
python -m benchmarks.epoch --frozen [--model mobilenetv3_large_100] [--size 224] [--limit 20]

Reports the epoch's wall time, images per second and the share of it the training loop
spent waiting for the next batch. Caches are built before the timed epoch (their one-off
build time is printed); both runs use the same loader workers, batch size and model.
Default: a network trained from scratch with flip + brightness/contrast, augmented per
image in the loader. `--frozen`: adapter none, frozen features, study B's deep head, no
augmentation; the feature cache then runs only the head on stored features.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import SHARED_DATA, header
from pneumonia.data import KermanyDataModule
from pneumonia.data.features import FrozenFeatures
from pneumonia.models import build_network

AUGMENT = {"hflip": 0.5, "brightness": [-0.1, 0.1], "contrast": [0.0, 0.1]}
MEAN, STD = 0.45, 0.23


def epoch(dm: KermanyDataModule, net, limit: int | None) -> tuple[float, float, int]:
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    forward = net.classify if dm.feature_cache else net
    net.train()
    wait = 0.0
    count = 0
    start = tick = time.perf_counter()
    for i, (inputs, targets) in enumerate(dm.train_dataloader()):
        wait += time.perf_counter() - tick
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(forward(inputs), targets).backward()
        optimizer.step()
        count += len(inputs)
        tick = time.perf_counter()
        if limit and i + 1 >= limit:
            break
    total = time.perf_counter() - start
    return total, wait / total, count


def variants(args) -> tuple[dict, list[tuple[str, dict]]]:
    """The data module settings shared by both runs, and each run's own."""
    common = dict(root=args.root, stage="binary", image_size=args.size, mean=MEAN, std=STD,
                  crop={"enabled": True}, batch_size=args.batch, num_workers=args.workers)
    cache = {"cache": True, "cache_dir": args.cache_dir}
    if args.frozen:
        return common, [("preprocessed cache", cache),
                        ("feature cache", {**cache, "feature_cache": True})]
    common["augment"] = AUGMENT
    return common, [("decode every epoch", {}), ("preprocessed cache", cache)]


def network(args):
    torch.manual_seed(0)
    if args.frozen:
        return build_network(args.model, adapter="none", head="deep_mlp", freeze="features",
                             input_size=args.size)
    return build_network(args.model, input_size=args.size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=SHARED_DATA / "kermany224")
    parser.add_argument("--model", default=None,
                        help="default resnet18; with --frozen mobilenetv3_large_100")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None, help="stop after this many batches")
    parser.add_argument("--frozen", action="store_true",
                        help="frozen backbone: preprocessed cache vs feature cache")
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/pneumonia-bench/cache/epoch"))
    args = parser.parse_args()
    args.model = args.model or ("mobilenetv3_large_100" if args.frozen else "resnet18")
    kind = "frozen, deep head" if args.frozen else "from scratch"
    header(f"{args.model} {kind} at {args.size}px, batch {args.batch}, {args.workers} workers")
    common, runs = variants(args)
    results = {}
    for name, extra in runs:
        dm = KermanyDataModule(**common, **extra)
        net = network(args)
        if dm.feature_cache:
            dm.use_features(FrozenFeatures(net, MEAN, STD, args.batch))
        start = time.perf_counter()
        dm.prepare_data()
        if extra:
            print(f"{name} build (once, all splits): {time.perf_counter() - start:.1f} s")
        results[name] = epoch(dm, net, args.limit)
    first = next(iter(results.values()))
    base = first[2] / first[0]
    for name, (seconds, waiting, count) in results.items():
        rate = count / seconds
        print(f"  {name:<20} {seconds:7.1f} s for {count} images  {rate:6.1f} images/s  "
              f"{rate / base:4.2f}x  waiting for data {100 * waiting:4.1f} %")


if __name__ == "__main__":
    main()
