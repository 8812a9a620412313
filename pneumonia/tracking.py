"""MLflow helpers: what goes into a training run besides Lightning's per-epoch metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import MLFlowLogger


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a/b': 1}; lists are kept as their string form."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}/"))
        else:
            out[name] = value
    return out


def log_run_inputs(logger: MLFlowLogger, config: dict, preprocessing: dict, files: list[Path]) -> None:
    """Parameters (the resolved config and the measured preprocessing) and input artifacts."""
    logger.log_hyperparams({**flatten(config), **flatten(preprocessing, "preprocessing/")})
    for path in files:
        logger.experiment.log_artifact(logger.run_id, str(path))


def log_results(logger: MLFlowLogger, metrics: dict[str, float], checkpoint: Path | None) -> None:
    """The best checkpoint's validation metrics (as best/*) and, if given, the checkpoint."""
    logger.log_metrics({f"best/{k.split('/', 1)[-1]}": v for k, v in metrics.items()})
    if checkpoint is not None:
        logger.experiment.log_artifact(logger.run_id, str(checkpoint), "checkpoints")
