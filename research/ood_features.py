"""Which stage-1 features make the out-of-distribution gate work? (docs/formats.md)

python -m research.ood_features \
multirun/scratch_cpu/<time>/0_binary_densenet121/checkpoints/best-*.ckpt
       [--data ../shared/data/kermany224] [--train-images 2000]

For one binary checkpoint, fits a Mahalanobis gate (pneumonia.ood.OODGate: Ledoit-Wolf Gaussian
on training images, threshold at the validation images' 99th percentile) on each feature set:
  last mean        the last feature map, averaged over space (the gate's first version)
  last mean+std    the same plus each channel's spatial standard deviation
  all stages       mean and std of every stage timm lists in `feature_info` (what the gate
                   uses: pneumonia.ood), one Gaussian per stage, an image's score its largest
                   stage score, thresholded again at the validation images' 99th percentile
and prints the fraction each flags in the sets of benchmarks.ood_gate. The validation split
chooses nothing but the threshold; test and non-chest images are only measured.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import SHARED_DATA, header
from benchmarks.ood_gate import dicom_slices, shipped_pictures, synthetic_images
from pneumonia.data.kermany import scan_kermany
from pneumonia.io import read_grayscale
from pneumonia.ood import OODGate, describe, watching
from pneumonia.pipeline import load_stage, recorded_split, stage_inputs


@torch.inference_mode()
def stage_maps(module, images: list[np.ndarray], batch: int = 64) -> dict[str, torch.Tensor]:
    """{stage: (N, D)} descriptions (pneumonia.ood.describe) of every timm feature stage, and
    the last feature map's: "last" (its description), "last mean" (its channel means only)."""
    with watching(module.net.backbone) as seen:
        last = []
        for start in range(0, len(images), batch):
            _, x = stage_inputs(module, images[start:start + batch])
            last.append(module.net.features(x).float())
    last = torch.cat(last)
    return {"last mean": last.mean((2, 3)), "last": describe(last),
            **{n: torch.cat(v) for n, v in seen.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data", type=Path, default=SHARED_DATA / "kermany224")
    parser.add_argument("--train-images", type=int, default=2000)
    args = parser.parse_args()
    header(f"binary checkpoint {args.checkpoint}")
    module = load_stage(args.checkpoint, "binary")
    records = recorded_split(module.hparams.data)
    train = [r for r in records if r.split == "train"]
    train = [train[i]
             for i in np.linspace(0, len(train) - 1, args.train_images).round().astype(int)]
    sets = {"train": [read_grayscale(r.path) for r in train],
            "validation": [read_grayscale(r.path) for r in records if r.split == "val"],
            "local test": [read_grayscale(r.path) for r in scan_kermany(args.data)
                           if r.folder == "test"],
            "CT/MR slices": dicom_slices(), "shipped images": shipped_pictures(),
            "noise, blank": synthetic_images()}
    maps = {name: stage_maps(module, images) for name, images in sets.items()}
    stages = [n for n in maps["train"] if n not in ("last", "last mean")]

    def gate(columns: dict[str, slice]) -> dict[str, np.ndarray]:
        fitted = OODGate.fit({n: maps["train"][n][:, c] for n, c in columns.items()},
                             {n: maps["validation"][n][:, c] for n, c in columns.items()}, 0.01)
        return {name: fitted.score({n: m[n][:, c] for n, c in columns.items()}).numpy()
                for name, m in maps.items()}

    choices = {"last mean": gate({"last mean": slice(None)}),
               "last mean+std": gate({"last": slice(None)}),
               "all stages mean+std (the gate)": gate({n: slice(None) for n in stages})}
    print(f"stages: {', '.join(stages)}\n")
    print("| features | " + " | ".join(f"{n} ({len(sets[n])})" for n in sets if n != "train")
          + " |")
    print("|---|" + "---|" * (len(sets) - 1))
    for choice, scores in choices.items():
        print(f"| {choice} | " + " | ".join(f"{100 * np.mean(scores[n] > 1):.1f} %"
                                            for n in sets if n != "train")
              + " |")


if __name__ == "__main__":
    main()
