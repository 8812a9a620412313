"""Recipes compared on validation and on its copy under held-out acquisition changes.

python -m research.shifted_validation NAME=CHECKPOINT[,CHECKPOINT...] [NAME=... ...]
       [--stage binary] [--tta]

For each named checkpoint (several, comma-separated, are averaged as one ensemble), scores the
validation split as it is and each image under one held-out change (`held_out_shift`: CLAHE,
unsharp masking, shot noise, collimation, a tone curve, a median filter; none is a training
augmentation), and prints AUROC on both, the AUROC under each change, and the accuracy on the
shifted copy at the threshold chosen on the pooled images (the operating-point rule of
`TwoStagePipeline.calibrate`). The test split is never read: this is how a data path and an
operating point are chosen without a new site's labels.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from pneumonia.data.transforms import HELD_OUT_SHIFTS
from pneumonia.metrics import auroc, youden_threshold
from pneumonia.pipeline import load_stages, softmax_positive, stage_outputs
from research.ablation import stage_splits


def scores(module, records, shifted: bool, tta: bool) -> np.ndarray:
    logits = stage_outputs(module, records, num_workers=2, tta=tta, shifted=shifted)[0]
    return softmax_positive(logits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipes", nargs="+", help="NAME=CHECKPOINT[,CHECKPOINT...]")
    parser.add_argument("--stage", default="binary", choices=("binary", "subtype"))
    parser.add_argument("--tta", action="store_true")
    args = parser.parse_args()
    names = list(HELD_OUT_SHIFTS)
    print("| recipe | val AUROC | shifted AUROC | " + " | ".join(names)
          + " | pooled threshold | shifted accuracy | shifted balanced accuracy |")
    print("|---|---|---|" + "---|" * len(names) + "---|---|---|")
    for recipe in args.recipes:
        name, paths = recipe.split("=", 1)
        module = load_stages([Path(p) for p in paths.split(",")], args.stage)
        records, y = stage_splits(module, args.stage, ("val",))["val"]
        clean, moved = (scores(module, records, s, args.tta) for s in (False, True))
        t = youden_threshold(np.r_[y, y], np.r_[clean, moved])
        kind = np.arange(len(y)) % len(names)  # which change each image met (held_out_shift)
        per = [auroc(y[kind == k], moved[kind == k]) for k in range(len(names))]
        sens, spec = (moved[y == 1] >= t).mean(), (moved[y == 0] < t).mean()
        print(f"| {name} | {auroc(y, clean):.4f} | {auroc(y, moved):.4f} | "
              + " | ".join(f"{a:.3f}" for a in per)
              + f" | {t:.3f} | {((moved >= t) == y).mean():.3f} | {(sens + spec) / 2:.3f} |",
              flush=True)


if __name__ == "__main__":
    main()
