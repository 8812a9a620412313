"""Sensitivity, specificity and Youden's J of a stage at a list of thresholds, on one split.

python -m research.threshold_curve CHECKPOINT [CHECKPOINT ...] [--stage binary] [--split val]
       [--thresholds 0.01 0.03 0.1 0.5]

Several checkpoints are averaged as one ensemble (their logits), as evaluate.py does. Shows
how flat or sharp the validation optimum is that the pipeline's Youden threshold picks.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pneumonia.pipeline import load_stages
from research.ablation import probabilities, stage_splits

THRESHOLDS = [0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--stage", default="binary", choices=("binary", "subtype"))
    parser.add_argument("--split", default="val", choices=("val", "test"))
    parser.add_argument("--thresholds", nargs="+", type=float, default=THRESHOLDS)
    args = parser.parse_args()
    module = load_stages(args.checkpoints, args.stage)
    records, y = stage_splits(module, args.stage, (args.split,))[args.split]
    p = probabilities(module, records)
    print(f"{args.split}: {len(y)} images, {int(y.sum())} positive")
    print("| threshold | sensitivity | specificity | J | false negatives | false positives |")
    print("|---|---|---|---|---|---|")
    for t in args.thresholds:
        sens, spec = (p[y == 1] >= t).mean(), (p[y == 0] < t).mean()
        print(f"| {t:.3g} | {sens:.4f} | {spec:.4f} | {sens + spec - 1:.4f} | "
              f"{int((p[y == 1] < t).sum())} | {int((p[y == 0] >= t).sum())} |")


if __name__ == "__main__":
    main()
