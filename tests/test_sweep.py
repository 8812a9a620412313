"""Sweeps, DDP, a real MLflow server, and the Docker files (checked statically)."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from pneumonia.errors import TrackingError
from pneumonia.train import train
from tests.conftest import REPO, compose_train

QUICK = ["model.pretrained=false", "model.input_size=64", "data.num_workers=0", "data.batch_size=8",
         "debug=short", "data.synthetic=null"]


def _train_cli(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _runs(tracking_uri: str, experiment: str):
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    return client, (client.search_runs([exp.experiment_id]) if exp else [])


@pytest.mark.slow
def test_multirun_over_two_backbones_gives_one_tagged_run_each(synthetic_root, tmp_path):
    proc = _train_cli(["-m", "model=resnet18,efficientnet_b0", f"data.root={synthetic_root}",
                       f"paths.cache_dir={tmp_path}/cache", *QUICK], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, runs = _runs(f"sqlite:///{tmp_path}/mlflow.db", "binary")
    assert sorted(r.info.run_name for r in runs) == ["binary/efficientnet_b0/seed=0",
                                                     "binary/resnet18/seed=0"]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert len({r.data.tags["sweep_id"] for r in runs}) == 1
    for run in runs:
        backbone = run.data.params["model/backbone"]
        assert f"model={backbone}" in run.data.tags["overrides"]
        assert run.data.tags["model"] == backbone and run.data.tags["stage"] == "binary"
    summary = next(tmp_path.glob("multirun/*/sweep_summary.csv")).read_text()
    assert summary.count("COMPLETED") == 2
    assert "Sweep" in proc.stdout and "val/auroc" in proc.stdout


@pytest.mark.slow
def test_a_failed_sweep_job_is_reported_and_the_others_finish(synthetic_root, tmp_path):
    proc = _train_cli(["-m", "model=resnet18", "model.backbone=notanet,resnet18",
                       f"data.root={synthetic_root}", f"paths.cache_dir={tmp_path}/cache", *QUICK],
                      tmp_path)
    assert proc.returncode == 1
    summary = next(tmp_path.glob("multirun/*/sweep_summary.csv")).read_text().splitlines()
    assert any("FAILED" in line and "notanet" in line for line in summary)
    assert any("COMPLETED" in line and "model.backbone=resnet18" in line for line in summary)
    assert "1 of 2 sweep jobs failed" in proc.stderr


@pytest.mark.slow
def test_two_process_ddp_on_cpu_checkpoints_once_and_logs_one_run(synthetic_root, tmp_path):
    cfg = compose_train(tmp_path, ["model=resnet18", f"data.root={synthetic_root}", *QUICK,
                                   "trainer.strategy=ddp_spawn", "trainer.devices=2"])
    result = train(cfg)
    client, runs = _runs(cfg.paths.tracking_uri, "binary")
    assert len(runs) == 1 and runs[0].info.run_id == result["run_id"]
    assert runs[0].info.status == "FINISHED"
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert len(checkpoints) == 2 and "last.ckpt" in checkpoints  # best + last, written once
    assert len(client.get_metric_history(result["run_id"], "val/auroc")) == 2


@pytest.mark.slow
def test_ddp_inside_a_multirun(synthetic_root, tmp_path):
    proc = _train_cli(["-m", "seed=0,1", "model=resnet18", f"data.root={synthetic_root}",
                       f"paths.cache_dir={tmp_path}/cache", *QUICK, "trainer.strategy=ddp",
                       "trainer.devices=2"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, runs = _runs(f"sqlite:///{tmp_path}/mlflow.db", "binary")
    assert sorted(r.info.run_name for r in runs) == ["binary/resnet18/seed=0",
                                                     "binary/resnet18/seed=1"]
    assert len(list(tmp_path.glob("multirun/*/*/job_result.json"))) == 2  # no sweep re-run by ranks


@pytest.mark.slow
def test_submitit_local_launcher(synthetic_root, tmp_path):
    # the database exists before the jobs start: parallel jobs racing to create it would fail
    MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").search_experiments()
    proc = _train_cli(["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                       "seed=0,1", "model=resnet18", f"data.root={synthetic_root}",
                       f"paths.cache_dir={tmp_path}/cache", *QUICK], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, runs = _runs(f"sqlite:///{tmp_path}/mlflow.db", "binary")
    assert sorted(r.info.run_name for r in runs) == ["binary/resnet18/seed=0",
                                                     "binary/resnet18/seed=1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_tracking_server_fails_fast_or_falls_back(synthetic_root, tmp_path):
    uri = f"http://127.0.0.1:{_free_port()}"
    cfg = compose_train(tmp_path, ["model=resnet18", f"data.root={synthetic_root}", *QUICK,
                                   f"logger.tracking_uri={uri}"])
    start = time.perf_counter()
    with pytest.raises(TrackingError, match="not reachable.*mlflow_fallback_to_local=true"):
        train(cfg)
    assert time.perf_counter() - start < 30
    assert not (tmp_path / "run" / "checkpoints").exists()  # failed before training
    fallback = compose_train(tmp_path, ["model=resnet18", f"data.root={synthetic_root}", *QUICK,
                                        f"logger.tracking_uri={uri}",
                                        "mlflow_fallback_to_local=true"])
    result = train(fallback)
    assert result["tracking_uri"] == fallback.paths.tracking_uri
    _, runs = _runs(fallback.paths.tracking_uri, "binary")
    assert [r.info.run_id for r in runs] == [result["run_id"]]


@pytest.mark.slow
def test_training_against_a_real_mlflow_server(synthetic_root, tmp_path):
    port = _free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port",
         str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
         "--artifacts-destination", str(tmp_path / "server-artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        import urllib.request

        for _ in range(120):
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        cfg = compose_train(tmp_path, ["model=resnet18", f"data.root={synthetic_root}", *QUICK,
                                       f"logger.tracking_uri={uri}"])
        result = train(cfg)
        client = MlflowClient(uri)
        run = client.get_run(result["run_id"])
        assert run.info.status == "FINISHED"
        assert run.data.params["model/backbone"] == "resnet18"
        assert "best/auroc" in run.data.metrics
        assert {"split_manifest.csv", "config.yaml", "checkpoints"} \
            <= {a.path for a in client.list_artifacts(run.info.run_id)}
        assert any((tmp_path / "server-artifacts").rglob("*.ckpt"))  # stored by the server
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def test_compose_file_and_dockerfile_match_the_readme_and_pyproject():
    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    assert set(compose["services"]) == {"db", "mlflow", "trainer"}
    assert set(compose["volumes"]) == {"pgdata", "mlartifacts", "work"}
    assert compose["services"]["db"]["image"].startswith("postgres")
    assert "postgresql://" in compose["services"]["mlflow"]["command"]
    trainer = compose["services"]["trainer"]
    assert any(v.endswith(":/data:ro") for v in trainer["volumes"])  # data mounted read-only
    assert trainer["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert trainer["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    assert ("USER trainer" in dockerfile
            and "pip install --no-cache-dir \".[weights]\"" in dockerfile)
    assert "python3.11" in dockerfile
    # the MLflow server image is a version pyproject accepts for the client
    import tomllib

    from packaging.requirements import Requirement

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    mlflow_req = next(Requirement(d) for d in deps if d.startswith("mlflow"))
    image_version = compose["services"]["mlflow"]["image"].rsplit(":v", 1)[1]
    assert image_version in mlflow_req.specifier
    guide = (REPO / "docs" / "scaling.md").read_text()
    assert "docker compose -f docker/compose.yaml" in guide


@pytest.mark.slow
def test_an_optuna_sweep_optimises_what_train_returns(synthetic_root, tmp_path):
    # train.py returns the monitored validation metric: Hydra's Optuna sweeper maximises it
    proc = _train_cli(["-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2",
                       "hydra.sweeper.direction=maximize", "hydra.sweeper.sampler.seed=0",
                       "optimizer.lr=interval(0.0001,0.01)", "model=resnet18",
                       f"data.root={synthetic_root}", f"paths.cache_dir={tmp_path}/cache", *QUICK],
                      tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, runs = _runs(f"sqlite:///{tmp_path}/mlflow.db", "binary")
    assert len(runs) == 2 and len({r.data.params["optimizer/lr"] for r in runs}) == 2
    best = yaml.safe_load(next(tmp_path.glob("multirun/*/optimization_results.yaml")).read_text())
    assert best["best_value"] == pytest.approx(max(r.data.metrics["best/auroc"] for r in runs))
