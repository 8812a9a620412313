"""A training run killed mid-epoch resumes into the same folder and MLflow run, and ends
with the same metrics as an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import REPO

ARGS = ["model=resnet18", "model.pretrained=false", "model.input_size=96", "data.num_workers=0",
        "data.batch_size=8", "data.synthetic=null", "trainer.max_epochs=3",
        "trainer.deterministic=true", "callbacks.early_stopping=null", "seed=3"]


def _command(root: Path, work: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), *ARGS, f"data.root={root}",
            f"paths.cache_dir={work}/cache", *extra]


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}


def _final_metrics(work: Path) -> tuple[str, dict, list]:
    client = MlflowClient(f"sqlite:///{work}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("binary").experiment_id])
    assert len(runs) == 1, "a resumed run must continue its MLflow run, not start another"
    run = runs[0]
    history = [m.value for m in client.get_metric_history(run.info.run_id, "val/loss")]
    return (run.info.status, {k: v for k, v in run.data.metrics.items() if k.startswith("best/")},
            history)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(synthetic_root, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    for work in (straight, killed):
        work.mkdir()
    done = subprocess.run(_command(synthetic_root, straight), cwd=straight, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    proc = subprocess.Popen(_command(synthetic_root, killed), cwd=killed, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list(killed.glob("outputs/*/*/*/checkpoints/last.ckpt")):
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    time.sleep(0.5)  # into the second epoch
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    run_dir = next(killed.glob("outputs/*/*/*/checkpoints/last.ckpt")).parent.parent

    resumed = subprocess.run(_command(synthetic_root, killed, f"resume={run_dir}"), cwd=killed,
                             env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    status, best, history = _final_metrics(killed)
    expected_status, expected_best, expected_history = _final_metrics(straight)
    assert status == expected_status == "FINISHED"
    assert best == pytest.approx(expected_best, rel=1e-6)
    assert history[-2:] == pytest.approx(expected_history[-2:], rel=1e-6)  # epochs 2 and 3
    assert len(list((run_dir / "checkpoints").glob("*.ckpt"))) == 2  # best + last, same folder


def test_resume_without_a_checkpoint_is_named(tmp_path):
    from pneumonia.errors import CheckpointError
    from pneumonia.train import resolve_resume

    with pytest.raises(CheckpointError, match="resume=.*no last.ckpt in .*checkpoints"):
        resolve_resume(str(tmp_path), None)
    with pytest.raises(CheckpointError, match="no such checkpoint file or run folder"):
        resolve_resume("nowhere", None)
