"""Seconds per image for one occlusion heatmap at 224x224 (15x15 window, stride 10).

python -m benchmarks.occlusion_speed [--models mobilenetv3_large_100 vgg16] [--refine 0.25]
    [--rounds 3]   (Captum x16 and incremental exact again, alternately: the ratio's spread)
python -m benchmarks.occlusion_speed --captum-rows [--images 4]
python -m benchmarks.occlusion_speed --xrays 10 --checkpoint <binary.ckpt> [--split val|test]
    [--refine 0.1 0.25]   (approximate vs exact maps on real X-rays)

By default compares, for one random image, in one process (ratios against the first row):
  one copy per pass   study A: one occluded copy per forward pass (estimated from timed
                      batch-1 passes times the passes it needs)
  captum x16          Captum, 16 occluded copies per pass, contiguous layout
  default before      the same in channels_last (explain.py's default until incremental)
  incremental exact   pneumonia.explain.occlusion (explain.py's default method), at explain.py's
                      default perturbations_per_eval copies per pass
  approximate         drill-down: a checkerboard of windows and the --refine share of the
                      rest (pneumonia.explain.occlusion.APPROXIMATE_REFINE), with its largest
                      difference and correlation against the exact map
and prints the engine's own count of multiply-accumulates per occluded copy against a full
pass, the ratio that bounds what recomputing less can gain.

--xrays N compares approximate with exact maps of a trained stage on N real X-rays of its
validation split (to choose the settings) or its test split (to report them), maps of the class
the stage predicts; random-init networks give maps of noise, useless for judging an approximation.

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
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from benchmarks.common import header, print_rows
from pneumonia.checkpoints import load_stage
from pneumonia.explain.attribution import occlusion_map
from pneumonia.explain.occlusion import (
    APPROXIMATE_REFINE,
    MIN_SAVING,
    Counter,
    incremental_occlusion_map,
    saves_work,
    window_starts,
)
from pneumonia.io import read_grayscale
from pneumonia.models import build_network
from pneumonia.pipeline import recorded_split, stage_inputs

SIZE, WINDOW, STRIDE = 224, 15, 10
PASSES = len(window_starts(SIZE, WINDOW, STRIDE)) ** 2 + 1  # 484 occluded copies (Captum) + 1
# the engine's copies per pass in explain.py, as conf/explain.yaml sets it
COPIES = OmegaConf.load(Path(__file__).parents[1] / "conf" / "explain.yaml").perturbations_per_eval


def timed_captum(net, images, ppe: int) -> tuple[float, torch.Tensor]:
    """Seconds per image of Captum's maps at `ppe` copies per pass, and the maps."""
    target = torch.ones(len(images), dtype=torch.long)
    with torch.inference_mode():  # warm-up at its batch size (a first call ran up to 1.6x slower)
        net(images[:1].expand(ppe, *images.shape[1:]))
    start = time.perf_counter()
    maps = occlusion_map(net, images, target, WINDOW, STRIDE, 0.0, ppe, incremental=False)
    return (time.perf_counter() - start) / len(images), maps


def seconds_per_image(net, images, ppe: int) -> float:
    return timed_captum(net, images, ppe)[0]


def estimated_one_per_pass(net, image, samples: int = 30) -> float:
    with torch.inference_mode():
        net(image)  # warm-up
        start = time.perf_counter()
        for _ in range(samples):
            net(image).softmax(1)
        return (time.perf_counter() - start) / samples * PASSES


def timed_incremental(net, image, mode: str, refine: float,
                      target: torch.Tensor | None = None) -> tuple[float, torch.Tensor, Counter]:
    """Seconds, map and multiply-accumulate count of one incremental map."""
    counter = Counter()
    target = torch.ones(1, dtype=torch.long) if target is None else target
    start = time.perf_counter()
    heatmap = incremental_occlusion_map(net, image, target, WINDOW, STRIDE, 0.0, COPIES, mode,
                                        refine, counter)
    return time.perf_counter() - start, heatmap, counter


def agreement(approx: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    """Largest absolute difference and Pearson correlation of two maps."""
    corr = torch.corrcoef(torch.stack([approx.flatten(), exact.flatten()]))[0, 1]
    return float((approx - exact).abs().max()), float(corr)


def incremental_rows(name: str, refine: float, rounds: int = 1) -> None:
    """One copy per pass, Captum x16, the channels_last default before, incremental exact and
    approximate; with rounds > 1, Captum x16 and incremental exact that many times, alternately."""
    net = build_network(name, adapter="none", head="linear", input_size=SIZE).eval()
    image = torch.randn(1, 1, SIZE, SIZE)
    rows = [("one copy per pass (estimated)", estimated_one_per_pass(net, image))]
    captum, captum_map = timed_captum(net, image, 16)
    rows.append(("captum x16", captum))
    net_cl = copy.deepcopy(net).to(memory_format=torch.channels_last)
    one_cl = image.contiguous(memory_format=torch.channels_last)
    rows.append(("default before: captum x16, channels_last",
                 seconds_per_image(net_cl, one_cl, 16)))
    exact_seconds, exact, counter = timed_incremental(net, image, "exact", 1.0)
    rows.append(("incremental exact", exact_seconds))
    seconds, approx, approx_counter = timed_incremental(net, image, "approximate", refine)
    rows.append((f"approximate (refine {refine})", seconds))
    print_rows(name, rows, "s/image", higher_is_better=False)
    for label, c in (("exact", counter), ("approximate", approx_counter)):
        per_window = c.incremental / (PASSES - 1)  # the approximate map computes fewer copies
        print(f"  MACs per window of the map, {label} ({c.copies} copies computed): "
              f"{per_window / 1e9:.3f} G of a full pass's {c.full_pass / 1e9:.3f} G: "
              f"{c.full_pass / per_window:.2f}x fewer")
    print(f"  incremental exact vs captum x16: max |diff| "
          f"{float((exact - captum_map).abs().max()):.1e}")
    print("  explain.py runs: " + ("the engine" if saves_work(net, image, WINDOW, STRIDE, COPIES)
                                   else f"Captum (the engine's count saves under {MIN_SAVING}x)"))
    diff, corr = agreement(approx, exact)
    print(f"  approximate vs exact: max |diff| {diff:.4f}, correlation {corr:.4f}")
    ratios = [captum / exact_seconds]
    for _ in range(rounds - 1):
        captum = seconds_per_image(net, image, 16)
        ratios.append(captum / timed_incremental(net, image, "exact", 1.0)[0])
        print(f"  round {len(ratios)}: captum x16 {captum:.1f} s, "
              f"exact {captum / ratios[-1]:.1f} s", flush=True)
    if rounds > 1:
        print(f"  exact vs captum x16 in {rounds} alternating rounds: "
              f"{', '.join(f'{r:.2f}x' for r in ratios)}; median {np.median(ratios):.2f}x")


def xray_images(checkpoint: str, split: str, count: int) -> tuple[torch.nn.Module, list]:
    """A binary stage's network and `count` X-rays of its recorded split (val: where settings are
    chosen; test: where they are reported), preprocessed as it was trained: (name, (1, 1, S, S)).
    The first count/2 normal and count/2 pneumonia images by file name: none chosen by result."""
    module = load_stage(checkpoint, "binary")
    records = sorted((r for r in recorded_split(module.hparams.data) if r.split == split),
                     key=lambda r: r.path.name)
    normal = [r for r in records if r.label == "normal"][: count // 2]
    picked = normal + [r for r in records if r.label != "normal"][: count - len(normal)]
    return module.net.eval(), [(f"{r.path.parent.name}/{r.path.name}",
                                stage_inputs(module, [read_grayscale(r.path)])[1]) for r in picked]


def xray_agreement(checkpoint: str, split: str, count: int, refines: list[float]) -> None:
    """Exact and approximate maps of real X-rays: seconds, largest difference, correlation."""
    net, images = xray_images(checkpoint, split, count)
    results = {refine: [] for refine in refines}
    exact_seconds = []
    captum = seconds_per_image(net, images[0][1], 16)  # the baseline, on the first X-ray
    print(f"  captum x16: {captum:.1f} s per map (first X-ray)", flush=True)
    for name, image in images:
        with torch.no_grad():
            target = net(image).argmax(1)
        seconds, exact, _ = timed_incremental(net, image, "exact", 1.0, target)
        exact_seconds.append(seconds)
        line = [f"{name}: exact {seconds:.1f} s (max |value| {float(exact.abs().max()):.4f})"]
        for refine in refines:
            seconds, approx, _ = timed_incremental(net, image, "approximate", refine, target)
            diff, corr = agreement(approx, exact)
            results[refine].append((seconds, diff, corr))
            line.append(f"refine {refine}: {seconds:.1f} s, |diff| {diff:.4f}, corr {corr:.3f}")
        print("  " + "; ".join(line), flush=True)
    exact = np.mean(exact_seconds)
    print(f"  exact: {exact:.1f} s per map ({captum / exact:.2f}x captum x16)")
    for refine, rows in results.items():
        seconds, diff, corr = np.array(rows).T
        print(f"  refine {refine}: {seconds.mean():.1f} s per map "
              f"({captum / seconds.mean():.2f}x captum x16, {exact / seconds.mean():.2f}x exact), "
              f"max |diff| {diff.max():.4f}, correlation mean {corr.mean():.3f}, "
              f"min {corr.min():.3f}")


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
    parser.add_argument("--refine", type=float, nargs="+", default=[APPROXIMATE_REFINE],
                        help="approximate mode: share of the filled-in windows computed")
    parser.add_argument("--xrays", type=int, default=0,
                        help="approximate vs exact on N real X-rays (each --refine)")
    parser.add_argument("--checkpoint", help="--xrays: a trained binary-stage checkpoint")
    parser.add_argument("--split", default="val", choices=["val", "test"],
                        help="--xrays with --checkpoint: the checkpoint's validation or test split")
    parser.add_argument("--rounds", type=int, default=1,
                        help="Captum x16 and incremental exact this many times, alternately")
    parser.add_argument("--captum-rows", action="store_true", help="the Captum variants instead")
    parser.add_argument("--images", type=int, default=4,
                        help="images per call on the multi-image row")
    parser.add_argument("--exact-below", type=float, default=30.0,
                        help="measure study A exactly when its estimate is below this many seconds")
    args = parser.parse_args()
    header(f"{SIZE}x{SIZE}, window {WINDOW}, stride {STRIDE}, "
           f"{PASSES - 1} occluded images per heatmap")
    torch.manual_seed(0)
    if args.xrays:
        if not args.checkpoint:
            parser.error("--xrays needs --checkpoint (a trained binary stage)")
        print(f"\n{args.checkpoint}, {args.split} split, {args.xrays} X-rays")
        xray_agreement(args.checkpoint, args.split, args.xrays, args.refine)
        return
    for name in args.models:
        if args.captum_rows:
            captum_rows(name, args.images, args.exact_below)
        else:
            incremental_rows(name, args.refine[0], args.rounds)


if __name__ == "__main__":
    main()
