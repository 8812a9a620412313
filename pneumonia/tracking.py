"""The MLflow store and what a run records besides Lightning's per-epoch metrics: run ids, the
tracking database and its lock, the server check, the environment, experiments, run inputs.
A leaf: it imports nothing of the project but its errors."""

from __future__ import annotations

import fcntl
import json
import platform
import re
import subprocess
import urllib.request
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

from alembic.util import CommandError
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.tracking import MlflowClient
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from pneumonia.errors import TrackingError

if TYPE_CHECKING:  # annotations only: tracking.py loads without Lightning
    from lightning.pytorch.loggers import MLFlowLogger

PACKAGES = ("torch", "torchvision", "lightning", "timm", "numpy", "mlflow", "albumentations")
PROJECT = Path(__file__).resolve().parents[1]  # the repository root in a source checkout
_READY: set[str] = set()  # tracking URIs this process has created or checked
# MLflow 3's UI opens an experiment on its GenAI overview unless this tag says it holds model
# training runs; with it, the experiment opens on its runs.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def git_state(repo: Path = PROJECT) -> tuple[str, str]:
    """(commit, "true"/"false" for uncommitted changes) of the code, or ("unknown", "unknown")
    outside a git checkout of it (an installed package, no git)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                              timeout=30, check=True).stdout.strip()

    try:
        # a package installed inside some other repository (a .venv in a checkout) is not it
        if Path(git("rev-parse", "--show-toplevel")).resolve() != repo.resolve():
            return "unknown", "unknown"
        return git("rev-parse", "HEAD"), str(bool(git("status", "--porcelain"))).lower()
    except (OSError, subprocess.SubprocessError):
        return "unknown", "unknown"


def environment() -> dict[str, str]:
    """What a run needs to be reproduced: Python and package versions, the git commit."""
    env = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            env[name] = version(name)
        except PackageNotFoundError:
            env[name] = "not installed"
    env["git_commit"], env["git_dirty"] = git_state()
    return env


def write_environment(path: Path) -> dict[str, str]:
    """environment.json in a run's folder, and the MLflow tags that carry the same facts."""
    env = environment()
    path.write_text(json.dumps(env, indent=2) + "\n")
    return {k if k.startswith("git_") else f"version/{k}": v for k, v in env.items()}


def is_run_id(ref: object) -> bool:
    """True for strings shaped like an MLflow run id (32 hex digits)."""
    return bool(re.fullmatch(r"[0-9a-f]{32}", str(ref)))


def check_server(uri: str, timeout: float = 5.0) -> None:
    """Fail fast when an http(s) tracking server is not reachable (other URIs pass)."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            if response.status == 200:
                return
            reason = f"HTTP {response.status}"
    except OSError as err:  # URLError and HTTPError among them
        reason = str(getattr(err, "reason", err))
    raise TrackingError(
        f"MLflow tracking server {uri} is not reachable ({reason}). Start it (make mlflow-server), "
        "fix logger.tracking_uri, or pass mlflow_fallback_to_local=true to log locally."
    )


def ensure_tracking_store(uri: str) -> None:
    """Creates or upgrades a SQLite tracking database under an exclusive lock on `<database>.lock`:
    of several processes starting at once (a sweep, evaluate and explain) only one runs MLflow's
    schema migration, which the others failed in. Other URIs pass unchanged."""
    path = make_url(uri).database if uri.startswith("sqlite://") else None
    if path in (None, "", ":memory:") or uri in _READY:  # not a database file
        return
    database = Path(path)
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(database.with_name(database.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        try:
            MlflowClient(uri).search_experiments(max_results=1)
        except (MlflowException, SQLAlchemyError, CommandError) as err:  # the migration's errors
            raise TrackingError(
                f"could not create or upgrade the MLflow database {database} "
                f"({type(err).__name__}; another program may be creating it without the lock): "
                "retry, or create it first "
                f"with python -c \"from pneumonia.tracking import ensure_tracking_store as e; "
                f"e('{uri}')\"") from None
    _READY.add(uri)


def log_run_inputs(logger: MLFlowLogger, config: dict, preprocessing: dict, files: list[Path],
                   tags: dict[str, str]) -> None:
    """Parameters (the resolved config and the measured preprocessing, flattened by the logger
    to `data/root`, `preprocessing/mean`, ...), tags, input artifacts."""
    logger.log_hyperparams({**config, "preprocessing": preprocessing})
    tag_experiment_kind(logger.experiment, logger.experiment_id)  # MLFlowLogger created it
    for key, value in tags.items():
        logger.experiment.set_tag(logger.run_id, key, value)
    for path in files:
        logger.experiment.log_artifact(logger.run_id, str(path))


def log_results(logger: MLFlowLogger, metrics: dict[str, float], checkpoint: Path,
                log_checkpoint: bool = True) -> None:
    """The best checkpoint's validation metrics (as best/*), its path and the file itself."""
    logger.log_metrics({f"best/{k.split('/', 1)[-1]}": v for k, v in metrics.items()})
    logger.experiment.set_tag(logger.run_id, "best_checkpoint", str(checkpoint.resolve()))
    if log_checkpoint:
        logger.experiment.log_artifact(logger.run_id, str(checkpoint), "checkpoints")


def tag_experiment_kind(client: MlflowClient, experiment: str) -> None:
    """Tags the experiment (by id) as model development unless it is tagged already."""
    if client.get_experiment(experiment).tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
        client.set_experiment_tag(experiment, *EXPERIMENT_KIND)


def experiment_id(client: MlflowClient, name: str, artifact_dir: str) -> str:
    """The id of the experiment `name`, created if missing (by this process or, at the same
    moment, by another one), tagged as model development (EXPERIMENT_KIND)."""
    ensure_tracking_store(client.tracking_uri)
    remote = client.tracking_uri.startswith(("http://", "https://"))
    location = None if remote else str(Path(artifact_dir) / name)  # a server decides its own
    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            found = client.get_experiment(
                client.create_experiment(name, artifact_location=location))
        except MlflowException as err:
            if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
            found = client.get_experiment_by_name(name)
    tag_experiment_kind(client, found.experiment_id)
    return found.experiment_id


def log_folder_run(tracking_uri: str, artifact_dir: str, experiment: str, folder: Path,
                   params: dict[str, str], metrics: dict[str, float] | None = None) -> str:
    """One MLflow run holding a whole output folder as artifacts (and `metrics`)."""
    client = MlflowClient(tracking_uri)
    run = client.create_run(experiment_id(client, experiment, artifact_dir),
                            tags={"mlflow.runName": f"{experiment}/{folder.name}"})
    for key, value in params.items():
        client.log_param(run.info.run_id, key, value)
    for key, value in (metrics or {}).items():
        client.log_metric(run.info.run_id, key, value)
    client.log_artifacts(run.info.run_id, str(folder))
    client.set_terminated(run.info.run_id)
    return run.info.run_id
