"""A table of every finished training run, with the test metrics of evaluations that used it."""

from __future__ import annotations

import math
from pathlib import Path

from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from pneumonia.csvio import write_csv
from pneumonia.outputs import claim_output
from pneumonia.tracking import ensure_tracking_store

COLUMNS = ("stage", "run_name", "backbone", "pretrained", "adapter", "head", "freeze", "input_size",
           "split", "epochs", "val_auroc", "val_acc", "test_auroc", "test_acc", "run_id")
# column -> the training run's MLflow param
PARAMS = {"stage": "stage/name", "split": "data/split", "epochs": "trainer/max_epochs",
          **{key: f"model/{key}" for key in ("backbone", "pretrained", "adapter", "head", "freeze",
                                             "input_size")}}


def _experiment_ids(client: MlflowClient, names: list[str]) -> list[str]:
    return [e.experiment_id for n in names if (e := client.get_experiment_by_name(n)) is not None]


def compare_runs(tracking_uri: str, experiments: list[str],
                 evaluation: str = "evaluation") -> list[dict]:
    """One row per finished training run, sorted by stage, then best validation AUROC."""
    ensure_tracking_store(tracking_uri)
    client = MlflowClient(tracking_uri)
    finished = "attributes.status = 'FINISHED'"
    test: dict[str, dict[str, float]] = {}
    eval_ids = _experiment_ids(client, [evaluation])
    # newest first: the latest evaluation of a training run wins
    for run in client.search_runs(eval_ids, f"{finished} and tags.split = 'test'",
                                  order_by=["attributes.start_time DESC"]) if eval_ids else []:
        for stage in ("binary", "subtype"):
            train_id = run.data.tags.get(f"{stage}_run_id")
            if train_id and train_id not in test:
                m = run.data.metrics
                test[train_id] = {"test_auroc": m.get(f"{stage}/auroc"),
                                  "test_acc": m.get(f"{stage}/accuracy")}
    rows = []
    ids = _experiment_ids(client, experiments)
    for run in client.search_runs(ids, finished) if ids else []:
        metrics = run.data.metrics
        rows.append({
            **{column: run.data.params.get(param, "") for column, param in PARAMS.items()},
            "run_name": run.info.run_name, "run_id": run.info.run_id,
            "val_auroc": metrics.get("best/auroc"), "val_acc": metrics.get("best/acc"),
            **test.get(run.info.run_id, {"test_auroc": None, "test_acc": None}),
        })
    rows.sort(key=lambda r: (r["stage"],
                             -(r["val_auroc"] if r["val_auroc"] is not None else -math.inf)))
    return rows


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def format_table(rows: list[dict], columns: tuple[str, ...] = COLUMNS) -> str:
    """Aligned plain-text table of `columns` (missing values shown as "-")."""
    table = [columns, *([_fmt(r.get(c)) for c in columns] for r in rows)]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_table(rows: list[dict], output_dir: Path) -> list[Path]:
    output_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = output_dir / "compare.csv", output_dir / "compare.md"
    write_csv(csv_path, COLUMNS, ([r.get(c) for c in COLUMNS] for r in rows))
    header = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    md_path.write_text(header + "".join(
        "| " + " | ".join(_fmt(r[c]) for c in COLUMNS) + " |\n" for r in rows))
    return [csv_path, md_path]


def compare(cfg: DictConfig) -> tuple[list[dict], list[Path]]:
    """evaluate.py compare=true: the table of finished training runs, saved in the output folder."""
    rows = compare_runs(cfg.paths.tracking_uri, list(cfg.compare_experiments), cfg.experiment_name)
    output_dir = claim_output(cfg.paths.output_dir, results=("compare.csv", "compare.md"),
                              overwrite=cfg.overwrite, config=cfg)
    return rows, write_table(rows, output_dir)
