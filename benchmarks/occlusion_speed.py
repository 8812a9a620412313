"""Seconds per image for one occlusion heatmap at 224x224 (15x15 window, stride 10).

python -m benchmarks.occlusion_speed [--models mobilenetv3_large_100 vgg16] [--fraction 0.5]
python -m benchmarks.occlusion_speed --captum-rows [--images 4]
python -m benchmarks.occlusion_speed --models resnet18 --xrays 4   (approximation on real X-rays)

By default compares, for one random image, in one process (ratios against the first row):
  one copy per pass   study A: one occluded copy per forward pass (estimated from timed
                      batch-1 passes times the passes it needs)
  captum x16          Captum, 16 occluded copies per pass, contiguous layout
  default before      the same in channels_last (explain.py's default until incremental)
  incremental exact   pneumonia.occlusion (explain.py's default method), 64 copies per pass
                      (explain.py passes perturbations_per_eval, 16 by default)
  approximate         the same with regions capped at --fraction of each map's side,
                      with its largest difference and correlation against the exact map
and prints the engine's own count of multiply-accumulates per occluded copy against a full
pass, the ratio that bounds what recomputing less can gain.

--xrays N compares approximate with exact maps on N real X-rays (random-init weights).

--captum-rows compares, in one process on the same machine:
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

import numpy as np
import torch
from PIL import Image

from benchmarks.common import SHARED_DATA, header, print_rows
from pneumonia.attribution import occlusion_map
from pneumonia.models import build_network
from pneumonia.occlusion import Counter, incremental_occlusion_map, window_starts

SIZE, WINDOW, STRIDE = 224, 15, 10
PASSES = len(window_starts(SIZE, WINDOW, STRIDE)) ** 2 + 1  # 484 occluded copies (Captum) + 1


def seconds_per_image(net, images, ppe: int, repeat: int = 1, incremental: bool = False) -> float:
    target = torch.ones(len(images), dtype=torch.long)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        occlusion_map(net, images, target, WINDOW, STRIDE, 0.0, ppe, incremental=incremental)
        best = min(best, time.perf_counter() - start)
    return best / len(images)


def estimated_one_per_pass(net, image, samples: int = 30) -> float:
    with torch.inference_mode():
        net(image)  # warm-up
        start = time.perf_counter()
        for _ in range(samples):
            net(image).softmax(1)
        return (time.perf_counter() - start) / samples * PASSES


def timed_incremental(net, image, mode: str,
                      fraction: float) -> tuple[float, torch.Tensor, Counter]:
    """Seconds, map and multiply-accumulate count of one incremental map."""
    counter = Counter()
    start = time.perf_counter()
    heatmap = incremental_occlusion_map(net, image, torch.ones(1, dtype=torch.long), WINDOW, STRIDE,
                                        0.0, 64, mode, fraction, counter)
    return time.perf_counter() - start, heatmap, counter


def agreement(approx: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    """Largest absolute difference and Pearson correlation of two maps."""
    corr = torch.corrcoef(torch.stack([approx.flatten(), exact.flatten()]))[0, 1]
    return float((approx - exact).abs().max()), float(corr)


def incremental_rows(name: str, fraction: float) -> None:
    """One copy per pass, Captum x16, the channels_last default before, incremental exact and
    approximate."""
    net = build_network(name, adapter="none", head="linear", input_size=SIZE).eval()
    image = torch.randn(1, 1, SIZE, SIZE)
    rows = [("one copy per pass (estimated)", estimated_one_per_pass(net, image)),
            ("captum x16", seconds_per_image(net, image, 16))]
    net_cl = copy.deepcopy(net).to(memory_format=torch.channels_last)
    one_cl = image.contiguous(memory_format=torch.channels_last)
    rows.append(("default before: captum x16, channels_last",
                 seconds_per_image(net_cl, one_cl, 16)))
    seconds, exact, counter = timed_incremental(net, image, "exact", 1.0)
    rows.append(("incremental exact", seconds))
    seconds, approx, approx_counter = timed_incremental(net, image, "approximate", fraction)
    rows.append((f"approximate (fraction {fraction})", seconds))
    print_rows(name, rows, "s/image", higher_is_better=False)
    for label, c in (("exact", counter), ("approximate", approx_counter)):
        print(f"  MACs per occluded copy, {label}: {c.per_copy() / 1e9:.3f} G of a full pass's "
              f"{c.full_pass / 1e9:.3f} G: {c.full_pass / c.per_copy():.2f}x fewer")
    diff, corr = agreement(approx, exact)
    print(f"  approximate vs exact: max |diff| {diff:.4f}, correlation {corr:.4f}")


def xray_agreement(name: str, count: int, fraction: float) -> None:
    """Approximate against exact maps on real X-rays (224 px test images, random-init weights)."""
    folder = SHARED_DATA / "kermany224" / "test"
    paths = sorted(folder.glob("NORMAL/*.jpeg"))[: count // 2] + \
        sorted(folder.glob("PNEUMONIA/*.jpeg"))[: count - count // 2]
    net = build_network(name, pretrained=False, input_size=SIZE).eval()
    for path in paths:
        pixels = np.asarray(Image.open(path).convert("L").resize((SIZE, SIZE)), np.float32) / 255
        image = torch.from_numpy((pixels - 0.45) / 0.225)[None, None]
        exact_s, exact, _ = timed_incremental(net, image, "exact", 1.0)
        approx_s, approx, _ = timed_incremental(net, image, "approximate", fraction)
        diff, corr = agreement(approx, exact)
        print(f"  {path.parent.name}/{path.name}: exact {exact_s:.1f} s, "
              f"approximate {approx_s:.1f} s, "
              f"max |diff| {diff:.4f} (exact map's max |value| {float(exact.abs().max()):.4f}), "
              f"correlation {corr:.4f}")


def captum_rows(name: str, images_per_call: int, exact_below: float) -> None:
    """Study A and Captum's batching, layout and bf16 variants."""
    net = build_network(name, adapter="none", head="linear", input_size=SIZE).eval()
    images = torch.randn(images_per_call, 1, SIZE, SIZE)
    rows = []
    estimate = estimated_one_per_pass(net, images[:1])
    if estimate < exact_below:
        rows.append(("study A: 1 per pass", seconds_per_image(net, images[:1], 1)))
    else:
        rows.append(("study A: 1 per pass (estimated)", estimate))
    rows.append(("captum x16, 1 image", seconds_per_image(net, images[:1], 16)))
    rows.append((f"captum x16, {images_per_call} images per call",
                 seconds_per_image(net, images, 16)))
    rows.append(("captum x64, 1 image", seconds_per_image(net, images[:1], 64)))
    net_cl = copy.deepcopy(net).to(memory_format=torch.channels_last)
    one_cl = images[:1].contiguous(memory_format=torch.channels_last)
    rows.append(("default: x16, 1 image, channels_last", seconds_per_image(net_cl, one_cl, 16)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rows.append(("bf16 autocast (fp32 layout)", seconds_per_image(net, images[:1], 16)))
        rows.append(("precision=bf16: + channels_last", seconds_per_image(net_cl, one_cl, 16)))
    print_rows(name, rows, "s/image", higher_is_better=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mobilenetv3_large_100", "vgg16"])
    parser.add_argument("--fraction", type=float, default=0.5,
                        help="approximate mode: largest changed region, as a share of a map's side")
    parser.add_argument("--xrays", type=int, default=0,
                        help="approximate vs exact on N real X-rays")
    parser.add_argument("--captum-rows", action="store_true", help="the Captum variants instead")
    parser.add_argument("--images", type=int, default=4,
                        help="images per call on the multi-image row")
    parser.add_argument("--exact-below", type=float, default=30.0,
                        help="measure study A exactly when its estimate is below this many seconds")
    args = parser.parse_args()
    header(f"{SIZE}x{SIZE}, window {WINDOW}, stride {STRIDE}, "
           f"{PASSES - 1} occluded images per heatmap")
    torch.manual_seed(0)
    for name in args.models:
        if args.xrays:
            print(f"\n{name}, fraction {args.fraction}, random-init weights")
            xray_agreement(name, args.xrays, args.fraction)
        elif args.captum_rows:
            captum_rows(name, args.images, args.exact_below)
        else:
            incremental_rows(name, args.fraction)


if __name__ == "__main__":
    main()
