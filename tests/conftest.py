"""Shared fixtures: composed configs, small synthetic data, the real X-rays when present."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from pneumonia.data.synthetic import make_synthetic_dataset

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
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
    return cfg


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A small synthetic Kermany folder, made once per test session (read-only for tests)."""
    root = tmp_path_factory.mktemp("data") / "synthetic"
    return make_synthetic_dataset(root, patients_per_class=10, images_per_patient=2,
                                  min_size=96, max_size=200, seed=1)


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under root (follows symlinks), to show inputs are untouched."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }
