"""Training-step throughput for a frozen backbone: plain graph vs the frozen-feature fast path.

python -m benchmarks.train_step [--models mobilenetv3_large_100 vgg16] [--size 224] [--batch 16]

adapter none + freeze features: nothing before the frozen layers trains, so the fast path
runs them without an autograd graph and backward covers only the classifier. "plain"
is the same network with the fast path switched off. Images per second of forward +
backward + optimizer step, best of `--repeat` timed rounds after a warm-up, one process.
(The optional per-image feature cache of issue 6 is not built yet: no row for it.)
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from benchmarks.common import header, print_rows
from pneumonia.models import build_network


def images_per_second(net, images, targets, steps: int, repeat: int) -> float:
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-3)
    net.train()

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(net(images), targets).backward()
        optimizer.step()

    step()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        best = min(best, time.perf_counter() - start)
    return steps * len(images) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mobilenetv3_large_100", "vgg16"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="also time bf16 autocast and channels_last")
    args = parser.parse_args()
    header(f"input {args.size}, batch {args.batch}, device {args.device}")
    torch.manual_seed(0)
    for name in args.models:
        net = build_network(name, adapter="none", head="linear", freeze="features",
                            input_size=args.size).to(args.device)
        images = torch.randn(args.batch, 1, args.size, args.size, device=args.device)
        targets = torch.randint(0, 2, (args.batch,), device=args.device)
        rows = []
        net.frozen_features = False
        rows.append(("plain (graph through frozen layers)", images_per_second(net, images, targets, args.steps, args.repeat)))
        net.frozen_features = True
        rows.append(("fast path (no graph in frozen part)", images_per_second(net, images, targets, args.steps, args.repeat)))
        if args.bf16:
            device_type = "cuda" if args.device.startswith("cuda") else "cpu"
            with torch.autocast(device_type, dtype=torch.bfloat16):
                rows.append(("fast path + bf16 autocast", images_per_second(net, images, targets, args.steps, args.repeat)))
            net_cl = net.to(memory_format=torch.channels_last)
            images_cl = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type, dtype=torch.bfloat16):
                rows.append(("fast path + bf16 + channels_last",
                             images_per_second(net_cl, images_cl, targets, args.steps, args.repeat)))
        print_rows(name, rows, "images/s", higher_is_better=True)


if __name__ == "__main__":
    main()
