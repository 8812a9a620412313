"""Shared fixtures: composed configs, small synthetic data, the real X-rays when present."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

import pneumonia.config  # noqa: F401  (registers the config schemas, as train.py does)
from pneumonia.data.synthetic import make_synthetic_dataset

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # pytest -n N: the workers share the CPUs
    _threads = max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_threads)  # for the processes the tests start
    torch.set_num_threads(_threads)
# Tests that press Ctrl-C on a child process need SIGINT delivered; a test run started in the
# background (`make test &` in a script) begins with SIGINT ignored, which children inherit.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
SHARED_DATA = REPO.parent / "shared" / "data"
KERMANY224 = SHARED_DATA / "kermany224"
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))

needs_real_data = pytest.mark.skipif(
    not KERMANY224.is_dir(), reason=f"real X-rays not found at {KERMANY224}"
)


def compose_train(tmp_path: Path, overrides: list[str] = ()) -> DictConfig:
    """The training config as train.py would see it, writing only under tmp_path."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.work_dir = str(tmp_path)
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.paths.cache_dir = str(tmp_path / "cache")
        cfg.paths.tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    return cfg


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A small synthetic Kermany folder, made once per test session (read-only for tests)."""
    root = tmp_path_factory.mktemp("data") / "synthetic"
    return make_synthetic_dataset(root, patients_per_class=10, images_per_patient=2,
                                  min_size=96, max_size=200, seed=1)


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under root (follows symlinks) and every folder, to show inputs are
    untouched: no byte changed, nothing added or removed."""
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file()
                                   else "folder")
        for p in sorted(root.rglob("*")) if p.is_file() or p.is_dir()
    }


def corrupt_pixels(source: Path, dest: Path) -> Path:
    """A copy of a JPEG with a sound header and end marker but garbage entropy-coded data:
    it passes the header scan and fails to decode ("broken data stream")."""
    data = bytearray(source.read_bytes())
    n = len(data)
    data[n // 3: n // 3 + n // 4] = random.Random(0).randbytes(n // 4)
    dest.write_bytes(bytes(data))
    return dest


@contextmanager
def read_only(root: Path):
    """Files 0o444 and folders 0o555 under root (symlinks left alone), modes restored after.

    root ignores these bits, so tests that run as root prove with tree_hashes instead.
    """
    paths = [p for p in [root, *root.rglob("*")] if not p.is_symlink()]
    modes = {p: p.stat().st_mode & 0o7777 for p in paths}
    for path in paths:
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        yield root
    finally:
        for path in paths:
            path.chmod(modes[path])


@pytest.fixture
def read_only_data(synthetic_root, tmp_path) -> Path:
    """A read-only copy of the synthetic data set."""
    root = tmp_path / "read-only-data"
    shutil.copytree(synthetic_root, root)
    with read_only(root):
        yield root


@pytest.fixture(scope="session")
def trained(synthetic_root, tmp_path_factory) -> tuple[Path, dict]:
    """Both stages trained briefly on synthetic data, logged to one MLflow database."""
    from pneumonia.train import train

    work = tmp_path_factory.mktemp("work")
    runs = {}
    for stage in ("binary", "subtype"):
        cfg = compose_train(work, ["experiment=demo", f"stage={stage}",
                                   f"data.root={synthetic_root}", "data.synthetic=null",
                                   "data.num_workers=0", "model.input_size=64",
                                   "trainer.max_epochs=3", "trainer.limit_train_batches=6"])
        with open_dict(cfg):
            cfg.paths.output_dir = str(work / stage)
        runs[stage] = train(cfg)
    return work, runs
