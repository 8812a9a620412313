"""Two evaluations of the same images compared: each figure's difference (A - B) with a 95 %
paired bootstrap interval (the images resampled together, so what the two share cancels).
Each argument is an evaluation's output folder (predictions.csv and metrics.json, whose stage
2 threshold gives stage 2 accuracy on the true pneumonia images).

    .venv/bin/python -m research.paired outputs/evaluate/<A> outputs/evaluate/<B>
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from pneumonia.csvio import read_csv
from pneumonia.metrics import auroc, bootstrap_intervals


def read(folder: Path) -> tuple[dict[str, tuple[str, float, float, str]], float]:
    """path -> (truth, P(pneumonia), P(viral | pneumonia), decision), and the stage 2 threshold."""
    rows = {r["path"]: (r["truth"], 1 - float(r["p_normal"]),
                        float(r["p_viral"]) / max(1 - float(r["p_normal"]), 1e-12), r["decision"])
            for r in read_csv(folder / "predictions.csv")}
    threshold = json.loads((folder / "metrics.json").read_text())["subtype"]["threshold"]
    return rows, threshold


def figures(truth, p, r, decision, t2) -> dict[str, float]:
    pneumonia = truth != "normal"
    viral = truth[pneumonia] == "viral"
    return {"stage 1 AUROC": auroc(pneumonia, p),
            "stage 1 accuracy": float(np.mean((decision != "normal") == pneumonia)),
            "stage 2 AUROC": auroc(viral, r[pneumonia]),
            "stage 2 accuracy": float(np.mean((r[pneumonia] >= t2) == viral)),
            "three-class accuracy": float(np.mean(decision == truth))}


def compare(a_folder: Path, b_folder: Path) -> dict[str, tuple[float, float, tuple]]:
    """Figure -> (A's value, B's value, the 95 % interval of A - B)."""
    (a, ta), (b, tb) = read(a_folder), read(b_folder)
    if a.keys() != b.keys():
        raise SystemExit(f"{a_folder} and {b_folder} scored different images")
    paths = sorted(a)
    truth = np.array([a[k][0] for k in paths])
    cols = [np.array([x[k][i] for k in paths]) for x in (a, b) for i in (1, 2, 3)]

    def difference(truth, pa, ra, da, pb, rb, db):
        fa, fb = figures(truth, pa, ra, da, ta), figures(truth, pb, rb, db, tb)
        return {k: fa[k] - fb[k] for k in fa}

    fa, fb = figures(truth, *cols[:3], ta), figures(truth, *cols[3:], tb)
    ci = bootstrap_intervals(difference, (truth, *cols))
    return {k: (fa[k], fb[k], ci[k]) for k in fa}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    args = parser.parse_args()
    print(f"A = {args.a}, B = {args.b}")
    for k, (a, b, (lo, hi)) in compare(args.a, args.b).items():
        print(f"{k:22s} A {a:.4f}  B {b:.4f}  A - B {a - b:+.4f} ({lo:+.4f} to {hi:+.4f})")


if __name__ == "__main__":
    main()
