"""Seconds per image for one occlusion heatmap at 224x224 (15x15 window, stride 10).

python -m benchmarks.occlusion_speed [--models mobilenetv3_large_100 vgg16] [--images 4]

Compares, in one process on the same machine:
  study A      one occluded image per forward pass (Captum perturbations_per_eval=1)
  captum x16   Captum batching 16 occluded copies of an image per forward pass
  then several images per call, 64 copies per pass, channels_last (explain.py's default),
  and bf16 autocast (explain.py precision=bf16).
Ratios are against "study A" measured here. For large backbones the study-A row is
estimated from timed batch-1 forward passes times the number of passes it needs (442),
which is its cost up to Captum's small per-pass overhead; the row says so.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from benchmarks.common import header, print_rows
from pneumonia.attribution import occlusion_map
from pneumonia.models import build_network

SIZE, WINDOW, STRIDE = 224, 15, 10
PASSES = ((SIZE - WINDOW) // STRIDE + 1) ** 2 + 1  # 441 occluded images + the unoccluded one


def seconds_per_image(net, images, ppe: int, repeat: int = 1) -> float:
    target = torch.ones(len(images), dtype=torch.long)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        occlusion_map(net, images, target, WINDOW, STRIDE, 0.0, ppe)
        best = min(best, time.perf_counter() - start)
    return best / len(images)


def estimated_one_per_pass(net, image, samples: int = 30) -> float:
    with torch.inference_mode():
        net(image)  # warm-up
        start = time.perf_counter()
        for _ in range(samples):
            net(image).softmax(1)
        return (time.perf_counter() - start) / samples * PASSES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mobilenetv3_large_100", "vgg16"])
    parser.add_argument("--images", type=int, default=4, help="images per call on the multi-image row")
    parser.add_argument("--exact-below", type=float, default=30.0,
                        help="measure study A exactly when its estimate is below this many seconds")
    args = parser.parse_args()
    header(f"{SIZE}x{SIZE}, window {WINDOW}, stride {STRIDE}, {PASSES - 1} occluded images per heatmap")
    torch.manual_seed(0)
    for name in args.models:
        net = build_network(name, adapter="none", head="linear", input_size=SIZE).eval()
        images = torch.randn(args.images, 1, SIZE, SIZE)
        rows = []
        estimate = estimated_one_per_pass(net, images[:1])
        if estimate < args.exact_below:
            rows.append(("study A: 1 per pass", seconds_per_image(net, images[:1], 1)))
        else:
            rows.append(("study A: 1 per pass (estimated)", estimate))
        rows.append(("captum x16, 1 image", seconds_per_image(net, images[:1], 16)))
        rows.append((f"captum x16, {args.images} images per call", seconds_per_image(net, images, 16)))
        rows.append(("captum x64, 1 image", seconds_per_image(net, images[:1], 64)))
        net_cl = copy.deepcopy(net).to(memory_format=torch.channels_last)
        one_cl = images[:1].contiguous(memory_format=torch.channels_last)
        rows.append(("default: x16, 1 image, channels_last", seconds_per_image(net_cl, one_cl, 16)))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rows.append(("bf16 autocast (fp32 layout)", seconds_per_image(net, images[:1], 16)))
            rows.append(("precision=bf16: + channels_last", seconds_per_image(net_cl, one_cl, 16)))
        print_rows(name, rows, "s/image", higher_is_better=False)


if __name__ == "__main__":
    main()
