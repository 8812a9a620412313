"""Hydra multirun support: each job records its outcome; the sweep ends with a table of them.

Jobs write `job_result.json` into their own output folder, so the summary works with every
launcher (in-process, submitit local or SLURM). A failed job is recorded with its error and
does not stop the others; the sweep then exits with status 1 after printing the table.
"""

from __future__ import annotations

import json
import logging
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from pneumonia.csvio import write_csv
from pneumonia.errors import ConfigError, MissingInputError

log = logging.getLogger(__name__)
RESULT_FILE = "job_result.json"
COLUMNS = ("job", "overrides", "status", "val/auroc", "val/acc", "run_id", "error")


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run_job(cfg: DictConfig, task: Callable[[DictConfig], dict[str, Any]]) -> dict[str, Any] | None:
    """Run one job; inside a sweep, record its result or its error instead of raising."""
    if not in_multirun():
        return task(cfg)
    hydra_cfg = HydraConfig.get()
    record = {"job": hydra_cfg.job.num, "overrides": " ".join(hydra_cfg.overrides.task)}
    try:
        result = task(cfg)
    except Exception as err:  # one failed job must not stop the sweep
        log.error("Job %s failed:\n%s", record["job"], traceback.format_exc())
        record.update(status="FAILED", error=f"{err.__class__.__name__}: {err}")
        result = None
    else:
        record.update(status="COMPLETED", run_id=result.get("run_id"), stage=cfg.stage.name,
                      best_checkpoint=result.get("best_checkpoint"),
                      **{k: result["metrics"].get(k) for k in ("val/auroc", "val/acc")})
    (Path(hydra_cfg.runtime.output_dir) / RESULT_FILE).write_text(json.dumps(record))
    return result


def collect(sweep_dir: Path) -> list[dict]:
    rows = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob(f"*/{RESULT_FILE}"))]
    return sorted(rows, key=lambda r: r["job"])


def sweep_checkpoints(sweep_dir: Path) -> dict[str, list[str]]:
    """Each stage's best checkpoints from a finished sweep (e.g. several seeds, to average)."""
    rows = collect(sweep_dir)
    if not rows:
        raise MissingInputError(f"sweep={sweep_dir}: no {RESULT_FILE} in its job folders")
    failed = [str(r["job"]) for r in rows if r["status"] != "COMPLETED"]
    if failed:
        raise ConfigError(f"sweep={sweep_dir}: job(s) {', '.join(failed)} failed; an ensemble "
                          "would silently miss them (evaluate the checkpoints by hand instead)")
    found: dict[str, list[str]] = {}
    for r in rows:
        found.setdefault(r.get("stage", "?"), []).append(r.get("best_checkpoint") or r["run_id"])
    return found


def format_table(rows: list[dict], columns: tuple[str, ...] = COLUMNS) -> str:
    """Aligned plain-text table of `columns` (missing values shown as "-")."""
    def cell(value) -> str:
        return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)

    table = [columns, *([cell(r.get(c)) for c in columns] for r in rows)]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    lines = ["  ".join(text.ljust(w) for text, w in zip(row, widths)) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


class SweepSummary(Callback):
    """Prints and saves `sweep_summary.csv` at the end of a multirun."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = collect(sweep_dir)
        write_csv(sweep_dir / "sweep_summary.csv", COLUMNS,
                  ([r.get(c) for c in COLUMNS] for r in rows))
        print(f"\nSweep {sweep_dir.name}: {len(rows)} jobs\n{format_table(rows)}\n"
              f"Saved: {sweep_dir / 'sweep_summary.csv'}")
        failed = [r for r in rows if r["status"] != "COMPLETED"]
        if failed:
            raise SystemExit(f"{len(failed)} of {len(rows)} sweep jobs failed "
                             "(see the table above)")
