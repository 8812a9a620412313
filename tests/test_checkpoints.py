"""The one checkpoint module: what it resolves, what it refuses, and that it never runs code."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pneumonia.checkpoints import (
    AtomicCheckpointIO,
    CheckpointError,
    load_stage,
    local_references,
    read_checkpoint,
    resolve,
)
from pneumonia.models import StageClassifier
from pneumonia.pipeline import Calibration, TwoStagePipeline

# torch.load with this variable set and no weights_only argument unpickles anything
CRAFTED = """
import os, sys, torch
class Payload:
    def __reduce__(self):
        return (os.system, ("touch " + sys.argv[2],))
torch.save({"state_dict": {}, "hyper_parameters": {"stage": "binary", "x": Payload()}}, sys.argv[1])
"""


def _crafted(tmp_path: Path) -> tuple[Path, Path]:
    path, marker = tmp_path / "evil.ckpt", tmp_path / "pwned"
    subprocess.run([sys.executable, "-c", CRAFTED, str(path), str(marker)], check=True)
    return path, marker


def test_a_crafted_checkpoint_runs_no_code_even_when_the_environment_allows_it(tmp_path,
                                                                               monkeypatch):
    evil, marker = _crafted(tmp_path)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    for load in (lambda: load_stage(evil, "binary"),
                 lambda: AtomicCheckpointIO().load_checkpoint(evil)):
        with pytest.raises(CheckpointError, match="evil.ckpt: not a loadable checkpoint"):
            load()
    assert not marker.exists()
    # the same file through torch's default would have run it: the test can fail
    torch.load(evil, map_location="cpu")
    assert marker.exists()


def _module(stage: str = "binary") -> StageClassifier:
    return StageClassifier(
        model={"name": "resnet18", "backbone": "resnet18", "input_size": 32},
        classes=["normal", "pneumonia"],
        stage=stage, preprocessing={"image_size": 32, "mean": 0.5, "std": 0.25},
        optimizer={"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1})


def _save(module: StageClassifier, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "mlflow_run_id": "abc"}, path)
    return path


def test_a_saved_stage_loads_with_its_weights_and_run_id(tmp_path):
    torch.manual_seed(0)
    module = _module()
    loaded = load_stage(_save(module, tmp_path / "best.ckpt"), "binary")
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(loaded(x), module.eval()(x))
    assert loaded.mlflow_run_id == "abc" and not loaded.training


def test_broken_checkpoints_are_refused_with_their_reason(tmp_path):
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty.ckpt: empty file \(0 bytes\)"):
        read_checkpoint(empty)
    module = _module()
    with torch.no_grad():
        next(module.net.parameters()).fill_(float("nan"))
    with pytest.raises(CheckpointError, match="nan.ckpt: non-finite weights"):
        load_stage(_save(module, tmp_path / "nan.ckpt"), "binary")
    with pytest.raises(CheckpointError, match="is a 'binary' checkpoint; pass it as binary="):
        load_stage(_save(_module(), tmp_path / "b.ckpt"), "subtype")


def test_references_resolve_to_local_files_and_never_to_urls(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    best = _save(_module(), tmp_path / "httpdir" / "checkpoints" / "best-epoch01.ckpt")
    last = _save(_module(), tmp_path / "httpdir" / "checkpoints" / "last.ckpt")
    # a relative path that merely starts with "http" is a file (Lightning took it for a URL)
    assert resolve("httpdir/checkpoints/last.ckpt", "binary", None, tmp_path) == last
    assert AtomicCheckpointIO().load_checkpoint(
        "httpdir/checkpoints/last.ckpt")["mlflow_run_id"] == "abc"
    assert resolve("httpdir", "binary", None, tmp_path) == best
    assert resolve("httpdir", "resume", None, tmp_path, last=True) == last
    with pytest.raises(CheckpointError, match="not fetched from URLs"):
        resolve("https://example.org/b.ckpt", "binary", None, tmp_path)
    with pytest.raises(CheckpointError, match="no last.ckpt"):
        resolve(tmp_path, "resume", None, tmp_path, last=True)
    assert local_references(["httpdir", "0123456789abcdef0123456789abcdef", None]) \
        == [Path("httpdir")]


def test_a_non_finite_output_never_becomes_a_diagnosis():
    pipeline = TwoStagePipeline(None, None, Calibration({"binary": 1.0, "subtype": 1.0},
                                                        {"binary": {"youden": 0.5},
                                                         "subtype": {"youden": 0.5}},
                                                        0.99))
    logits = {"binary": np.array([[0.0, 2.0], [np.nan, np.nan], [0.0, np.inf]]),
              "subtype": np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])}
    pred = pipeline.predict_logits(logits)
    assert pred.decision.tolist() == [1, -1, -1]


@pytest.mark.slow
def test_sigterm_and_ctrl_c_exit_non_zero_and_say_how_to_go_on(synthetic_root, tmp_path):
    import signal
    import time

    from tests.conftest import REPO

    args = ["experiment=demo", "data.synthetic=null", f"data.root={synthetic_root}", "logger=none",
            "model.input_size=64", "data.batch_size=4", "data.num_workers=0",
            "trainer.max_epochs=50", f"paths.cache_dir={tmp_path}/cache",
            "callbacks.early_stopping=null"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    for sig, code, wait_for, says in ((signal.SIGINT, 130, None, "no checkpoint was written yet"),
                                      (signal.SIGTERM, 143, "last.ckpt",
                                       "resume with: python train.py resume=")):
        run = tmp_path / f"run-{code}"
        proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args,
                                 f"hydra.run.dir={run}"],
                                cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:  # the line logged just before fit starts
            if "Training binary/" in line:
                break
        deadline = time.time() + 300
        while wait_for and not (run / "checkpoints" / wait_for).exists() and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)
        proc.send_signal(sig)
        out = proc.communicate(timeout=300)[0]
        assert proc.returncode == code, out[-3000:]
        assert says in out
