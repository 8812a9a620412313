"""Site calibration and adaptation on the local test folder, cross-fitted by patient halves.

python -m research.site_adaptation <model folder> [--data ../shared/data/kermany224]
       [--out outputs/site_adaptation]

<model folder> is the recipe's evaluation's model (outputs/evaluate/<time>/model, what
`make pretrained-cpu` writes): its validation calibration is used as it is, so the validation
images are scored once, not once per method and half.

The test folder's patients are split in two halves (stratified by class, seed 0). For each half,
every method is fitted on the *other* half and scored on this one with `evaluate.py`'s own code
(model_uri=<model folder>; the fitting and scored images never meet):
  (i) none                     temperatures and thresholds from the training split's validation
                               images (and their held-out shifted copy); no test image fits
  (ii) unlabelled adaptation   adapt=<other half> adapt_method=both (labels unused)
  (iii) labelled calibration   calibration=<other half>
Each figure is the mean of the two halves; its 95 % interval resamples the images of each half
(1,000 times) and averages the halves again. The wall clock is both halves' evaluations. The
halves are copies in --out (never written into --data); each evaluation's report stays in
--out/eval/<method>/<half>. Each row is logged as an MLflow run of experiment `results` (its two
reports as artifacts), from which `python -m research.results_page` writes docs/results.md's
table.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from pneumonia.csvio import read_csv
from pneumonia.data.kermany import Record, scan_kermany
from pneumonia.evaluate import evaluate
from pneumonia.hardware import cpu_description
from pneumonia.metrics import auroc
from pneumonia.stages import CLASSES
from pneumonia.tracking import git_state, log_folder_run
from research.results_page import EXPERIMENT, FIGURES, metric_key

CONF = Path(__file__).resolve().parents[1] / "conf"
METHODS = {"(i) none": {},
           "(ii) unlabelled adaptation": {"adapt": "{site}", "adapt_method": "both"},
           "(iii) labelled calibration": {"calibration": "{site}"}}


def patient_halves(records: list[Record], seed: int = 0) -> tuple[list[Record], list[Record]]:
    """Two halves with no patient in both, each class's patients dealt alternately."""
    halves: tuple[list[Record], list[Record]] = ([], [])
    for label in sorted({r.label for r in records}):
        patients = sorted({r.patient for r in records if r.label == label})
        random.Random(seed).shuffle(patients)
        side = {p: i % 2 for i, p in enumerate(patients)}
        for r in records:
            if r.label == label:
                halves[side[r.patient]].append(r)
    return halves


def _copy(records: list[Record], dest: Path) -> Path:
    for r in records:
        target = dest / ("NORMAL" if r.label == "normal" else "PNEUMONIA") / r.path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(r.path, target)
    return dest


def scored_root(data: Path, half: list[Record], dest: Path) -> Path:
    """A Kermany root whose train/ is the real one (a link) and whose test/ holds the half."""
    dest.mkdir(parents=True, exist_ok=True)
    if not (dest / "train").exists():
        (dest / "train").symlink_to((data / "train").resolve(), target_is_directory=True)
    _copy(half, dest / "test")
    return dest


def half_figures(metrics: dict, rows: list[dict]) -> dict[str, np.ndarray]:
    """Per image: truth, P(pneumonia), P(viral | pneumonia), the stages' thresholds, decision."""
    truth = np.array([CLASSES.index(r["truth"]) for r in rows])
    p = 1 - np.array([float(r["p_normal"]) for r in rows])
    viral = np.array([float(r["p_viral"]) for r in rows])
    r = np.divide(viral, p, out=np.zeros_like(p), where=p > 0)
    return {"truth": truth, "p": p, "r": r,
            "decision": np.array([CLASSES.index(r["decision"]) for r in rows]),
            "t1": metrics["binary"]["threshold"], "t2": metrics["subtype"]["threshold"]}


def scores(h: dict[str, np.ndarray], index: np.ndarray | None = None) -> dict[str, float]:
    index = np.arange(len(h["truth"])) if index is None else index
    truth, p, r, decision = (h[k][index] for k in ("truth", "p", "r", "decision"))
    pneumonia = truth > 0
    return dict(zip(FIGURES, (float(np.mean((p >= h["t1"]) == pneumonia)),
                              auroc(pneumonia.astype(int), p),
                              float(np.mean(p[pneumonia] >= h["t1"])),
                              float(np.mean(p[~pneumonia] < h["t1"])),
                              float(np.mean((r[pneumonia] >= h["t2"]) == (truth[pneumonia] == 2))),
                              float(np.mean(decision == truth)))))


def averaged(halves: list[dict], samples: int = 1000,
             seed: int = 0) -> dict[str, tuple[float, float, float]]:
    """Each figure's mean over the halves and its 95 % bootstrap interval."""
    rng = np.random.default_rng(seed)
    point = {k: np.mean([scores(h)[k] for h in halves]) for k in scores(halves[0])}
    draws = {k: [] for k in point}
    for _ in range(samples):
        each = [scores(h, rng.integers(0, len(h["truth"]), len(h["truth"]))) for h in halves]
        for k in draws:
            draws[k].append(np.mean([e[k] for e in each]))
    return {k: (point[k], *np.nanquantile(draws[k], [0.025, 0.975])) for k in point}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="the recipe's evaluated model folder")
    parser.add_argument("--data", type=Path,
                        default=(Path(__file__).resolve().parents[2] / "shared" / "data"
                                 / "kermany224"))
    parser.add_argument("--out", type=Path, default=Path("outputs/site_adaptation"))
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the reports of an earlier run in --out")
    parser.add_argument("--recipe", default="pretrained_cpu", help="the recipe the model is of")
    parser.add_argument("--tracking-uri", default=f"sqlite:///{Path.cwd() / 'mlflow.db'}")
    args = parser.parse_args()
    test = [r for r in scan_kermany(args.data) if r.folder == "test"]
    halves = patient_halves(test)
    assert not {r.patient for r in halves[0]} & {r.patient for r in halves[1]}
    sites = [_copy(h, args.out / "sites" / f"half{i}") for i, h in enumerate(halves)]
    roots = [scored_root(args.data, h, args.out / "roots" / f"half{i}")
             for i, h in enumerate(halves)]
    print(f"halves: {[len(h) for h in halves]} images; classes per half: "
          f"{[{c: sum(r.label == c for r in h) for c in CLASSES} for h in halves]}")
    print("\n| method | " + " | ".join(FIGURES) + " | wall clock |\n|---|"
          + "---|" * (len(FIGURES) + 1))
    commit, dirty = git_state()  # the code that computes the rows, read before they run
    for method, options in METHODS.items():
        per_half, started = [], time.monotonic()
        for i in (0, 1):
            with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
                cfg = compose("evaluate", overrides=[f"model_uri={args.model.resolve()}",
                                                     "log_to_mlflow=false", "bootstrap.samples=1"])
            out = args.out / "eval" / method.split()[0].strip("()") / f"half{i}"
            with open_dict(cfg):
                cfg.paths.work_dir = str(Path.cwd())  # what Hydra's runtime would give
                cfg.paths.output_dir = str(out)
                cfg.data.root = str(roots[i])
                cfg.overwrite = args.overwrite
                for key, value in options.items():
                    cfg[key] = value.format(site=sites[1 - i])
            result = evaluate(cfg)
            per_half.append(half_figures(result["metrics"], read_csv(out / "predictions.csv")))
        figures, seconds = averaged(per_half), time.monotonic() - started
        print(f"| {method} | " + " | ".join(f"{v:.3f} ({lo:.3f}-{hi:.3f})"
                                            for v, lo, hi in figures.values())
              + f" | {seconds:.0f} s |", flush=True)
        log_folder_run(args.tracking_uri, str(Path.cwd() / "mlartifacts"), EXPERIMENT, out.parent,
                       {"recipe": args.recipe, "row": method, "model": str(args.model.resolve()),
                        "commit": commit + ("-dirty" if dirty == "true" else ""),
                        "cpu": cpu_description(), "images": str(len(test)),
                        "command": " ".join(["python -m research.site_adaptation", *sys.argv[1:]])},
                       {"wall_clock_s": seconds,
                        **{metric_key(f, part): v for f, values in figures.items()
                           for part, v in zip(("", " low", " high"), values)}})


if __name__ == "__main__":
    main()
