"""The model folder stands alone: weights as safetensors with the JSON that rebuilds them, its
code and pinned requirements inside, no pickle loaded, metadata.json that keeps its schema."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml

from pneumonia.errors import CheckpointError
from pneumonia.metadata import SCHEMA
from pneumonia.serving import OUTPUTS, requirements, save_pipeline_model
from tests import servers
from tests.test_serving import _b64, _expected, _images, _pipeline


@pytest.fixture(scope="module")
def folder(trained, tmp_path_factory):
    """A saved model folder of the trained stages (stage 2 a two-member ensemble)."""
    _, runs = trained
    pipeline = _pipeline(runs)
    return pipeline, save_pipeline_model(pipeline, tmp_path_factory.mktemp("m") / "model")


def _weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in (folder / "artifacts").glob("*.safetensors"))


@pytest.mark.slow
def test_the_folder_holds_weights_code_and_requirements_and_no_pickle(folder):
    pipeline, folder = folder
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert not [f for f in files if f.endswith((".pkl", ".ckpt", ".pt", ".pth"))]
    artifacts = {Path(f).name for f in files if f.startswith("artifacts/")}
    assert artifacts == {"pipeline.json", "metadata.json", "binary_0.json",
                         "binary_0.safetensors", "subtype_0.json", "subtype_0.safetensors",
                         "subtype_1.json", "subtype_1.safetensors"}
    flavor = yaml.safe_load((folder / "MLmodel").read_text())["flavors"]["python_function"]
    assert "model_code_path" in flavor and "python_model" not in flavor  # run, not unpickled
    assert flavor["code"] == "code" and "code/pneumonia/serving.py" in files
    assert not [f for f in files if "__pycache__" in f]
    # complete and pinned: every dependency the project declares, at the version installed
    pinned = (folder / "requirements.txt").read_text().split()
    assert pinned == requirements()
    assert all("==" in r for r in pinned)
    assert {r.split("==")[0] for r in pinned} >= {"torch", "timm", "mlflow", "pydicom",
                                                   "python-gdcm", "safetensors", "scikit-learn"}
    assert "python_env.yaml" in files
    # no larger than its weights plus 5 %
    total = sum((folder / f).stat().st_size for f in files)
    assert total <= 1.05 * _weights_bytes(folder), (total, _weights_bytes(folder))


@pytest.mark.slow
def test_metadata_keeps_its_schema_and_declares_the_contract(folder):
    pipeline, folder = folder
    metadata = json.loads((folder / "artifacts" / "metadata.json").read_text())
    jsonschema.validate(metadata, json.loads(SCHEMA.read_text()))
    assert "not for clinical use" in metadata["intended_use"]
    assert metadata["data"]["licence"] == "CC BY 4.0"
    assert set(metadata["outputs"]) == set(OUTPUTS)
    assert metadata["thresholds"] == pipeline.stage_thresholds()
    assert metadata["weights"]["subtype"]["files"] == ["subtype_0", "subtype_1"]
    for broken in ({**metadata, "intended_use": "diagnosis"},
                   {k: v for k, v in metadata.items() if k != "outputs"}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, json.loads(SCHEMA.read_text()))


class _Plant:
    """A pickle that, if ever unpickled, writes its marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "a pickle ran"))


@pytest.mark.slow
def test_a_planted_pickle_is_never_run(folder, synthetic_root, tmp_path):
    pipeline, source = folder
    model = Path(shutil.copytree(source, tmp_path / "model"))
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Plant(marker))
    (model / "python_model.pkl").write_bytes(payload)  # where a cloudpickled model would be
    for name in ("binary_0.ckpt", "binary_0.pt"):
        (model / "artifacts" / name).write_bytes(payload)
    request = pd.DataFrame({"image": [_b64(p) for p in _images(synthetic_root, 2)]})
    out = mlflow.pyfunc.load_model(str(model)).predict(request)
    np.testing.assert_allclose(out[["p_normal", "p_bacterial", "p_viral"]].astype(float),
                               _expected(pipeline, _images(synthetic_root, 2)), atol=1e-6)
    # weights replaced by a pickle: refused as unreadable, never unpickled
    (model / "artifacts" / "binary_0.safetensors").write_bytes(payload)
    with pytest.raises(Exception) as refused:
        mlflow.pyfunc.load_model(str(model))
    assert isinstance(refused.value, CheckpointError) or "binary_0" in str(refused.value)
    assert not marker.exists()


@pytest.mark.slow
def test_mlflows_dockerfile_installs_the_folders_own_requirements(folder, tmp_path):
    # the image itself cannot be built here (no Docker daemon); what it would install can be read
    _, model = folder
    done = subprocess.run([servers.MLFLOW, "models", "generate-dockerfile", "-m", str(model),
                           "-d", str(tmp_path / "image")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    dockerfile = (tmp_path / "image" / "Dockerfile").read_text()
    assert "COPY model_dir/model /opt/ml/model" in dockerfile
    assert "_install_pyfunc_deps('/opt/ml/model'" in dockerfile  # its requirements.txt, pip
    copied = tmp_path / "image" / "model_dir" / "model"
    assert (copied / "requirements.txt").read_text() == (model / "requirements.txt").read_text()
    assert sorted(p.name for p in copied.rglob("*.safetensors")) \
        == sorted(p.name for p in model.rglob("*.safetensors"))


def _fresh_venv(folder: Path, where: Path) -> Path:
    """A virtual environment with the model folder's requirements.txt and nothing else."""
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True)
    python = where / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "-r",
                    str(folder / "requirements.txt")], check=True)
    return python


@pytest.mark.fresh_venv
def test_a_copied_folder_loads_and_serves_in_a_venv_of_its_own_requirements(folder,
                                                                             synthetic_root,
                                                                             tmp_path):
    """CI runs this (.ci/run): pip installs the folder's requirements.txt (torch from the local
    wheel cache, as the Makefile does) into an empty venv; the project is not installed."""
    pipeline, source = folder
    model = Path(shutil.copytree(source, tmp_path / "empty" / "model"))
    python = _fresh_venv(model, tmp_path / "venv")
    nowhere = tmp_path / "nothing"  # in place of the repository servers.start would add
    env = {**{k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")},
           "PYTHONPATH": str(nowhere)}
    assert subprocess.run([str(python), "-c", "import pneumonia"], cwd=tmp_path / "empty",
                          env=env, capture_output=True).returncode != 0  # not installed there
    paths = _images(synthetic_root, 3)
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"image": [_b64(p) for p in paths]}))
    script = ("import json, sys, mlflow, pandas as pd; "
              "m = mlflow.pyfunc.load_model(sys.argv[1]); "
              "out = m.predict(pd.DataFrame(json.load(open(sys.argv[2])))); "
              "print(out[['p_normal', 'p_bacterial', 'p_viral']].to_json(orient='values'))")
    done = subprocess.run([str(python), "-c", script, str(model), str(request)],
                          cwd=tmp_path / "empty", env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    got = np.array(json.loads(done.stdout.strip().splitlines()[-1]), dtype=float)
    np.testing.assert_allclose(got, _expected(pipeline, paths), atol=1e-5)
    port, log = servers.free_port(), tmp_path / "serve.log"
    process = servers.start([str(python.parent / "mlflow"), "models", "serve", "-m", str(model),
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                            log, {**env, "PATH": f"{python.parent}:{env.get('PATH', '')}"},
                            cwd=tmp_path / "empty")
    try:
        servers.wait_ready(process, f"http://127.0.0.1:{port}/ping", log)
        body = json.dumps({"dataframe_records": [{"image": _b64(p)} for p in paths]})
        from tests.test_serving import _post

        status, answer = _post(f"http://127.0.0.1:{port}/invocations", body.encode())
        assert status == 200, answer
        served = np.array([[row[c] if row[c] is not None else np.nan
                            for c in ("p_normal", "p_bacterial", "p_viral")]
                           for row in answer["predictions"]], dtype=float)
        np.testing.assert_allclose(served, _expected(pipeline, paths), atol=1e-5)
    finally:
        assert servers.stop(process) == []
