"""Bad data folders fail before any model is built, with the file or value named."""

import shutil
from pathlib import Path

import pytest

from pneumonia.data.kermany import scan_kermany
from pneumonia.errors import DataError, OutputError
from pneumonia.train import build_datamodule, train
from tests.conftest import compose_train, corrupt_pixels, tree_hashes


@pytest.fixture
def data(synthetic_root, tmp_path) -> Path:
    """A private, writable copy of the synthetic data set that a test may break."""
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    return root


def _datamodule(root: Path, tmp_path: Path, *overrides: str):
    return build_datamodule(compose_train(tmp_path, [f"data.root={root}", *overrides]))


def test_missing_root_is_named(tmp_path):
    with pytest.raises(DataError, match=r"data.root=.*/nowhere does not exist"):
        _datamodule(tmp_path / "nowhere", tmp_path)


def test_root_without_kermany_layout(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match=r"no train/ folder.*\{NORMAL,PNEUMONIA\}"):
        _datamodule(tmp_path / "images", tmp_path)


def test_missing_class_folder_is_named(data, tmp_path):
    shutil.rmtree(data / "train" / "NORMAL")
    with pytest.raises(DataError, match=r"train/NORMAL is missing"):
        _datamodule(data, tmp_path)


def test_empty_class_is_named(data, tmp_path):
    for path in (data / "train" / "PNEUMONIA").iterdir():
        path.unlink()
    with pytest.raises(DataError, match=r"train/PNEUMONIA holds no images"):
        _datamodule(data, tmp_path)


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("IM-9001-0001.jpeg", b"", "empty file"),
        ("IM-9002-0001.jpeg", b"patient notes, not an image\n", "not a readable image"),
    ],
)
def test_non_image_file_is_named(data, tmp_path, name, content, reason):
    (data / "train" / "NORMAL" / name).write_bytes(content)
    with pytest.raises(DataError, match=rf"(?s)1 unreadable image.*{name}: {reason}"):
        _datamodule(data, tmp_path)


def test_truncated_jpeg_is_named(data, tmp_path):
    good = next((data / "train" / "PNEUMONIA").glob("*.jpeg"))
    bad = good.with_name("person9999_bacteria_1.jpeg")
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DataError, match=r"person9999_bacteria_1.jpeg: truncated JPEG"):
        _datamodule(data, tmp_path)


def test_system_and_non_image_files_are_ignored(data, tmp_path):
    (data / "train" / "NORMAL" / ".DS_Store").write_bytes(b"\x00\x01binary")
    (data / "train" / "PNEUMONIA" / "Thumbs.db").write_bytes(b"\x00")
    (data / "train" / "PNEUMONIA" / "README.txt").write_text("notes")
    n_images = len(scan_kermany(data))
    assert n_images == sum(1 for _ in data.rglob("*.jpeg"))


def test_subtype_stage_without_viral_images(data, tmp_path):
    for path in data.rglob("*_virus_*.jpeg"):
        path.unlink()
    with pytest.raises(DataError,
                       match=r"stage=subtype needs bacterial and viral.*none for: viral"):
        _datamodule(data, tmp_path, "stage=subtype")
    _datamodule(data, tmp_path, "stage=binary")  # stage 1 does not need the subtype


def test_unknown_split_mode(data, tmp_path):
    with pytest.raises(DataError, match="data.split='kfold'"):
        _datamodule(data, tmp_path, "data.split=kfold")


def test_unknown_backbone_fails_before_training(data, tmp_path):
    cfg = compose_train(tmp_path, [f"data.root={data}", "model.backbone=resnet181",
                                   "model.pretrained=false", "logger=none"])
    with pytest.raises(ValueError, match="resnet181.*timm.list_models"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_bad_input_never_writes_into_the_data_folder(data, tmp_path):
    (data / "train" / "NORMAL" / "IM-9002-0001.jpeg").write_bytes(b"not an image")
    before = tree_hashes(data)
    with pytest.raises(DataError):
        _datamodule(data, tmp_path)
    assert tree_hashes(data) == before


def test_synthetic_generator_never_writes_into_a_foreign_folder(tmp_path):
    from pneumonia.data.synthetic import make_synthetic_dataset

    foreign = tmp_path / "my_xrays"
    foreign.mkdir()
    (foreign / "scan.jpeg").write_bytes(b"mine")
    with pytest.raises(OutputError, match="not a synthetic data set"):
        make_synthetic_dataset(foreign)
    assert [p.name for p in foreign.iterdir()] == ["scan.jpeg"]


def test_synthetic_generator_is_deterministic(tmp_path):
    from pneumonia.data.synthetic import make_synthetic_dataset

    a = make_synthetic_dataset(tmp_path / "a", patients_per_class=3, seed=5)
    b = make_synthetic_dataset(tmp_path / "b", patients_per_class=3, seed=5)
    assert tree_hashes(a) == tree_hashes(b)
    assert make_synthetic_dataset(tmp_path / "a", patients_per_class=3, seed=5) == a  # reused


def test_decompression_bomb_is_refused_from_its_header(tmp_path):
    from PIL import Image

    from pneumonia.errors import ImageReadError
    from pneumonia.io import image_size, read_grayscale

    bomb = tmp_path / "bomb.png"
    Image.new("1", (12000, 12000)).save(bomb)  # 144 megapixels, a few kB on disk
    for reader in (image_size, read_grayscale):
        with pytest.raises(ImageReadError, match="bomb.png: refused: too many pixels"):
            reader(bomb)


def test_cmyk_and_rgba_images_are_read_as_grayscale(tmp_path):
    import numpy as np
    from PIL import Image

    from pneumonia.io import read_grayscale

    steps = np.repeat(np.arange(0, 250, 10, dtype=np.uint8), 4)  # 100 px: over io.MIN_SIDE
    gray = Image.fromarray(np.tile(steps, (64, 1)))
    gray.convert("CMYK").save(tmp_path / "cmyk.jpeg", quality=100)
    gray.convert("RGBA").save(tmp_path / "rgba.png")
    assert np.abs(read_grayscale(tmp_path / "cmyk.jpeg").astype(int) - np.asarray(gray)).max() <= 3
    np.testing.assert_array_equal(read_grayscale(tmp_path / "rgba.png"), np.asarray(gray))


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    import os

    import torch

    from pneumonia.checkpoints import load_stage
    from pneumonia.errors import CheckpointError

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"model": Payload()}}, evil)
    with pytest.raises(CheckpointError, match="evil.ckpt: not a loadable checkpoint"):
        load_stage(evil, "binary")
    assert not marker.exists()


def _bad_files(root: Path) -> dict[Path, str]:
    """Unreadable files in three folders, with the reason each must be reported with. The last
    has a sound header: only decoding finds it."""
    text = root / "train" / "NORMAL" / "IM-9002-0001.jpeg"
    text.write_text("a text file named .jpeg\n")
    good = next((root / "test" / "PNEUMONIA").glob("*.jpeg"))
    truncated = good.with_name("person9999_bacteria_1.jpeg")
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    empty = root / "train" / "PNEUMONIA" / "person9998_virus_1.jpeg"
    empty.write_bytes(b"")
    broken = corrupt_pixels(good, root / "train" / "NORMAL" / "IM-9004-0001.jpeg")
    return {text.resolve(): "not a readable image (UnidentifiedImageError)",
            truncated.resolve(): "truncated JPEG (no end-of-image marker)",
            empty.resolve(): "empty file",
            broken.resolve(): "cannot decode image (broken data stream when reading image file)"}


@pytest.mark.slow
def test_skip_bad_trains_on_the_rest_and_records_the_skipped_files(data, tmp_path, caplog):
    import csv

    from mlflow.tracking import MlflowClient
    from omegaconf import open_dict

    bad = _bad_files(data)
    args = ["experiment=demo", f"data.root={data}", "data.synthetic=null", "debug=short",
            "model.input_size=64", "data.batch_size=4", "logger=mlflow"]

    strict = compose_train(tmp_path, args)
    with pytest.raises(DataError) as refused:
        train(strict)
    message = str(refused.value)
    assert message.startswith("3 unreadable image file(s)") and "data.skip_bad=true" in message
    for path, reason in list(bad.items())[:3]:  # the header scan; the cache build names the 4th
        assert f"{path}: {reason}" in message
    assert not (tmp_path / "run").exists()  # stopped before anything was written

    cfg = compose_train(tmp_path, [*args, "data.skip_bad=true"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "skipping")
    result = train(cfg)
    assert "Skipping 4 unreadable image file(s)" in caplog.text

    client = MlflowClient(cfg.paths.tracking_uri)
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED" and result["best_checkpoint"]
    assert run.data.params["data/skipped_files"] == "4"
    logged = Path(client.download_artifacts(run.info.run_id, "bad_files.csv", str(tmp_path / "dl")))
    rows = list(csv.DictReader(logged.open()))
    assert {Path(r["path"]): r["reason"] for r in rows} == bad and len(rows) == 4
    out = Path(cfg.paths.output_dir)
    assert (out / "bad_files.csv").read_bytes() == logged.read_bytes()
    rows = list(csv.DictReader((out / "split_manifest.csv").open()))
    manifest = {Path(r["path"]) for r in rows}
    assert not manifest & set(bad)
    assert len(manifest) == len(list(data.rglob("*.jpeg"))) - 4  # every other image is used

    # evaluation rebuilds the same split from the checkpoint's settings, bad files and all
    from pneumonia.models import StageClassifier
    from pneumonia.pipeline import TwoStagePipeline

    module = StageClassifier.load_from_checkpoint(result["best_checkpoint"])
    rebuilt = TwoStagePipeline(module, module).split()
    assert {(str(r.path), r.split) for r in rebuilt} == {(r["path"], r["split"]) for r in rows}
