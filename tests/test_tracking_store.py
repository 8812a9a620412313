"""Processes that start together on a fresh SQLite tracking database all get their run: one
creates the database, the others wait for it."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from sqlalchemy.exc import OperationalError

from pneumonia import tracking
from pneumonia.tracking import ensure_tracking_store, experiment_id

PROCESSES = 4


def _start_together(uri: str, artifact_dir: str, barrier, results) -> None:
    """One explain/evaluate start-up: the store, the experiment (created by whoever is first),
    a run."""
    barrier.wait(timeout=300)
    try:
        ensure_tracking_store(uri)
        client = MlflowClient(uri)
        run = client.create_run(experiment_id(client, "explain", artifact_dir))
        client.set_terminated(run.info.run_id)
        results.put(run.info.run_id)
    except Exception as err:  # reported to the test, which names it
        results.put(f"failed: {type(err).__name__}: {err}")
        raise


@pytest.mark.slow
def test_processes_starting_together_on_a_fresh_database_all_succeed(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spawn = multiprocessing.get_context("spawn")
    barrier, results = spawn.Barrier(PROCESSES), spawn.Queue()
    procs = [spawn.Process(target=_start_together,
                           args=(uri, str(tmp_path / "artifacts"), barrier, results))
             for _ in range(PROCESSES)]
    for proc in procs:
        proc.start()
    outcomes = [results.get(timeout=600) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
    assert not [o for o in outcomes if o.startswith("failed")], outcomes
    assert [p.exitcode for p in procs] == [0] * PROCESSES
    client = MlflowClient(uri)
    experiments = [e for e in client.search_experiments() if e.name == "explain"]
    assert len(experiments) == 1
    runs = client.search_runs([experiments[0].experiment_id])
    assert sorted(r.info.run_id for r in runs) == sorted(outcomes)


def test_other_uris_pass_without_touching_anything(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for uri in ("http://127.0.0.1:1", "postgresql+psycopg://u@127.0.0.1:1/db", "sqlite://"):
        ensure_tracking_store(uri)
    assert list(tmp_path.iterdir()) == []


def test_a_migration_that_still_fails_is_one_clear_line(tmp_path, monkeypatch):
    class Racing:
        def __init__(self, uri: str) -> None:
            pass

        def search_experiments(self, max_results: int) -> None:
            raise OperationalError("CREATE TABLE experiments", {}, Exception("table exists"))

    monkeypatch.setattr(tracking, "MlflowClient", Racing)
    database = Path(tmp_path) / "mlflow.db"
    with pytest.raises(RuntimeError) as err:
        ensure_tracking_store(f"sqlite:///{database}")
    message = str(err.value)
    assert "\n" not in message and err.value.__suppress_context__
    assert message.startswith(f"could not create or upgrade the MLflow database {database} "
                              "(OperationalError; another program may be creating it")
    assert "retry, or create it first" in message
