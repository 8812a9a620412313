"""Training-step throughput for a frozen backbone: plain graph, frozen-feature fast path, \
feature cache.

python -m benchmarks.train_step [--models mobilenetv3_large_100 vgg16] [--size 224] [--batch 16]

adapter none + freeze features: nothing before the frozen layers trains, so the fast path
runs them without an autograd graph and backward covers only the classifier. "plain"
is the same network with the fast path switched off. "feature cache" (data.feature_cache=true)
runs only the head: each step reads the batch's stored features (float32, from a
memory-mapped file in a temporary folder) and runs forward + backward + step of the head.
Building that cache (one forward pass of the frozen part per training image, once) is
printed below each table.
Images per second of forward + backward + optimizer step, best of `--repeat` timed rounds
after a warm-up, one process.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import header, print_rows
from pneumonia.data.features import build_feature_cache
from pneumonia.models import build_network


def images_per_second(net, forward, inputs, targets, steps: int, repeat: int) -> float:
    """Throughput of optimizer steps on `forward(inputs)` (the whole net, or only its head)."""
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-3)
    net.train()

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(forward(inputs), targets).backward()
        optimizer.step()

    step()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        best = min(best, time.perf_counter() - start)
    return steps * len(targets) / best


def feature_cache_rows(net, images: torch.Tensor, targets, args) -> tuple[list, float]:
    """The head-only row on features read from a memory-mapped cache, and the build speed."""
    pixels = (images * 40 + 120).clamp(0, 255).to(torch.uint8)[:, 0].cpu().numpy()
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        cache = build_feature_cache(pixels, "benchmark", net, 0.45, 0.22, cache_dir=Path(folder),
                                    batch_size=len(pixels), device=args.device)
        build = len(pixels) / (time.perf_counter() - start)

        def head_on_cache(_):
            return net.classify(torch.from_numpy(np.array(cache)).to(args.device))

        speed = images_per_second(net, head_on_cache, None, targets, args.steps, args.repeat)
    return [("feature cache (head only, stored features)", speed)], build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mobilenetv3_large_100", "vgg16"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true",
                        help="also time bf16 autocast and channels_last")
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
        rows.append(("plain (graph through frozen layers)",
                     images_per_second(net, net, images, targets, args.steps, args.repeat)))
        net.frozen_features = True
        rows.append(("fast path (no graph in frozen part)",
                     images_per_second(net, net, images, targets, args.steps, args.repeat)))
        cache_rows, build = feature_cache_rows(net, images, targets, args)
        rows += cache_rows
        if args.bf16:
            device_type = "cuda" if args.device.startswith("cuda") else "cpu"
            with torch.autocast(device_type, dtype=torch.bfloat16):
                rows.append(("fast path + bf16 autocast",
                             images_per_second(net, net, images, targets, args.steps, args.repeat)))
            net_cl = net.to(memory_format=torch.channels_last)
            images_cl = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type, dtype=torch.bfloat16):
                rows.append(("fast path + bf16 + channels_last",
                             images_per_second(net_cl, net_cl, images_cl, targets, args.steps,
                                               args.repeat)))
        print_rows(name, rows, "images/s", higher_is_better=True)
        print(f"  (feature cache built once at {build:.2f} images/s, eval mode)")


if __name__ == "__main__":
    main()
