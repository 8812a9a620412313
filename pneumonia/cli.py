"""The three commands (train.py, evaluate.py, explain.py and the console scripts
pneumonia-train, -evaluate, -explain): Hydra entry points around train(), evaluate() and
explain(). A user's mistake ends the run with one line, not a traceback."""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from pneumonia.errors import UserError

log = logging.getLogger("pneumonia")
EXIT_USER_ERROR = 2
# the project's conf/ (the console scripts come from an editable install of this checkout)
CONF = str(Path(__file__).resolve().parents[1] / "conf")
# options that are gone, and what replaced them: refused with one line before Hydra composes
RETIRED = {"compare": "compare=true is gone: the MLflow UI compares runs (make mlflow-ui)",
           "compare_experiments": "compare_experiments= is gone with compare=true: the MLflow "
                                  "UI compares runs (make mlflow-ui)"}


def run(task: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """task(cfg); a user error is logged as one line and the process exits with status 2."""
    try:
        return task(cfg)
    except UserError as err:
        log.error("%s", err)
        sys.exit(EXIT_USER_ERROR)


def _train(cfg: DictConfig) -> float | None:
    """Train one stage; returns the validation metric checkpoints are chosen by
    (callbacks.model_checkpoint.monitor), the objective of a sweeper such as Optuna; None
    for a failed sweep job."""
    from pneumonia.sweep import run_job
    from pneumonia.train import train

    result = run(lambda c: run_job(c, train), cfg)  # in a sweep a failed job is recorded
    if result is None:
        return None
    print(f"\nOutput folder:    {result['output_dir']}")
    if result["run_id"]:
        print(f"MLflow run id:    {result['run_id']}  ({result['tracking_uri']})")
    print(f"Best checkpoint:  {result['best_checkpoint']}")
    for name, value in result["metrics"].items():
        print(f"  {name:<32} {value:.4f}")
    return result["metrics"].get(cfg.callbacks.model_checkpoint.monitor)


def _evaluate(cfg: DictConfig) -> float:
    """Evaluate the two-stage pipeline; returns its three-class accuracy."""
    from pneumonia.evaluate import evaluate
    from pneumonia.report import STAGE_TITLES

    result = run(evaluate, cfg)
    m = result["metrics"]
    print(f"\nReport: {Path(result['output_dir']) / 'report.md'}")
    if result["run_id"]:
        print(f"MLflow evaluation run: {result['run_id']}; pipeline model: {result['model_uri']}")
    if result.get("model_version"):
        print(f"Registered: models:/{cfg.register}@{cfg.register_alias} "
              f"(version {result['model_version']})" if cfg.register_alias
              else f"Registered: models:/{cfg.register}/{result['model_version']}")
    for section in STAGE_TITLES:
        values = m[section]["metrics"]
        ci = m[section]["ci"]["accuracy"]
        auroc = f", AUROC {values['auroc']:.3f}" if "auroc" in values else ""
        print(f"  {STAGE_TITLES[section]}: accuracy {values['accuracy']:.3f} "
              f"(95 % CI {ci[0]:.3f}-{ci[1]:.3f}){auroc}")
    return m["pipeline"]["metrics"]["accuracy"]


def _explain(cfg: DictConfig) -> None:
    """Explain every X-ray of a folder; exits with status 1 when a file could not be explained."""
    from pneumonia.explain.run import explain

    result = run(explain, cfg)
    out = Path(result["output_dir"])
    print(f"\nReports: {out / 'index.html'}  (summary: {out / 'summary.csv'})")
    if result["run_id"]:
        print(f"MLflow explain run: {result['run_id']}")
    if result["withheld"]:
        print(f"{result['withheld']} image(s) got no diagnosis by decision "
              "(not a chest radiograph, or out of distribution); see summary.csv",
              file=sys.stderr)
    if result["failed"]:
        print(f"{result['failed']} file(s) could not be explained; see summary.csv",
              file=sys.stderr)
        sys.exit(1)  # Hydra drops a task's return value; the exit status tells scripts


def _command(name: str, task: Callable[[DictConfig], Any], schemas: str) -> Callable[[], None]:
    """The command: `schemas`, the module that registers its config's typed schema, is imported
    before Hydra composes conf/<name>.yaml and calls `task`."""
    def main() -> None:
        for arg in sys.argv[1:]:
            key = arg.lstrip("+~").split("=")[0]
            if key in RETIRED:
                print(f"{name}: {RETIRED[key]}", file=sys.stderr)
                sys.exit(EXIT_USER_ERROR)
        importlib.import_module(schemas)
        hydra.main(version_base="1.3", config_path=CONF, config_name=name)(task)()

    return main


train_main = _command("train", _train, "pneumonia.config")
evaluate_main = _command("evaluate", _evaluate, "pneumonia.evaluate")
explain_main = _command("explain", _explain, "pneumonia.explain.run")
