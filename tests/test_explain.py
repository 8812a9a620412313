"""Explanations: attribution correctness, every input format, bad files, untouched inputs."""

import csv
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from captum.attr import Occlusion
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from PIL import Image
from torch import nn

from pneumonia.errors import ConfigError, ImageReadError, OutputError
from pneumonia.explain.attribution import Probabilities, attribution_map, occlusion_map
from pneumonia.explain.run import explain, explained_pipeline
from pneumonia.io import read_grayscale
from pneumonia.models import build_network
from pneumonia.pipeline import TwoStagePipeline
from tests.conftest import CONF, read_only, tree_hashes


def test_batched_occlusion_equals_captum_one_at_a_time():
    torch.manual_seed(0)
    net = build_network("resnet18", input_size=48).eval()
    images, target = torch.randn(3, 1, 48, 48), torch.tensor([1, 0, 1])
    batched = occlusion_map(net, images, target, window=15, stride=10, baseline=-0.5,
                            perturbations_per_eval=16)
    for i in range(3):
        single = Occlusion(Probabilities(net)).attribute(
            images[i:i + 1], sliding_window_shapes=(1, 15, 15), strides=(1, 10, 10),
            baselines=-0.5, target=int(target[i]), perturbations_per_eval=1)
        torch.testing.assert_close(batched[i], single[0, 0], atol=1e-6, rtol=1e-5)


class RegionModel(nn.Module):
    """Says "pneumonia" in proportion to the brightness of one known region."""

    region = (slice(30, 50), slice(10, 30))  # rows, columns

    def forward(self, x):
        score = x[:, :, self.region[0], self.region[1]].mean(dim=(1, 2, 3))
        return torch.stack([-score, score], dim=1) * 4


@pytest.mark.parametrize("method, mode", [("occlusion", "exact"), ("occlusion", "approximate"),
                                          ("integrated_gradients", "exact")])
def test_heatmap_peaks_in_the_region_the_decision_depends_on(method, mode):
    images = torch.rand(2, 1, 64, 64)
    maps = attribution_map(method, RegionModel(), images, torch.tensor([1, 1]),
                           window=15, stride=5, baseline=0.0, occlusion_mode=mode)
    rows, cols = RegionModel.region
    for m in maps:
        r, c = np.unravel_index(int(m.argmax()), m.shape)
        assert rows.start <= r < rows.stop and cols.start <= c < cols.stop, (method, r, c)
        outside = m.clone()
        outside[rows, cols] = 0
        assert m[rows, cols].sum() > 10 * outside.abs().sum() or outside.abs().max() < m.max() / 2


def _pixels() -> np.ndarray:
    """A gradient image that spans 0..255 exactly, so every format keeps the same pixels: the
    black and white patches exceed the 0.5% tails that the 16-bit window (pneumonia.io) clips."""
    y, x = np.mgrid[0:80, 0:96]
    img = ((x + y) * 255 // (79 + 95)).astype(np.uint8)
    img[20:40, 30:50] = 255
    img[50:70, 60:80] = 0
    return img


def _write_dicom(path: Path, pixels16: np.ndarray, photometric: str) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = (meta.MediaStorageSOPClassUID,
                                         meta.MediaStorageSOPInstanceUID)
    ds.PatientName, ds.PatientID = "Doe^Jane", "PID-998877"
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels16.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pixels16.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_every_input_format_reads_to_the_same_pixels(tmp_path):
    img = _pixels()
    Image.fromarray(img).save(tmp_path / "gray.png")
    Image.fromarray(img).convert("RGB").save(tmp_path / "rgb.png")
    rgba = np.dstack([img, img, img, np.full_like(img, 128)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(img.astype(np.uint16) * 257).save(tmp_path / "deep16.png")
    _write_dicom(tmp_path / "mono2.dcm", img.astype(np.uint16) * 257, "MONOCHROME2")
    _write_dicom(tmp_path / "mono1.dcm", 65535 - img.astype(np.uint16) * 257, "MONOCHROME1")
    for name in ("gray.png", "rgb.png", "rgba.png", "deep16.png", "mono2.dcm", "mono1.dcm"):
        np.testing.assert_array_equal(read_grayscale(tmp_path / name), img, err_msg=name)
    assert Image.open(tmp_path / "deep16.png").mode.startswith("I")


def test_dicom_without_pixel_data_is_named(tmp_path):
    path = _write_dicom(tmp_path / "scan.dcm", np.zeros((4, 4), np.uint16), "MONOCHROME2")
    import pydicom

    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)
    with pytest.raises(ImageReadError, match="scan.dcm: DICOM file has no pixel data"):
        read_grayscale(path)


def _explain_cfg(work: Path, input_dir: Path, out: Path, runs: dict, **values):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("explain", overrides=[f"input={input_dir}", "batch_images=3"])
    with open_dict(cfg):
        cfg.paths.work_dir = str(work)
        cfg.paths.tracking_uri = f"sqlite:///{work}/mlflow.db"
        cfg.paths.output_dir = str(out)
        cfg.binary = runs["binary"]["best_checkpoint"]
        cfg.subtype = runs["subtype"]["run_id"]
        cfg.uncalibrated = True
        for key, value in values.items():
            cfg[key] = value
    return cfg


@pytest.fixture
def xray_folder(tmp_path, synthetic_root) -> Path:
    """Real-layout images in every supported format, plus bad files."""
    folder = tmp_path / "incoming"
    folder.mkdir()
    sources = sorted((synthetic_root / "test" / "PNEUMONIA").glob("*.jpeg"))[:2]
    for src in sources:
        shutil.copy(src, folder / src.name)
    pixels = read_grayscale(sources[0])
    pixels = ((pixels - pixels.min()) * (255.0 / (pixels.max() - pixels.min()))).astype(np.uint8)
    pixels[:, :4], pixels[:, -4:] = 0, 255  # over the 0.5% tails: 16-bit copies window to 0..255
    Image.fromarray(pixels).save(folder / "same.png")
    _write_dicom(folder / "same.dcm", pixels.astype(np.uint16) * 257, "MONOCHROME2")
    Image.fromarray(pixels.astype(np.uint16) * 257).save(folder / "deep16.png")
    (folder / "empty.jpeg").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")
    good = sources[0].read_bytes()
    (folder / "truncated.jpeg").write_bytes(good[: len(good) // 3])
    (folder / "text.jpeg").write_text("a text file named .jpeg")
    nopix = _write_dicom(folder / "nopixels.dcm", np.zeros((4, 4), np.uint16), "MONOCHROME2")
    import pydicom

    ds = pydicom.dcmread(nopix)
    del ds.PixelData
    ds.save_as(nopix)
    (folder / ".DS_Store").write_bytes(b"\x00")
    return folder


def test_stages_are_explained_only_when_marked_uncalibrated(trained, tmp_path, monkeypatch):
    work, runs = trained
    folder = tmp_path / "in"
    folder.mkdir()
    with pytest.raises(ConfigError, match="or binary=... subtype=... uncalibrated=true"):
        explain(_explain_cfg(work, folder, tmp_path / "a", runs, uncalibrated=False))
    # marked, the stages are explained at temperature 1 and threshold 0.5: nothing is fitted
    monkeypatch.setattr(TwoStagePipeline, "calibrate", lambda *a, **k: pytest.fail("fitted"))
    pipeline = explained_pipeline(_explain_cfg(work, folder, tmp_path / "b", runs), tmp_path / "d")
    cal = pipeline.calibration
    assert (cal.temperature, cal.thresholds) == ({"binary": 1.0, "subtype": 1.0},
                                                 {"binary": {"default": 0.5},
                                                  "subtype": {"default": 0.5}})


@pytest.mark.slow
def test_explain_a_folder(trained, xray_folder, tmp_path):
    work, runs = trained
    before = tree_hashes(xray_folder)
    out = tmp_path / "explained"
    with read_only(xray_folder):  # as a user would find it (the hashes are the proof under root)
        result = explain(_explain_cfg(work, xray_folder, out, runs, window=15, stride=10))
    assert tree_hashes(xray_folder) == before  # inputs are byte-for-byte unchanged

    rows = {r["file"]: r for r in csv.DictReader((out / "summary.csv").open())}
    assert ".DS_Store" not in rows
    failed = {f: r["reason"] for f, r in rows.items() if r["status"] != "ok"}
    assert failed == {
        "empty.jpeg": "empty file",
        "notes.txt": "unsupported file type (suffix .txt); expected JPEG (.jpeg, .jpg), PNG (.png) "
                     "or DICOM (.dcm)",
        "nopixels.dcm": "DICOM file has no pixel data",
        "truncated.jpeg": failed.get("truncated.jpeg"),
        "text.jpeg": failed.get("text.jpeg"),
    }
    assert failed["truncated.jpeg"].startswith("cannot decode") \
        and failed["text.jpeg"].startswith("cannot decode")
    assert result["failed"] == 5
    ok = {f: r for f, r in rows.items() if r["status"] == "ok"}
    assert len(ok) == 5
    for row in ok.values():
        assert (out / row["report"]).stat().st_size > 0
        probs = [float(row[f"p_{c}"]) for c in ("normal", "bacterial", "viral")]
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)
        assert float(row["attribution_seconds"]) > 0
    # the same pixels as DICOM, 16-bit PNG and 8-bit PNG give the same probabilities
    for name in ("same.dcm", "deep16.png"):
        for c in ("normal", "bacterial", "viral"):
            assert float(ok[name][f"p_{c}"]) == pytest.approx(float(ok["same.png"][f"p_{c}"]),
                                                              abs=1e-6)
    index = (out / "index.html").read_text()
    assert all(row["report"] in index for row in ok.values()) and "nopixels.dcm" in index
    assert "not for clinical use" in index  # the model's intended use heads the page
    # DICOM patient identifiers never reach any output
    for path in out.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert b"Doe^Jane" not in data and b"PID-998877" not in data, path

    from mlflow.tracking import MlflowClient

    artifacts = {a.path for a in MlflowClient(f"sqlite:///{work}/mlflow.db").list_artifacts(result["run_id"])}
    assert {"summary.csv", "index.html", "reports"} <= artifacts

    # never overwritten without the flag, never written inside the input folder
    with read_only(xray_folder), pytest.raises(OutputError, match="already holds results"):
        explain(_explain_cfg(work, xray_folder, out, runs))
    with read_only(xray_folder), pytest.raises(OutputError, match="overlaps the input"):
        explain(_explain_cfg(work, xray_folder, xray_folder / "out", runs))
    assert tree_hashes(xray_folder) == before


@pytest.mark.slow
@pytest.mark.parametrize("options, stage", [({"method": "gradcam"}, "binary"),
                                            ({"method": "integrated_gradients"}, "subtype"),
                                            ({"occlusion_mode": "approximate"}, "binary")])
def test_other_methods_give_the_same_report_layout(trained, synthetic_root, tmp_path, options,
                                                   stage):
    work, runs = trained
    folder = tmp_path / "in"
    folder.mkdir()
    for src in sorted((synthetic_root / "test" / "NORMAL").glob("*.jpeg"))[:2]:
        shutil.copy(src, folder / src.name)
    out = tmp_path / "out"
    result = explain(_explain_cfg(work, folder, out, runs, **options, explain_stage=stage,
                                  log_to_mlflow=False))
    assert result["failed"] == 0 and len(result["rows"]) == 2
    assert {r["explained_class"] for r in result["rows"]} <= ({"normal", "pneumonia"}
                                                             if stage == "binary"
                                                             else {"bacterial", "viral"})
    assert all((out / r["report"]).is_file() for r in result["rows"])


@pytest.mark.slow
def test_awkward_names_and_entries_each_get_their_own_row(trained, synthetic_root, tmp_path):
    work, runs = trained
    folder = tmp_path / "in"
    folder.mkdir()
    pixels = read_grayscale(next((synthetic_root / "test" / "NORMAL").glob("*.jpeg")))
    names = ["x.png", "x.jpeg", "X.PNG", "=HYPERLINK(1).png", "a#b?%.png"]
    for name in names:
        Image.fromarray(pixels).save(folder / name,
                                     format="JPEG" if name.endswith("jpeg") else "PNG")
    undecodable = os.fsencode(str(folder)) + b"/bad\xff.png"
    shutil.copy(folder / "x.png", os.fsdecode(undecodable))
    outside = tmp_path / "outside.png"
    shutil.copy(folder / "x.png", outside)
    (folder / "link.png").symlink_to(outside)
    os.mkfifo(folder / "pipe.png")
    before = sorted(os.listdir(folder))
    out = tmp_path / "out"
    result = explain(_explain_cfg(work, folder, out, runs, log_to_mlflow=False, stride=15))
    rows = {r["file"]: r for r in result["rows"]}
    assert sorted(os.listdir(folder)) == before
    ok = {f for f, r in rows.items() if r["status"] == "ok"}
    assert ok == {*names, "bad\ufffd.png"}
    assert rows["link.png"]["reason"] == ("symbolic link to a file outside the input folder; "
                                          "not followed")
    assert rows["pipe.png"]["reason"].startswith("a named pipe (FIFO)")
    reports = [rows[f]["report"] for f in ok]
    assert len({r.lower() for r in reports}) == len(reports)  # no report replaces another
    assert all((out / r).is_file() for r in reports)
    index = (out / "index.html").read_text()
    assert 'href="reports/a%23b%3F%25.png.png"' in index
    summary = (out / "summary.csv").read_text()  # a spreadsheet shows the name, runs no formula
    assert "\n'=HYPERLINK(1).png,ok," in summary and "\n=HYPERLINK" not in summary


def test_a_window_larger_than_the_input_is_refused(trained, tmp_path):
    work, runs = trained
    folder = tmp_path / "in"
    folder.mkdir()
    with pytest.raises(ValueError,
                       match="window=65 is larger than the binary stage's input .64 px"):
        explain(_explain_cfg(work, folder, tmp_path / "out", runs, window=65, log_to_mlflow=False))


@pytest.mark.slow
def test_only_chest_radiographs_are_diagnosed_unless_asked(trained, tmp_path):
    import pydicom

    work, runs = trained
    folder = tmp_path / "in"
    folder.mkdir()
    scan = _write_dicom(folder / "scan.dcm", _pixels().astype(np.uint16) * 257, "MONOCHROME2")
    ds = pydicom.dcmread(scan)
    ds.Modality = "CT"
    ds.save_as(scan)
    rows = explain(_explain_cfg(work, folder, tmp_path / "a", runs, log_to_mlflow=False))["rows"]
    assert [(r["status"], r["reason"]) for r in rows] == [
        ("not a chest radiograph", "not a chest radiograph (Modality=CT)")]
    assert "p_normal" not in rows[0]  # no probabilities, no decision
    # (a gradient image is unlike the training X-rays: the OOD gate is waived here too)
    result = explain(_explain_cfg(work, folder, tmp_path / "b", runs, log_to_mlflow=False,
                                  accept_any_modality=True, accept_ood=True))
    assert result["rows"][0]["status"] == "ok"
    assert "accept_any_modality=true" in (tmp_path / "b" / "index.html").read_text()
