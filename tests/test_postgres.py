"""A team's set-up: an MLflow tracking server on PostgreSQL, a sweep and an evaluation logging
to it, everything read back through the server. .ci/run starts the database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests import servers

POSTGRES = os.environ.get("PNEUMONIA_TEST_POSTGRES")
TINY = ["data.synthetic=null", "data.num_workers=0", "model.input_size=64", "trainer.max_epochs=2",
        "trainer.limit_train_batches=4"]


def _script(name: str, args: list[str], cwd: Path, uri: str) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(servers.REPO),
           "XDG_CACHE_HOME": str(cwd / "cache"), "NO_ALBUMENTATIONS_UPDATE": "1"}
    done = subprocess.run([sys.executable, str(servers.REPO / name), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


def _runs_under(client: MlflowClient, stage: str, folder: Path) -> list:
    """The stage's runs whose best checkpoint lies under `folder` (the database may hold more)."""
    experiment = client.get_experiment_by_name(stage)
    runs = client.search_runs([experiment.experiment_id])
    return [r for r in runs if r.data.tags.get("best_checkpoint", "").startswith(str(folder))]


@pytest.mark.slow
@pytest.mark.skipif(not POSTGRES, reason="PNEUMONIA_TEST_POSTGRES is not set (a PostgreSQL URI; "
                                         ".ci/run starts a server and sets it)")
def test_tracking_server_on_postgres_keeps_a_sweep_and_an_evaluation(synthetic_root, tmp_path):
    port, log = servers.free_port(), tmp_path / "server.log"
    process = servers.start([servers.MLFLOW, "server", "--backend-store-uri", POSTGRES,
                             "--artifacts-destination", str(tmp_path / "artifacts"),
                             "--serve-artifacts", "--host", "127.0.0.1", "--port", str(port)], log)
    uri = f"http://127.0.0.1:{port}"
    try:
        servers.wait_ready(process, f"{uri}/health", log)
        _script("train.py", ["-m", "experiment=demo", "stage=binary,subtype",
                             f"data.root={synthetic_root}", *TINY], tmp_path, uri)
        _script("evaluate.py", ["binary=latest", "subtype=latest", "bootstrap.samples=20",
                                "num_workers=0", "register=pneumonia-postgres",
                                f"paths.output_dir={tmp_path / 'report'}"], tmp_path, uri)
        client = MlflowClient(uri)
        for stage in ("binary", "subtype"):
            (run,) = _runs_under(client, stage, tmp_path)
            assert run.info.status == "FINISHED"
            assert len(client.get_metric_history(run.info.run_id, "val/auroc")) == 2
            assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")]
        evaluation = client.get_run(client.get_model_version_by_alias(
            "pneumonia-postgres", "champion").run_id)
        saved = json.loads(Path(client.download_artifacts(
            evaluation.info.run_id, "metrics.json", str(tmp_path))).read_text())
        assert evaluation.data.metrics["pipeline/accuracy"] == pytest.approx(
            saved["pipeline"]["metrics"]["accuracy"])
        from pneumonia.serving import load_pipeline

        pipeline = load_pipeline("models:/pneumonia-postgres@champion", None, uri, tmp_path / "dl")
        assert pipeline.calibration.temperature == saved["calibration"]["temperature"]
    finally:
        assert servers.stop(process) == []
