"""Is the test shift in the batch-norm statistics? Scores a stage with and without AdaBN.

python -m research.adapt_bn CHECKPOINT [CHECKPOINT ...] [--stage binary]

Three rows, each with the threshold (Youden) chosen on validation and applied to test:
- plain: the networks as trained;
- train BN: every BatchNorm layer's running mean and variance re-estimated on the clean
  (unaugmented) training images, then used for both splits;
- AdaBN (Li et al. 2016): re-estimated on the images being scored, the validation images for
  the validation scores and the test images for the test scores.
Nothing else changes and no test label is used; AdaBN does use the unlabelled test images
(transductive), so its figures are not comparable with a model scored one image at a time.
A diagnosis of the shift, not part of the recipe.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pneumonia.pipeline import load_stages
from pneumonia.site import adapt_batchnorm
from research.ablation import figures, probabilities, stage_splits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--stage", default="binary", choices=("binary", "subtype"))
    args = parser.parse_args()
    module = load_stages(args.checkpoints, args.stage)
    splits = stage_splits(module, args.stage, ("train", "val", "test"))
    print("| scoring | threshold | val acc | test AUROC | test acc | test sensitivity | "
          "test specificity |")
    print("|---|---|---|---|---|---|---|")
    clean = adapt_batchnorm(module, splits["train"][0])
    # the network scoring `images`
    networks = {"plain": lambda images: module, "train BN": lambda images: clean,
                "AdaBN": lambda images: adapt_batchnorm(module, images)}
    (val, yv), (test, yt) = splits["val"], splits["test"]
    for name, network in networks.items():
        f = figures(yv, probabilities(network(val), val), yt, probabilities(network(test), test))
        print(f"| {name} | {f['threshold']:.3g} | {f['val_acc']:.4f} | {f['test_auroc']:.4f} | "
              f"{f['test_acc']:.4f} | {f['test_sensitivity']:.4f} | {f['test_specificity']:.4f} |")

if __name__ == "__main__":
    main()
