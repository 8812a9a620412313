"""The reader refuses bad input per file, with the file and the reason named (issue 18)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumonia.io import ImageReadError, read_grayscale


def _xray16(height: int = 160, width: int = 128) -> np.ndarray:
    """An X-ray-like 16-bit image: a smooth gradient with noise over part of the 16-bit range."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    img = 8000 + 20000 * np.sin(np.pi * x / width) * (0.5 + y / (2 * height))
    return (img + rng.normal(0, 300, img.shape)).clip(0, 65535).astype(np.uint16)


def _write_dicom(path: Path, pixels16: np.ndarray, **elements) -> Path:
    """A minimal uncompressed 16-bit MONOCHROME2 DICOM file, with extra data elements."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels16.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pixels16.astype(np.uint16).tobytes()
    for key, value in elements.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def _png(path: Path, width: int = 96, height: int = 96) -> Path:
    Image.fromarray(np.full((height, width), 100, np.uint8)).save(path, format="PNG")
    return path


# 1. Deep pixels without a window: percentiles, not min..max


def test_one_hot_pixel_does_not_flatten_a_16bit_png(tmp_path):
    img = _xray16()
    Image.fromarray(img).save(tmp_path / "clean.png")
    hot = img.copy()
    hot[5, 7] = 65535  # one saturated pixel (a burned-in marker, a dead detector element)
    Image.fromarray(hot).save(tmp_path / "hot.png")
    assert Image.open(tmp_path / "hot.png").mode.startswith("I")
    clean, read = read_grayscale(tmp_path / "clean.png"), read_grayscale(tmp_path / "hot.png")
    assert read.std() == pytest.approx(clean.std(), rel=0.02)
    assert read.std() > 60  # a min..max stretch gave about a third of this
    assert np.abs(read.astype(int) - clean).mean() < 1
    assert read[5, 7] == 255  # outside the window: clipped, not wrapped


def test_one_hot_pixel_does_not_flatten_a_dicom_without_window(tmp_path):
    img = _xray16()
    hot = img.copy()
    hot[5, 7] = 65535
    clean = read_grayscale(_write_dicom(tmp_path / "clean.dcm", img))
    read = read_grayscale(_write_dicom(tmp_path / "hot.dcm", hot))
    assert read.std() == pytest.approx(clean.std(), rel=0.02) and read.std() > 60


def test_dicom_with_a_window_keeps_it(tmp_path):
    img = _xray16()
    path = _write_dicom(tmp_path / "window.dcm", img, WindowCenter=20000, WindowWidth=2000)
    read = read_grayscale(path)
    assert (read[img < 19000] == 0).all() and (read[img > 21000] == 255).all()


def test_constant_16bit_image_is_black_not_an_error(tmp_path):
    Image.fromarray(np.full((96, 96), 3000, np.uint16)).save(tmp_path / "flat.png")
    assert (read_grayscale(tmp_path / "flat.png") == 0).all()


# 2. DICOM errors stay with their file


def test_dicom_window_width_zero_is_a_per_file_error(tmp_path):
    path = _write_dicom(tmp_path / "scan.dcm", _xray16(), WindowCenter=20000, WindowWidth=0)
    with pytest.raises(ImageReadError, match=r"scan.dcm: cannot apply the DICOM rescale or window"):
        read_grayscale(path)


def test_dicom_with_short_pixel_data_is_a_per_file_error(tmp_path):
    path = _write_dicom(tmp_path / "short.dcm", _xray16())
    import pydicom

    ds = pydicom.dcmread(path)
    ds.PixelData = ds.PixelData[:1000]
    ds.save_as(path)
    with pytest.raises(ImageReadError, match=r"short.dcm: cannot decode DICOM pixel data"):
        read_grayscale(path)
