"""The reader refuses bad input per file, with the file and the reason named (issue 18)."""

from __future__ import annotations

import os
import socket
import stat
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumonia.io import (
    MAX_ASPECT,
    MIN_SIDE,
    ImageReadError,
    display_name,
    image_size,
    read_grayscale,
    scan_inputs,
)

SAMPLES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "samples"
READERS = (image_size, read_grayscale)


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


# 3. Only JPEG, PNG and DICOM, content matching the suffix, one frame


@pytest.mark.parametrize("real, name", [("GIF", "scan.png"), ("TIFF", "scan.jpeg"),
                                        ("BMP", "scan.png"), ("PNG", "scan.jpg"),
                                        ("JPEG", "scan.png")])
def test_content_must_match_the_suffix(tmp_path, real, name):
    Image.fromarray(np.full((96, 96), 100, np.uint8)).save(tmp_path / name, format=real)
    for reader in READERS:
        with pytest.raises(ImageReadError, match=rf"{name}: content is {real}, not "):
            reader(tmp_path / name)


def test_dcm_must_be_dicom(tmp_path):
    _png(tmp_path / "scan.dcm")
    (tmp_path / "notes.dcm").write_text("patient notes\n" * 20)
    for reader in READERS:
        with pytest.raises(ImageReadError, match=r"scan.dcm: content is PNG, not DICOM"):
            reader(tmp_path / "scan.dcm")
        with pytest.raises(ImageReadError, match=r"notes.dcm: not a readable DICOM file"):
            reader(tmp_path / "notes.dcm")


def test_dicom_named_png_says_rename(tmp_path):
    path = _write_dicom(tmp_path / "scan.png", _xray16())
    with pytest.raises(ImageReadError, match=r"scan.png: content is DICOM, not PNG; rename"):
        read_grayscale(path)


@pytest.mark.parametrize("suffix", [".gif", ".tif", ".bmp", ".webp", ""])
def test_other_suffixes_are_refused(tmp_path, suffix):
    path = _png(tmp_path / f"scan{suffix}")
    for reader in READERS:
        with pytest.raises(ImageReadError, match=r"unsupported file type.*JPEG.*PNG.*DICOM"):
            reader(path)


def test_animated_png_is_refused_with_its_frame_count(tmp_path):
    frames = [Image.fromarray(np.full((96, 96), v, np.uint8)) for v in (0, 100, 200)]
    frames[0].save(tmp_path / "anim.png", save_all=True, append_images=frames[1:])
    for reader in READERS:
        with pytest.raises(ImageReadError, match=r"anim.png: 3 frames"):
            reader(tmp_path / "anim.png")


def test_multi_frame_dicom_is_refused_with_its_frame_count(tmp_path):
    path = _write_dicom(tmp_path / "cine.dcm", np.stack([_xray16()] * 2), NumberOfFrames=2)
    for reader in READERS:
        with pytest.raises(ImageReadError, match=r"cine.dcm: 2 frames"):
            reader(path)


def test_fifo_given_to_the_reader_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    errors = []

    def read() -> None:
        try:
            read_grayscale(fifo)
        except ImageReadError as err:
            errors.append(err)

    worker = threading.Thread(target=read, daemon=True)
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), "the reader opened the FIFO and waits for a writer"
    assert "named pipe (FIFO), not an image file" in str(errors[0])


def test_missing_file_is_named_as_missing(tmp_path):
    for reader in READERS:
        with pytest.raises(ImageReadError, match=r"gone.jpeg: no such file"):
            reader(tmp_path / "gone.jpeg")


# 4. Size and shape


@pytest.mark.parametrize("width, height, reason", [
    (1, 1, "image too small"), (MIN_SIDE - 1, 200, "image too small"),
    (20000, 20, "image too small"),
    (400, 70, "implausible shape"), (70, 400, "implausible shape"),
])
def test_tiny_or_elongated_images_are_refused(tmp_path, width, height, reason):
    path = _png(tmp_path / "odd.png", width, height)
    for reader in READERS:
        with pytest.raises(ImageReadError, match=rf"odd.png: {reason} .*\({width}x{height} pixels"):
            reader(path)


@pytest.mark.parametrize("width, height", [(MIN_SIDE, MIN_SIDE), (int(MIN_SIDE * MAX_ASPECT),
                                                                  MIN_SIDE)])
def test_limits_themselves_are_accepted(tmp_path, width, height):
    path = _png(tmp_path / "edge.png", width, height)
    assert image_size(path) == (width, height)
    assert read_grayscale(path).shape == (height, width)


def test_tiny_dicom_is_refused(tmp_path):
    path = _write_dicom(tmp_path / "tiny.dcm", np.zeros((8, 8), np.uint16))
    for reader in READERS:
        with pytest.raises(ImageReadError, match=r"tiny.dcm: image too small .*8x8"):
            reader(path)


def test_training_scan_names_a_tiny_image(tmp_path):
    from pneumonia.data.kermany import scan_kermany
    from pneumonia.errors import DataError

    for folder, name in (("NORMAL", "IM-0001-0001.jpeg"), ("PNEUMONIA", "person1_virus_1.jpeg")):
        (tmp_path / "train" / folder).mkdir(parents=True)
        Image.fromarray(np.full((96, 96), 100, np.uint8)).save(tmp_path / "train" / folder / name)
    Image.new("L", (1, 1)).save(tmp_path / "train" / "NORMAL" / "IM-0002-0001.jpeg")
    with pytest.raises(DataError, match=r"IM-0002-0001.jpeg: image too small"):
        scan_kermany(tmp_path)


@pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"real X-rays not found at {SAMPLES}")
def test_real_samples_pass_every_check():
    samples = sorted(SAMPLES.glob("*.jpeg"))[:6]
    assert samples
    for path in samples:
        width, height = image_size(path)
        assert read_grayscale(path).shape == (height, width)


# 5. Input folder scan for explain


def test_scan_returns_visible_files_sorted_and_skips_hidden(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / ".git").mkdir()
    for name in ("b/2.png", "a.jpeg", "notes.txt", ".DS_Store", ".git/x.png"):
        (tmp_path / name).write_bytes(b"x")
    files, problems = scan_inputs(tmp_path)
    assert files == [tmp_path / "a.jpeg", tmp_path / "b" / "2.png", tmp_path / "notes.txt"]
    assert problems == []


def test_scan_follows_links_only_inside_the_folder(tmp_path):
    inp, outside = tmp_path / "in", tmp_path / "secret"
    inp.mkdir()
    outside.mkdir()
    _png(inp / "real.png")
    _png(outside / "other.png")
    (inp / "inside.png").symlink_to(inp / "real.png")
    (inp / "escape.png").symlink_to(outside / "other.png")
    (inp / "dangling.png").symlink_to(inp / "nowhere.png")
    (inp / "loop.png").symlink_to(inp / "loop.png")
    (inp / "folder").symlink_to(outside, target_is_directory=True)
    files, problems = scan_inputs(inp)
    assert files == [inp / "inside.png", inp / "real.png"]
    reasons = {err.path.name: err.reason for err in problems}
    assert reasons == {
        "escape.png": "symbolic link to a file outside the input folder; not followed",
        "dangling.png": "broken symbolic link (its target does not exist); not followed",
        "loop.png": "broken symbolic link (its target does not exist); not followed",
        "folder": "symbolic link to a folder; not followed",
    }
    assert [err.path for err in problems] == sorted(err.path for err in problems)


def test_scan_through_a_linked_input_folder(tmp_path):
    (tmp_path / "real").mkdir()
    _png(tmp_path / "real" / "a.png")
    (tmp_path / "real" / "b.png").symlink_to(tmp_path / "real" / "a.png")
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    files, problems = scan_inputs(tmp_path / "link")
    assert [p.name for p in files] == ["a.png", "b.png"] and problems == []


def test_scan_reports_fifo_socket_and_device_without_opening_them(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    expected = {"pipe.png": "a named pipe (FIFO), not an image file; not read"}
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(tmp_path / "s.png"))
        expected["s.png"] = "a socket, not an image file; not read"
    except OSError:  # a path too long for AF_UNIX: the socket case is not shown here
        pass
    try:
        os.mknod(tmp_path / "null.png", stat.S_IFCHR | 0o600, os.makedev(1, 3))
        expected["null.png"] = "a device file, not an image file; not read"
    except (PermissionError, OSError):
        pass
    try:
        files, problems = scan_inputs(tmp_path)
    finally:
        sock.close()
    assert files == []
    assert {err.path.name: err.reason for err in problems} == expected


def test_device_files_are_problems():
    if not Path("/dev/null").exists():
        pytest.skip("no /dev/null")
    assert "device file" in _entry_reason(Path("/dev/null"))


def _entry_reason(path: Path) -> str:
    from pneumonia.io import _entry_problem

    return _entry_problem(path, path.parent)


def test_scan_of_a_missing_folder_or_a_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"input=.*nowhere does not exist or is not a"):
        scan_inputs(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"a.png does not exist or is not a folder"):
        scan_inputs(_png(tmp_path / "a.png"))


def test_non_utf8_file_names_are_read_and_displayable(tmp_path):
    raw = os.path.join(os.fsencode(tmp_path), b"\xff\xfe scan.png")
    with open(raw, "wb") as f:
        Image.fromarray(_xray16()).save(f, format="PNG")
    with open(os.path.join(os.fsencode(tmp_path), b"\xff bad.png"), "wb") as f:
        f.write(b"not an image")
    files, problems = scan_inputs(tmp_path)
    assert problems == [] and len(files) == 2
    bad, good = files
    assert read_grayscale(good).shape == (160, 128)
    assert display_name(good) == f"{display_name(tmp_path)}/\ufffd\ufffd scan.png"
    display_name(good).encode("utf-8")  # HTML, CSV and matplotlib can write it
    with pytest.raises(ImageReadError) as err:
        read_grayscale(bad)
    str(err.value).encode("utf-8")
    assert "\ufffd bad.png: cannot decode image" in str(err.value)

