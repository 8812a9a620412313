"""How often the out-of-distribution gate flags chest X-rays and images that are not.

python -m benchmarks.ood_gate \
multirun/scratch_cpu/<time>/[012]_binary_densenet121/checkpoints/best-*.ckpt \
    [--data ../shared/data/kermany224]

Loads the binary checkpoint(s) (several are averaged, as evaluate.py averages a sweep) and scores,
with the gate stored in them (pneumonia.ood, fitted at the end of training on validation):
  validation      the checkpoints' own validation split (flags its fraction by construction)
  local test      the official test images under --data (half of the official test split)
  CT/MR slices    every CT and MR image among the DICOM files pydicom ships (rendered with the
                  reader's windowing), one row each
  shipped images  the photos and pictures matplotlib and pydicom ship (JPEG/PNG, >= 128 px)
  noise, blank    uniform and Gaussian noise, and black, gray and white images
For comparison it also prints, per set, the fraction an energy score (-logsumexp of stage 1's
logits, thresholded at the same fraction of validation images) would flag. research/ood_features.py
compares the feature sets the gate could use.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib
import numpy as np
import pydicom
import torch

from benchmarks.common import SHARED_DATA, header
from pneumonia.data.kermany import scan_kermany
from pneumonia.errors import ImageReadError
from pneumonia.io import read_grayscale
from pneumonia.pipeline import load_stages, recorded_split, stage_inputs, stage_members

MIN_SIDE = 128


def dicom_slices() -> list[np.ndarray]:
    """CT and MR images among pydicom's own test files (no download)."""
    root = Path(pydicom.data.get_testdata_file("CT_small.dcm")).parent
    images = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            modality = pydicom.dcmread(path, stop_before_pixels=True, force=True).get("Modality")
            if modality in ("CT", "MR"):
                images.append(read_grayscale(path, accept_any_modality=True))
        except (ImageReadError, pydicom.errors.InvalidDicomError, OSError, AttributeError):
            continue
    return images


def shipped_pictures() -> list[np.ndarray]:
    """JPEG and PNG pictures at least MIN_SIDE px that matplotlib and pydicom ship."""
    images = []
    for package in (matplotlib, pydicom):
        for path in sorted(Path(package.__file__).parent.rglob("*")):
            if path.suffix.lower() not in (".jpg", ".jpeg", ".png"):
                continue
            try:
                image = read_grayscale(path)
            except ImageReadError:
                continue
            if min(image.shape) >= MIN_SIDE:
                images.append(image)
    return images


def synthetic_images(size: int = 512) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (size, size), dtype=np.uint8) for _ in range(4)]
    noise += [np.clip(rng.normal(128, 40, (size, size)), 0, 255).astype(np.uint8) for _ in range(4)]
    return noise + [np.full((size, size), v, np.uint8) for v in (0, 128, 255)]


@torch.inference_mode()
def scores(module, images: list[np.ndarray], batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """The gate's scores (> 1 flagged) and the energy scores of decoded images."""
    gate, energy = [], []
    for start in range(0, len(images), batch):
        _, x = stage_inputs(module, images[start:start + batch])
        logits, ood = module.outputs(x)
        gate.append(ood.numpy())
        energy.append(-torch.logsumexp(logits.float(), 1).numpy())
    return np.concatenate(gate), np.concatenate(energy)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--data", type=Path, default=SHARED_DATA / "kermany224")
    args = parser.parse_args()
    header(f"binary checkpoint(s): {', '.join(map(str, args.checkpoints))}")
    module = load_stages(args.checkpoints, "binary")
    members = stage_members(module)
    if any(m.ood is None for m in members):
        raise SystemExit("a checkpoint has no out-of-distribution gate (trained before it existed)")
    fraction = members[0].ood.fraction
    val = [r for r in recorded_split(module.hparams.data) if r.split == "val"]
    test = [r for r in scan_kermany(args.data) if r.folder == "test"]
    sets = {"validation": [read_grayscale(r.path) for r in val],
            "local test": [read_grayscale(r.path) for r in test],
            "CT/MR slices": dicom_slices(), "shipped images": shipped_pictures(),
            "noise, blank": synthetic_images()}
    results = {name: scores(module, images) for name, images in sets.items()}
    energy_threshold = np.quantile(results["validation"][1], 1 - fraction)
    print(f"gate fitted to flag {100 * fraction:.1f} % of validation images; "
          f"members: {len(members)}")
    print("\n| images | n | flagged by the gate | flagged by energy | median gate score |\n"
          "|---|---|---|---|---|")
    for name, (gate, energy) in results.items():
        print(f"| {name} | {len(gate)} | {100 * np.mean(gate > 1):.1f} % | "
              f"{100 * np.mean(energy > energy_threshold):.1f} % | {np.median(gate):.2f} |")


if __name__ == "__main__":
    main()
