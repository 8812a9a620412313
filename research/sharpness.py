"""How sharp the images of each class are, per Kermany folder, as the recipe sees them.

python -m research.sharpness DATA_ROOT [--size 64]

Each image goes through the recipe's preprocessing (study A's proportional crop, resize to
`--size`); its sharpness is the mean absolute Laplacian of the [0, 1] image. If one class is
clearly sharper in the training folder, sharpness can stand in for the label
(docs/notes/recipe-choice.md gives the figures).
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np
from scipy import ndimage

from pneumonia.data.datamodule import KermanyDataModule
from pneumonia.io import read_grayscale


def sharpness(image: np.ndarray) -> float:
    """Mean |Laplacian| of a uint8 image scaled to [0, 1]."""
    return float(np.abs(ndimage.laplace(image.astype(np.float32) / 255.0)).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root")
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    # the training run's own preprocessing: crop maxima measured on its training split
    data = KermanyDataModule(args.root, "binary", args.size, crop={"enabled": True})
    values: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in data.manifest:
        values[r.folder, r.label].append(sharpness(data.preprocessing(read_grayscale(r.path))))
    print(f"mean |Laplacian| at {args.size} px (mean, sd, images)")
    print("| folder | normal | bacterial | viral |")
    print("|---|---|---|---|")
    for folder in sorted({f for f, _ in values}, key=("train", "val", "test").index):
        cells = [f"{np.mean(v):.4f} ({np.std(v):.4f}, {len(v)})"
                 if (v := values.get((folder, label))) else "-"
                 for label in ("normal", "bacterial", "viral")]
        print(f"| {folder} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
