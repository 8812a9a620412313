"""Ablation runs for experiment=scratch_cpu: one row per idea, each trained with several seeds.

python -m research.ablation --data ../shared/data/kermany224 [--variants baseline affine ...]
       [--seeds 0 1] [--stage binary] [--epochs 8] [--out outputs/ablation]

Each (variant, seed) is a real `train.py` run (logged to MLflow experiment `ablation-<stage>`,
tagged `variant`). Its best checkpoint (chosen on validation AUROC) is then scored: the
decision threshold is Youden's on the validation split, then applied unchanged to the test
split. The test split is only measured here, never used to choose anything. Scores are
logged to the run as `score/*` metrics and appended to `<out>/scores.csv`; a finished
(variant, seed, stage) is not run again. The table printed at the end averages the seeds.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from pneumonia.csvio import read_csv, write_csv
from pneumonia.data.kermany import Record
from pneumonia.metrics import auroc, youden_threshold
from pneumonia.pipeline import load_stages, recorded_split, softmax_positive, stage_outputs
from pneumonia.stages import stage_targets

# The ablation's baseline: the first recipe (ResNet-18) without the idea it kept first (affine),
# one model per run; experiment=scratch_cpu has changed since, so the model is pinned here.
# Each idea: overrides on top of it. "tta" changes scoring only.
AFFINE = ["data.augment.scale=[0.9,1.15]", "data.augment.rotate=10", "data.augment.translate=0.06"]
BASE = ["model.backbone=resnet18", "model.name=resnet18",
        "data.augment.scale=null", "data.augment.rotate=0", "data.augment.translate=0"]
# today's recipe, one model per run: affine on DenseNet-121
DENSENET = [*AFFINE, "model.backbone=densenet121", "model.name=densenet121"]
VARIANTS: dict[str, list[str]] = {
    "baseline": [],
    "tta": [],
    "affine": AFFINE,
    # on top of affine: larger zooms, turns and shifts; stronger weight decay; 96 px
    "affine_strong": ["data.augment.scale=[0.75,1.3]", "data.augment.rotate=15",
                      "data.augment.translate=0.1"],
    "affine_wd": [*AFFINE, "optimizer.weight_decay=0.05"],
    "affine_96": [*AFFINE, "model.input_size=96"],
    "densenet121": DENSENET,
    "convnext_atto": [*AFFINE, "model.backbone=convnext_atto", "model.name=convnext_atto"],
    # on top of densenet121: label smoothing; no class weights; 96 px; the checkpoint with the
    # lowest validation loss
    "densenet121_smooth": [*DENSENET, "loss.label_smoothing=0.1"],
    "densenet121_unweighted": [*DENSENET, "loss.class_weights=null"],
    "densenet121_96": [*DENSENET, "model.input_size=96"],
    # weights averaged over the last steps (EMA, half-life about one epoch): flatter minima
    # generalise better to new domains (SWAD, Cha et al. 2021)
    "densenet121_ema": [*DENSENET,
                        "+callbacks.ema._target_=lightning.pytorch.callbacks.EMAWeightAveraging",
                        "+callbacks.ema.decay=0.995"],
    "densenet121_val_loss": [*DENSENET, "callbacks.model_checkpoint.monitor=val/loss",
                             "callbacks.model_checkpoint.mode=min"],
    "label_smoothing": ["loss.label_smoothing=0.1"],
    "size128": ["model.input_size=128"],
    "no_class_weights": ["loss.class_weights=null"],
}
TTA_VARIANTS = {"tta"}
FIELDS = ["variant", "seed", "stage", "epochs", "train_seconds", "best_epoch", "val_auroc",
          "val_acc", "threshold", "test_auroc", "test_acc", "test_acc_at_0.5", "test_sensitivity",
          "test_specificity", "run_id", "checkpoint"]


def stage_splits(module, stage: str,
                 splits=("val", "test")) -> dict[str, tuple[list[Record], np.ndarray]]:
    """For each split: the images of a loaded stage's own split that the stage classifies
    (subtype: pneumonia only) and their targets. The folder is scanned once."""
    records = recorded_split(module.hparams.data)
    out = {}
    for split in splits:
        rs = [r for r in records if r.split == split]
        y = np.array(stage_targets(stage, (r.label for r in rs)))
        out[split] = ([r for r, keep in zip(rs, y >= 0) if keep], y[y >= 0])
    return out


def probabilities(module, records: list[Record], tta: bool = False) -> np.ndarray:
    """P(positive class) of a loaded stage (one model or an ensemble) for these images."""
    return softmax_positive(stage_outputs(module, records, num_workers=2, tta=tta)[0])


def figures(yv: np.ndarray, pv: np.ndarray, yt: np.ndarray, pt: np.ndarray) -> dict[str, float]:
    """Validation and test figures from targets and P(positive); the threshold is Youden's on
    validation, applied unchanged to test."""
    t = youden_threshold(yv, pv)
    return {"val_auroc": auroc(yv, pv), "val_acc": float(((pv >= t) == yv).mean()), "threshold": t,
            "test_auroc": auroc(yt, pt), "test_acc": float(((pt >= t) == yt).mean()),
            "test_sensitivity": float((pt[yt == 1] >= t).mean()),
            "test_specificity": float((pt[yt == 0] < t).mean()),
            "test_acc_at_0.5": float(((pt >= 0.5) == yt).mean())}


def score(module, stage: str, tta: bool) -> dict[str, float]:
    """`figures` of a loaded stage on its own validation and test splits."""
    (val, yv), (test, yt) = stage_splits(module, stage).values()
    return figures(yv, probabilities(module, val, tta), yt, probabilities(module, test, tta))


def run(variant: str, seed: int, stage: str, epochs: int, data: str, out: Path,
        extra: list[str]) -> dict:
    base = "baseline" if variant in TTA_VARIANTS else variant
    trained = run_dir(out, base, seed, stage, epochs).resolve()
    start = time.perf_counter()
    if not any((trained / "checkpoints").glob("best-*.ckpt")):
        cmd = [sys.executable, "train.py", "experiment=scratch_cpu", f"stage={stage}",
               f"seed={seed}", f"data.root={data}", f"trainer.max_epochs={epochs}",
               f"hydra.run.dir={trained}", f"logger.experiment_name=ablation-{stage}",
               f"+logger.tags.variant={base}", f"logger.run_name='{base}/seed={seed}'",
               "log_best_checkpoint=false", *BASE, *extra, *VARIANTS[base]]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    seconds = time.perf_counter() - start
    checkpoint = best_checkpoint(out, base, seed, stage, epochs)
    module = load_stages(checkpoint, stage)
    result = score(module, stage, tta=variant in TTA_VARIANTS)
    row = {"variant": variant, "seed": seed, "stage": stage, "epochs": epochs,
           "train_seconds": round(seconds), "best_epoch": checkpoint.name.split("epoch")[1][:2],
           "run_id": module.mlflow_run_id, "checkpoint": str(checkpoint),
           **{k: round(v, 4) for k, v in result.items()}}
    if module.mlflow_run_id and variant not in TTA_VARIANTS:
        from mlflow.tracking import MlflowClient
        from omegaconf import OmegaConf

        uri = OmegaConf.load(trained / "config.yaml").logger.tracking_uri
        client = MlflowClient(uri)
        for key, value in result.items():
            client.log_metric(module.mlflow_run_id, f"score/{key}", value)
    return row


def run_dir(out: Path, variant: str, seed: int, stage: str, epochs: int) -> Path:
    """One training run's folder; the epoch count is part of it, so that a longer schedule
    trains anew instead of finding the shorter one's checkpoint."""
    return out / variant / f"seed{seed}" / f"{stage}-{epochs}ep"


def best_checkpoint(out: Path, variant: str, seed: int, stage: str, epochs: int) -> Path:
    return sorted((run_dir(out, variant, seed, stage, epochs) / "checkpoints")
                  .glob("best-*.ckpt"))[-1]


def ensemble_row(variants: list[str], seeds: list[int], stage: str, epochs: int, out: Path) -> dict:
    """The mean of the logits of the variants' seeds, scored like a single run."""
    checkpoints = [best_checkpoint(out, v, s, stage, epochs) for v in variants for s in seeds]
    result = score(load_stages(checkpoints, stage), stage, tta=False)
    return {"variant": "+".join(variants) + "_ensemble", "seed": "+".join(map(str, seeds)),
            "stage": stage, "epochs": epochs, **{k: round(v, 4) for k, v in result.items()},
            "checkpoint": " ".join(map(str, checkpoints))}


def read_rows(path: Path) -> list[dict]:
    return read_csv(path) if path.is_file() else []


def table(rows: list[dict]) -> str:
    """Markdown: mean over seeds per (stage, variant, epochs), with the spread (min-max) of test
    accuracy."""
    lines = ["| stage | variant | epochs | seeds | val AUROC | val acc | test AUROC | "
             "test acc (min-max) | test sens | test spec |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["stage"], r["variant"], r["epochs"]), []).append(r)
    for (stage, variant, epochs), rs in groups.items():
        def mean(key: str) -> float:
            return float(np.mean([float(r[key]) for r in rs]))
        accs = [float(r["test_acc"]) for r in rs]
        lines.append(f"| {stage} | {variant} | {epochs} | {len(rs)} | {mean('val_auroc'):.4f} | "
                     f"{mean('val_acc'):.4f} | {mean('test_auroc'):.4f} | {mean('test_acc'):.4f} "
                     f"({min(accs):.3f}-{max(accs):.3f}) | "
                     f"{mean('test_sensitivity'):.3f} | {mean('test_specificity'):.3f} |")
    return "\n".join(lines)


def append(scores: Path, row: dict) -> None:
    write_csv(scores, FIELDS, [[row.get(k) for k in FIELDS]], append=True)
    print(row, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--stage", default="binary", choices=("binary", "subtype"))
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("outputs/ablation"))
    parser.add_argument("--table", action="store_true",
                        help="only print the table of finished rows")
    parser.add_argument("--ensemble", metavar="VARIANT", nargs="+",
                        help="score the mean of these finished variants' seeds as one more row")
    parser.add_argument("overrides", nargs="*",
                        help="train.py overrides for every run, before the variant's own")
    args = parser.parse_args()
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    scores = args.out / "scores.csv"
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.table:
        for variant in args.variants:
            for seed in args.seeds:
                done = {(r["variant"], r["seed"], r["stage"], r["epochs"])
                        for r in read_rows(scores)}
                if (variant, str(seed), args.stage, str(args.epochs)) in done:
                    continue
                append(scores, run(variant, seed, args.stage, args.epochs, args.data, args.out,
                                   args.overrides))
    if args.ensemble:
        append(scores, ensemble_row(args.ensemble, args.seeds, args.stage, args.epochs, args.out))
    print(table(read_rows(scores)))


if __name__ == "__main__":
    main()
