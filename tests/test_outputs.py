"""The output-folder guard: inputs are never written, results never overwritten unasked, a refused
run leaves no trace, and two runs never share a folder."""

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumonia.errors import OutputError
from pneumonia.outputs import check_overlap, claim_output, release
from tests.conftest import REPO, tree_hashes


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _xrays(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((96, 96), 90, np.uint8)).save(folder / "a.png")
    return folder


@pytest.mark.parametrize("relation", ["same", "output inside input", "input inside output",
                                      "through a symlink"])
def test_any_overlap_with_an_input_is_refused_before_anything_is_written(tmp_path, relation):
    data = _xrays(tmp_path / "data" / "reports")
    before = tree_hashes(tmp_path / "data")
    output = {"same": data, "output inside input": data / "out",
              "input inside output": tmp_path / "data",
              "through a symlink": tmp_path / "link" / "x"}
    (tmp_path / "link").symlink_to(data)
    with pytest.raises(OutputError, match="overlaps the input"):
        claim_output(output[relation], [data], results=["summary.csv"], overwrite=True)
    assert tree_hashes(tmp_path / "data") == before and _listing(data) == ["a.png"]


def test_existing_results_are_kept_unless_overwrite_is_asked(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.csv").write_text("earlier")
    with pytest.raises(OutputError,
                       match="already holds results .summary.csv.*nothing was overwritten"):
        claim_output(out, results=["summary.csv", "reports"])
    assert (out / "summary.csv").read_text() == "earlier"
    assert claim_output(out, results=["summary.csv"], overwrite=True) == out.resolve()
    release(out)


@contextmanager
def _claimed_elsewhere(out: Path):
    """Another live process holding a claim on `out`."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; from pneumonia.outputs import claim_output; "
         f"claim_output({str(out)!r}); print('claimed', flush=True); time.sleep(60)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "claimed"
        yield
    finally:
        holder.kill()
        holder.wait()


def test_a_folder_in_use_by_another_live_run_is_refused(tmp_path):
    out = tmp_path / "out"
    with _claimed_elsewhere(out), pytest.raises(OutputError, match="in use by another run"):
        claim_output(out, results=["summary.csv"], overwrite=True)
    assert claim_output(out) == out.resolve()  # free again once that run is gone
    release(out)


def test_check_overlap_ignores_unset_inputs(tmp_path):
    check_overlap(tmp_path / "out", [None, tmp_path / "elsewhere"])


def _run(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_explain_into_its_own_input_writes_nothing_there(tmp_path):
    data = _xrays(tmp_path / "data")
    (data / "reports").mkdir()
    Image.fromarray(np.full((96, 96), 30, np.uint8)).save(data / "reports" / "a.png")
    before, listing = tree_hashes(data), _listing(data)
    for extra in ([f"input={data}", f"hydra.run.dir={data}"],
                  [f"input={data}/reports", f"hydra.run.dir={data}", "overwrite=true"],
                  [f"input={data}", f"hydra.run.dir={data}/new/out"]):
        done = _run("explain.py", *extra, "binary=x.ckpt", "subtype=y.ckpt", cwd=tmp_path)
        assert done.returncode == 2, done.stdout + done.stderr
        assert "overlaps the input" in done.stdout and "Traceback" not in done.stdout + done.stderr
        assert tree_hashes(data) == before and _listing(data) == listing  # no .hydra/, no log


@pytest.mark.slow
def test_a_refused_rerun_keeps_the_record_of_the_earlier_report(tmp_path):
    report = tmp_path / "report"
    (report / ".hydra").mkdir(parents=True)
    (report / "metrics.json").write_text("{}")
    (report / ".hydra" / "config.yaml").write_text("how the earlier report was made\n")
    before = tree_hashes(report)
    done = _run("evaluate.py", "binary=a.ckpt", "subtype=b.ckpt", f"hydra.run.dir={report}",
                cwd=tmp_path)
    assert done.returncode == 2 and "already holds results (metrics.json)" in done.stdout
    assert tree_hashes(report) == before


@pytest.mark.slow
def test_two_explain_runs_into_one_folder_do_not_both_write(tmp_path):
    data = _xrays(tmp_path / "data")
    out = tmp_path / "out"
    with _claimed_elsewhere(out):
        done = _run("explain.py", f"input={data}", f"hydra.run.dir={out}", "binary=a.ckpt",
                    "subtype=b.ckpt", cwd=tmp_path)
    assert done.returncode == 2 and "in use by another run" in done.stdout
    assert not (out / "summary.csv").exists()


@pytest.mark.slow
def test_a_refused_training_run_keeps_the_earlier_runs_record(synthetic_root, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"an earlier run's checkpoint")
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text("how the earlier run was made\n")
    before = tree_hashes(run)
    done = _run("train.py", "experiment=demo", "data.synthetic=null", f"data.root={synthetic_root}",
                "logger=none", f"paths.cache_dir={tmp_path}/cache", f"hydra.run.dir={run}",
                cwd=tmp_path)
    assert done.returncode == 2 and "already holds results (checkpoints)" in done.stdout
    assert tree_hashes(run) == before
