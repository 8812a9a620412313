"""A run records what it needs to be reproduced, and the same seed reproduces it exactly."""

import json
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from omegaconf import open_dict

from pneumonia.tracking import PACKAGES, git_state
from pneumonia.train import train
from tests.conftest import REPO, compose_train


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t",
                           *args],
                          capture_output=True, text=True, check=True).stdout.strip()


def test_git_state_commit_dirty_and_unknown(tmp_path):
    assert git_state(tmp_path) == ("unknown", "unknown")  # not a git checkout
    repo = tmp_path / "repo"
    (repo / "pneumonia").mkdir(parents=True)
    _git(repo, "init", "-q")
    (repo / "pneumonia" / "a.py").write_text("x = 1\n")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "one")
    head = _git(repo, "rev-parse", "HEAD")
    assert git_state(repo) == (head, "false")
    (repo / "pneumonia" / "a.py").write_text("x = 2\n")
    assert git_state(repo) == (head, "true")
    # a package folder inside some other repository (an installed copy in a .venv) is not it
    assert git_state(repo / "pneumonia") == ("unknown", "unknown")


def _run(synthetic_root: Path, tmp_path: Path, name: str, seed: int) -> tuple[dict, dict]:
    cfg = compose_train(tmp_path, ["experiment=demo", f"data.root={synthetic_root}",
                                   "data.synthetic=null", "debug=short", "model.input_size=64",
                                   "data.batch_size=4", "trainer.deterministic=true",
                                   "callbacks.early_stopping=null", f"seed={seed}"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / name)
    result = train(cfg)
    client = MlflowClient(cfg.paths.tracking_uri)
    run = client.get_run(result["run_id"])
    history = {key: [m.value for m in client.get_metric_history(run.info.run_id, key)]
               for key in sorted(run.data.metrics) if key.startswith(("val/", "best/"))}
    return run, history


@pytest.mark.slow
def test_same_seed_same_metrics_and_the_run_records_its_environment(synthetic_root, tmp_path):
    first, history = _run(synthetic_root, tmp_path, "a", seed=0)
    _, again = _run(synthetic_root, tmp_path, "b", seed=0)
    _, other = _run(synthetic_root, tmp_path, "c", seed=1)
    assert "val/auroc" in history and len(history["val/loss"]) == 2
    assert again == history  # exact equality, every epoch
    assert other["val/loss"] != history["val/loss"]  # the seed matters, so the test can fail

    import torch

    tags = first.data.tags
    try:
        commit = _git(REPO, "rev-parse", "HEAD")
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    assert tags["git_commit"] == commit and tags["git_dirty"] in ("true", "false", "unknown")
    assert tags["version/torch"] == torch.__version__.split("+")[0]
    assert {f"version/{p}" for p in (*PACKAGES, "python")} <= set(tags)
    env = json.loads((tmp_path / "a" / "environment.json").read_text())
    assert {f"version/{k}" if not k.startswith("git_") else k: v for k, v in env.items()} == {
        k: v for k, v in tags.items() if k.startswith(("version/", "git_"))}
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert "environment.json" in {a.path for a in client.list_artifacts(first.info.run_id)}
