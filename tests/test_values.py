"""Wrong option values stop evaluate.py, explain.py and the cache before any work, naming the key
and what it accepts."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import namedtuple

import pytest
from hydra import compose, initialize_config_dir

import pneumonia.evaluate  # noqa: F401  (registers evaluate.py's schema)
import pneumonia.explain.run  # noqa: F401  (registers explain.py's schema)
from pneumonia.config import check_values, validate
from pneumonia.data.cache import FREE_MARGIN, build_cache
from pneumonia.data.kermany import scan_kermany
from pneumonia.data.transforms import Preprocessing
from tests.conftest import CONF, REPO, compose_train

EVALUATE_REFUSED = {
    "bootstrap.samples=0": "bootstrap.samples=0 must be at least 1",
    "bootstrap.seed=-1": "bootstrap.seed=-1 must be at least 0",
    "target_sensitivity=2": "target_sensitivity=2.0 must be in (0, 1]",
    "target_sensitivity=0": "target_sensitivity=0.0 must be in (0, 1]",
    "operating_point=best": "operating_point='best' is not one of: youden, sensitivity, default",
    "report_split=train": "report_split='train' is not one of: test, val",
    "batch_size=0": "batch_size=0 must be at least 1",
    "num_workers=-1": "num_workers=-1 must be at least 0",
    "device=gpu": "device='gpu' is not one of: cpu, cuda, cuda:N",
    "device=cuda:x": "device='cuda:x' is not one of: cpu, cuda, cuda:N",
    "+data.rot=/x": "data={'root': None, 'rot': '/x'} must be {root: <a Kermany folder> or null}",
    "data.root=[a]": "data={'root': ['a']} must be {root: <a Kermany folder> or null}",
}
EXPLAIN_REFUSED = {
    "batch_images=0": "batch_images=0 must be at least 1",
    "stride=0": "stride=0 must be at least 1",
    "window=0": "window=0 must be in [1, 512]",
    "window=1000": "window=1000 must be in [1, 512]",
    "baseline=nan": "baseline=nan must be in [0, 1]",
    "baseline=1.5": "baseline=1.5 must be in [0, 1]",
    "limit=-1": "limit=-1 must be at least 1 (or null: every file)",
    "limit=0": "limit=0 must be at least 1",
    "perturbations_per_eval=0": "perturbations_per_eval=0 must be at least 1",
    "occlusion_mode=fast": "occlusion_mode='fast' is not one of: exact, approximate",
    "precision=16": "precision='16' is not one of: 32, bf16",
    "method=lime": "method='lime' is not one of: occlusion, gradcam, integrated_gradients",
    "operating_point=best": "operating_point='best' is not one of: youden, sensitivity, default",
}


def _compose(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(name, overrides=overrides)


@pytest.mark.parametrize("override", EVALUATE_REFUSED)
def test_evaluate_refuses_a_wrong_value(override):
    with pytest.raises(ValueError, match=re.escape(EVALUATE_REFUSED[override])):
        check_values(_compose("evaluate", [override]))


@pytest.mark.parametrize("override", EXPLAIN_REFUSED)
def test_explain_refuses_a_wrong_value(override):
    with pytest.raises(ValueError, match=re.escape(EXPLAIN_REFUSED[override])):
        check_values(_compose("explain", ["input=/some/folder", override]))


@pytest.mark.parametrize("overrides", [
    [], ["device=cuda"], ["device=cuda:1"], ["device=auto"],
    ["report_split=val", "target_sensitivity=1", "bootstrap.samples=1", "num_workers=0"],
    ["operating_point=default", "binary=[a.ckpt,b.ckpt]", "subtype=latest", "data.root=/x"],
])
def test_evaluate_accepts_valid_values(overrides):
    check_values(_compose("evaluate", overrides))


@pytest.mark.parametrize("overrides", [
    [], ["precision=bf16", "limit=1", "window=512", "stride=1", "baseline=1"],
    ["precision=32", "method=gradcam", "device=cuda:0", "limit=null"],
    ["precision=auto", "device=auto"],
])
def test_explain_accepts_valid_values(overrides):
    check_values(_compose("explain", ["input=/some/folder", *overrides]))


def test_explain_checks_the_stage_from_the_command_line():
    check_values(_compose("explain", ["input=/some/folder", "explain_stage=subtype"]))
    message = "explain_stage='normal' is not one of: binary, subtype"
    with pytest.raises(ValueError, match=re.escape(message)):
        check_values(_compose("explain", ["input=/some/folder", "explain_stage=normal"]))


def test_explain_needs_an_input_folder():
    with pytest.raises(ValueError, match=r"^input must be given \(e\.g\. input=\.\.\.\)$"):
        check_values(_compose("explain", []))


def test_a_wrong_type_fails_at_composition():
    with pytest.raises(Exception, match="bootstrap.samples=many"):
        _compose("evaluate", ["bootstrap.samples=many"])


@pytest.mark.slow
@pytest.mark.parametrize("script, overrides, message", [
    ("evaluate.py", ["bootstrap.samples=0"], EVALUATE_REFUSED["bootstrap.samples=0"]),
    ("explain.py", ["input=/some/folder", "limit=-1"], EXPLAIN_REFUSED["limit=-1"]),
])
def test_the_scripts_refuse_at_start_up(tmp_path, script, overrides, message):
    """The script exits with the message before it reads or writes anything (no database)."""
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(REPO / script), *overrides, "binary=a.ckpt", "subtype=b.ckpt",
         f"hydra.run.dir={out}",
         f"paths.tracking_uri=sqlite:///{tmp_path}/mlflow.db"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 2 and message in result.stdout
    assert "Traceback" not in result.stdout + result.stderr  # one line, not a traceback
    assert not (tmp_path / "mlflow.db").exists()
    assert list(out.rglob("*")) == []


def test_model_input_size_has_an_upper_bound(tmp_path):
    message = "model.input_size=100000 is too large (32 to 1024 pixels)"
    with pytest.raises(ValueError, match=re.escape(message)):
        validate(compose_train(tmp_path, ["data.root=/data", "model.input_size=100000"]))
    validate(compose_train(tmp_path, ["data.root=/data", "model.input_size=1024"]))


def test_a_cache_larger_than_the_free_disk_is_refused_before_any_write(
        synthetic_root, tmp_path, monkeypatch):
    records = [r for r in scan_kermany(synthetic_root) if r.folder == "train"][:10]
    needed = 10 * 64 * 64
    free = needed + FREE_MARGIN - 1  # one byte short of the cache plus the margin
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 * free, 9 * free, free))
    cache = tmp_path / "cache"
    with pytest.raises(OSError, match=re.escape(
            f"the cache in {cache} needs {needed:,} bytes (and {FREE_MARGIN:,} left free) but its "
            f"disk has {free:,} bytes free")):
        build_cache(records, Preprocessing(64, 0.5, 0.25), cache)
    assert not cache.exists()  # nothing written, not even the folder
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 * free, 9 * free, free + 1))
    assert build_cache(records, Preprocessing(64, 0.5, 0.25), cache).shape == (10, 64, 64)


@pytest.mark.parametrize("script", ["evaluate", "explain"])
def test_a_logged_model_is_given_on_the_command_line(script):
    """`model=` would name the training config group (conf/model) and fail to compose."""
    cfg = _compose(script, ["input=/some/folder", "model_uri=models:/pneumonia@champion"]
                   if script == "explain" else ["model_uri=models:/pneumonia@champion"])
    assert cfg.model_uri == "models:/pneumonia@champion"
