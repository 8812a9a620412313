"""DICOM as a hospital archive sends it: every common transfer syntax, files without file meta,
colour-encoded grayscale, and the chest-radiograph gate (pneumonia.io)."""

from __future__ import annotations

import importlib.util
import io
import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom import uid
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate

from pneumonia.errors import ImageReadError, NotChestRadiograph
from pneumonia.io import image_size, read_dicom, read_grayscale

PATIENT_NAME, PATIENT_ID = "Doe^Jane", "PID-998877"


def _xray(bits: int = 12, height: int = 160, width: int = 128) -> np.ndarray:
    """An X-ray-like image of the given bit depth: a smooth gradient with noise."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    top = 2**bits - 1
    img = top * (0.15 + 0.6 * np.sin(np.pi * x / width) * (0.5 + y / (2 * height)))
    img = (img + rng.normal(0, top / 200, img.shape)).clip(0, top)
    return img.astype(np.uint8 if bits <= 8 else np.uint16)


def _dataset(pixels: np.ndarray, modality: str | None = "DX", **elements) -> Dataset:
    """An uncompressed (explicit VR little endian) one-frame image carrying a patient's
    identifiers, with extra data elements; 8 or 16 bits allocated from the array's type."""
    bits = 8 if pixels.dtype == np.uint8 else 16
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    sop_class = elements.pop("SOPClassUID", uid.DigitalXRayImageStorageForPresentation)
    ds.file_meta.MediaStorageSOPClassUID, ds.SOPClassUID = sop_class, sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = uid.generate_uid()
    ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
    if modality is not None:
        ds.Modality = modality
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
    ds.PhotometricInterpretation = "RGB" if pixels.ndim == 3 else "MONOCHROME2"
    if pixels.ndim == 3:
        ds.PlanarConfiguration = 0
    stored = elements.pop("BitsStored", bits)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = (bits, stored,
                                                                           stored - 1, 0)
    ds.PixelData = pixels.tobytes()
    for key, value in elements.items():
        setattr(ds, key, value)
    return ds


def _save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _refused(reader, path: Path, kind: type[ImageReadError], reason: str) -> ImageReadError:
    """Asserts the reader refuses path with exactly this reason, naming no patient identifier."""
    with pytest.raises(kind) as caught:
        reader(path)
    assert caught.value.reason == reason
    for identifier in (PATIENT_NAME, PATIENT_ID, "Doe", "Jane", "998877"):
        assert identifier not in str(caught.value)
    return caught.value


# ---------------------------------------------------------------- transfer syntaxes


def _gdcm_transcode(source: Path, target: Path, syntax: str) -> Path:
    """target: source re-encoded by GDCM to a JPEG Lossless transfer syntax (pydicom has no
    encoder for them)."""
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(str(source))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, syntax)))
    change.SetInput(reader.GetImage())
    assert change.Change()
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(target))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()
    return target


def _big_endian(ds: Dataset, path: Path) -> None:
    """pydicom writes pixel bytes as they are, so they are swapped to the file's byte order."""
    ds.PixelData = ds.pixel_array.astype(">u2").tobytes()
    ds.file_meta.TransferSyntaxUID = uid.ExplicitVRBigEndian
    _save(ds, path)


def _with_syntax(syntax: uid.UID):
    """A writer of ds to path in the given transfer syntax, by pydicom or its encoder plugins."""
    def write(ds: Dataset, path: Path) -> None:
        ds.file_meta.TransferSyntaxUID = syntax
        _save(ds, path)

    def compress(ds: Dataset, path: Path) -> None:
        ds.compress(syntax)
        _save(ds, path)

    return write if not syntax.is_compressed else compress


LOSSLESS_WRITERS = {
    uid.ImplicitVRLittleEndian: _with_syntax(uid.ImplicitVRLittleEndian),
    uid.ExplicitVRBigEndian: _big_endian,
    uid.DeflatedExplicitVRLittleEndian: _with_syntax(uid.DeflatedExplicitVRLittleEndian),
    uid.RLELossless: _with_syntax(uid.RLELossless),
    uid.JPEG2000Lossless: _with_syntax(uid.JPEG2000Lossless),
    uid.JPEGLSLossless: _with_syntax(uid.JPEGLSLossless),  # pyjpegls, in the dev extra
}


@pytest.mark.parametrize("syntax", list(LOSSLESS_WRITERS), ids=lambda s: s.name)
def test_lossless_syntax_reads_the_same_pixels_as_uncompressed(tmp_path, syntax):
    pixels = _xray(12)
    original = _save(_dataset(pixels, BitsStored=12), tmp_path / "original.dcm")
    LOSSLESS_WRITERS[syntax](_dataset(pixels, BitsStored=12), tmp_path / "encoded.dcm")
    encoded = pydicom.dcmread(tmp_path / "encoded.dcm")
    assert encoded.file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(encoded.pixel_array, pixels)
    np.testing.assert_array_equal(read_grayscale(tmp_path / "encoded.dcm"),
                                  read_grayscale(original))


@pytest.mark.parametrize("syntax", ["JPEGLosslessProcess14", "JPEGLosslessProcess14_1"])
def test_jpeg_lossless_process_14_reads_the_same_pixels(tmp_path, syntax):
    pixels = _xray(12)
    original = _save(_dataset(pixels, BitsStored=12), tmp_path / "original.dcm")
    encoded = _gdcm_transcode(original, tmp_path / "encoded.dcm", syntax)
    expected = {"JPEGLosslessProcess14": uid.JPEGLossless,
                "JPEGLosslessProcess14_1": uid.JPEGLosslessSV1}[syntax]
    assert pydicom.dcmread(encoded).file_meta.TransferSyntaxUID == expected
    np.testing.assert_array_equal(read_grayscale(encoded), read_grayscale(original))


def _assert_close(encoded: Path, original: Path, max_error: int, mean_error: float) -> None:
    """The reader's 8-bit output of a lossy file stays within the stated error of the original."""
    diff = np.abs(read_grayscale(encoded).astype(int) - read_grayscale(original).astype(int))
    assert diff.max() <= max_error and diff.mean() <= mean_error, (diff.max(), diff.mean())


def test_jpeg_baseline_reads_within_jpeg_error(tmp_path):
    pixels = _xray(8)
    original = _save(_dataset(pixels), tmp_path / "original.dcm")
    jpeg = io.BytesIO()
    Image.fromarray(pixels).save(jpeg, format="JPEG", quality=95)
    ds = _dataset(pixels)
    ds.file_meta.TransferSyntaxUID = uid.JPEGBaseline8Bit
    ds.PixelData = encapsulate([jpeg.getvalue()])
    encoded = _save(ds, tmp_path / "encoded.dcm")
    # Quality 95 on 8-bit pixels: at most 12 grey levels off anywhere, under 2 on average.
    _assert_close(encoded, original, max_error=12, mean_error=2.0)


def test_jpeg_2000_lossy_reads_within_its_error(tmp_path):
    pixels = _xray(12)
    original = _save(_dataset(pixels, BitsStored=12), tmp_path / "original.dcm")
    ds = _dataset(pixels, BitsStored=12)
    ds.compress(uid.JPEG2000, j2k_cr=[10])
    encoded = _save(ds, tmp_path / "encoded.dcm")
    assert not np.array_equal(pydicom.dcmread(encoded).pixel_array, pixels)  # really lossy
    # Compression ratio 10 on 12-bit pixels: at most 12 of 255 grey levels off, under 2 on average.
    _assert_close(encoded, original, max_error=12, mean_error=2.0)


def test_jpeg_ls_near_lossless_keeps_its_error_bound(tmp_path):
    pixels = _xray(12)
    ds = _dataset(pixels, BitsStored=12)
    ds.compress(uid.JPEGLSNearLossless, jls_error=3)
    encoded = pydicom.dcmread(_save(ds, tmp_path / "encoded.dcm"))
    diff = np.abs(encoded.pixel_array.astype(int) - pixels.astype(int))
    assert 0 < diff.max() <= 3  # NEAR=3: every stored value within 3 of the original
    assert read_grayscale(tmp_path / "encoded.dcm").shape == pixels.shape


MR_SMALL_ENCODINGS = ["MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_expb.dcm",
                      "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm",
                      "MR_small_jpeg_ls_lossless.dcm"]


@pytest.mark.parametrize("name", MR_SMALL_ENCODINGS)
def test_pydicom_reference_files_decode_to_their_uncompressed_original(name):
    def read(file):
        return read_grayscale(get_testdata_file(file), accept_any_modality=True)

    np.testing.assert_array_equal(read(name), read("MR_small.dcm"))


@pytest.mark.skipif(importlib.util.find_spec("libjpeg") is not None,
                    reason="the optional GPL decoder is installed")
def test_12_bit_jpeg_extended_names_the_optional_extra():
    path = Path(get_testdata_file("JPGExtended.dcm"))
    reason = r"cannot decode DICOM pixel data \(.*12-bit precision\); .*gpl-decoders\]$"
    with pytest.raises(ImageReadError, match=reason):
        read_grayscale(path, accept_any_modality=True)


# ---------------------------------------------------------------- no preamble, no file meta


@pytest.mark.parametrize("little_endian", [True, False], ids=["implicit-little", "explicit-big"])
def test_dataset_without_preamble_or_file_meta_is_read_with_a_warning(tmp_path, caplog,
                                                                      little_endian):
    pixels = _xray(12)
    original = _save(_dataset(pixels, BitsStored=12), tmp_path / "original.dcm")
    ds = _dataset(pixels, BitsStored=12)
    del ds.file_meta
    if not little_endian:
        ds.PixelData = pixels.astype(">u2").tobytes()
    path = tmp_path / "bare.dcm"
    ds.save_as(path, implicit_vr=little_endian, little_endian=little_endian)
    assert path.read_bytes()[128:132] != b"DICM"
    with caplog.at_level(logging.WARNING, logger="pneumonia.io"):
        np.testing.assert_array_equal(read_grayscale(path), read_grayscale(original))
    assert "bare.dcm: DICOM without preamble or file meta" in caplog.text
    assert image_size(path) == (pixels.shape[1], pixels.shape[0])


def test_text_starting_like_no_dataset_is_still_not_dicom(tmp_path):
    path = tmp_path / "notes.dcm"
    path.write_text(f"Patient {PATIENT_NAME} {PATIENT_ID}\n" * 20)
    _refused(read_grayscale, path, ImageReadError,
             "not a readable DICOM file (InvalidDicomError)")


def test_bytes_that_only_start_like_a_bare_dataset_are_not_dicom(tmp_path):
    path = tmp_path / "noise.dcm"
    noise = np.random.default_rng(1).integers(0, 256, 300, dtype=np.uint8).tobytes()
    path.write_bytes(b"\x08\x00" + noise)  # group 0008 as a bare dataset starts, then noise
    for reader in (image_size, read_grayscale):
        _refused(reader, path, ImageReadError, "not a readable DICOM file (InvalidDicomError)")


# ---------------------------------------------------------------- colour encodings


def test_rgb_with_equal_channels_reads_as_its_channel(tmp_path):
    gray = _xray(8)
    mono = _save(_dataset(gray), tmp_path / "mono.dcm")
    rgb = _save(_dataset(np.dstack([gray] * 3)), tmp_path / "rgb.dcm")
    np.testing.assert_array_equal(read_grayscale(rgb), read_grayscale(mono))


def test_ybr_full_grayscale_reads_as_its_luminance(tmp_path):
    gray = _xray(8)
    mono = _save(_dataset(gray), tmp_path / "mono.dcm")
    chroma = np.full_like(gray, 128)  # neutral chroma: R = G = B = Y after conversion
    ds = _dataset(np.dstack([gray, chroma, chroma]), PhotometricInterpretation="YBR_FULL")
    ybr = _save(ds, tmp_path / "ybr.dcm")
    np.testing.assert_array_equal(read_grayscale(ybr), read_grayscale(mono))


def test_true_colour_dicom_is_refused(tmp_path):
    gray = _xray(8)
    colour = np.dstack([gray, gray, gray])
    colour[10, 10, 2] ^= 1  # one pixel's blue differs by one level
    path = _save(_dataset(colour), tmp_path / "photo.dcm")
    _refused(read_grayscale, path, ImageReadError,
             "colour image (RGB with differing channels); expected a grayscale radiograph")


def test_palette_colour_is_refused(tmp_path):
    path = _save(_dataset(_xray(8), PhotometricInterpretation="PALETTE COLOR"), tmp_path / "p.dcm")
    for reader in (image_size, read_grayscale):
        _refused(reader, path, ImageReadError, "photometric interpretation PALETTE COLOR is not "
                                               "read; expected a grayscale radiograph")


# ---------------------------------------------------------------- the chest-radiograph gate


@pytest.mark.parametrize("modality", ["CR", "DX", "RG"])
def test_projection_radiographs_are_read(tmp_path, modality):
    path = _save(_dataset(_xray(12), modality, BitsStored=12), tmp_path / "chest.dcm")
    assert read_grayscale(path).shape == (160, 128)


@pytest.mark.parametrize("name, modality", [("CT_small.dcm", "CT"), ("MR_small.dcm", "MR")])
def test_ct_and_mr_are_refused_by_modality_unless_accepted(name, modality):
    path = Path(get_testdata_file(name))
    for reader in (image_size, read_grayscale, read_dicom):
        err = _refused(reader, path, NotChestRadiograph,
                       f"not a chest radiograph (Modality={modality})")
        assert str(pydicom.dcmread(path).PatientName) not in str(err)
    rows = int(pydicom.dcmread(path).Rows)
    assert read_grayscale(path, accept_any_modality=True).shape == (rows, rows)
    assert read_dicom(path, accept_any_modality=True).shape == (rows, rows)


@pytest.mark.parametrize("modality", ["PX", "MG", "NM", "US", "PT", "XA", "OT"])
def test_other_image_modalities_are_refused(tmp_path, modality):
    path = _save(_dataset(_xray(12), modality, BitsStored=12), tmp_path / "scan.dcm")
    _refused(read_grayscale, path, NotChestRadiograph,
             f"not a chest radiograph (Modality={modality})")


def test_rt_dose_is_refused_unless_accepted(tmp_path):
    dose = (_xray(12, 64, 64).astype(np.uint32) * 1000)
    ds = _dataset(dose.astype(np.uint16), "RTDOSE", SOPClassUID=uid.RTDoseStorage)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 32, 31
    ds.PixelData, ds.DoseGridScaling = dose.tobytes(), 1e-4
    path = _save(ds, tmp_path / "dose.dcm")
    _refused(read_grayscale, path, NotChestRadiograph, "not a chest radiograph (Modality=RTDOSE)")
    assert read_grayscale(path, accept_any_modality=True).shape == (64, 64)


def test_structured_report_without_pixels_is_refused_by_modality():
    path = Path(get_testdata_file("test-SR.dcm"))
    _refused(read_grayscale, path, NotChestRadiograph, "not a chest radiograph (Modality=SR)")
    _refused(lambda p: read_grayscale(p, accept_any_modality=True), path, ImageReadError,
             "DICOM file has no pixel data")


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")  # ' chest ': a vendor's spelling
@pytest.mark.parametrize("part", ["CHEST", "THORAX", "LUNG", " chest "])
def test_chest_body_parts_are_read(tmp_path, part):
    path = _save(_dataset(_xray(12), BitsStored=12, BodyPartExamined=part), tmp_path / "c.dcm")
    assert read_grayscale(path).shape == (160, 128)


@pytest.mark.parametrize("part", ["KNEE", "CHESTABDOMEN", "SKULL"])
def test_other_body_parts_are_refused_unless_accepted(tmp_path, part):
    path = _save(_dataset(_xray(12), BitsStored=12, BodyPartExamined=part), tmp_path / "k.dcm")
    for reader in (image_size, read_grayscale):
        _refused(reader, path, NotChestRadiograph,
                 f"not a chest radiograph (Modality=DX, BodyPartExamined={part})")
    assert read_grayscale(path, accept_any_modality=True).shape == (160, 128)


def test_secondary_capture_without_modality_is_read_with_a_warning(tmp_path, caplog):
    ds = _dataset(_xray(12), None, BitsStored=12, SOPClassUID=uid.SecondaryCaptureImageStorage)
    path = _save(ds, tmp_path / "film.dcm")
    with caplog.at_level(logging.WARNING, logger="pneumonia.io"):
        assert read_grayscale(path).shape == (160, 128)
    assert "film.dcm: DICOM Secondary Capture without Modality" in caplog.text


def test_other_objects_without_modality_are_refused(tmp_path):
    path = _save(_dataset(_xray(12), None, BitsStored=12), tmp_path / "dx.dcm")
    _refused(read_grayscale, path, NotChestRadiograph, "not a chest radiograph (Modality missing)")
    gray = _xray(8)
    colour = _dataset(np.dstack([gray] * 3), None, SOPClassUID=uid.SecondaryCaptureImageStorage)
    path = _save(colour, tmp_path / "sc_rgb.dcm")
    _refused(read_grayscale, path, NotChestRadiograph, "not a chest radiograph (Modality missing)")


def test_png_and_jpeg_carry_no_tags_and_pass_the_gate(tmp_path):
    Image.fromarray(_xray(8)).save(tmp_path / "x.png")
    Image.fromarray(_xray(8)).save(tmp_path / "x.jpeg")
    assert read_grayscale(tmp_path / "x.png").shape == read_grayscale(tmp_path / "x.jpeg").shape
