"""The preprocessed cache: same pixels as the plain path, rebuilt when anything changes."""

import os
import shutil

import numpy as np
import pytest
import torch

from pneumonia.data.cache import build_cache, cache_key, decode_preprocessed
from pneumonia.data.kermany import scan_kermany
from pneumonia.data.transforms import Preprocessing
from pneumonia.errors import DataError
from pneumonia.io import read_grayscale
from tests.conftest import SHARED_DATA, compose_train, corrupt_pixels, needs_real_data

# JPEG draft mode decodes at a reduced scale: the tolerance we hold it to, in grey levels.
DRAFT_MEAN_TOLERANCE, DRAFT_P99_TOLERANCE = 1.0, 4


def _check_close(path, pre):
    plain = pre(read_grayscale(path)).astype(int)
    cached = decode_preprocessed(path, pre).astype(int)
    diff = np.abs(plain - cached)
    assert (diff.mean() <= DRAFT_MEAN_TOLERANCE
            and np.percentile(diff, 99) <= DRAFT_P99_TOLERANCE), path


@needs_real_data
@pytest.mark.parametrize("size", [224, 299, 512])
def test_draft_decode_matches_full_decode_on_full_size_xrays(size):
    samples = sorted((SHARED_DATA / "samples").glob("*.jpeg"))
    pre = Preprocessing(size, 0.5, 0.25, crop=dict(max_width=1857, max_height=1317))
    for path in samples:
        _check_close(path, pre)


def test_cached_images_equal_decoded_images(synthetic_root, tmp_path):
    from pneumonia.train import build_datamodule

    plain = build_datamodule(compose_train(tmp_path, [f"data.root={synthetic_root}",
                                                      "data.cache=false", "model.input_size=96"]))
    cached = build_datamodule(compose_train(tmp_path, [f"data.root={synthetic_root}",
                                                       "data.cache=true", "model.input_size=96"]))
    pre = cached.preprocessing
    plain_images = torch.stack([plain.dataset("val")[i][0]
                                for i in range(len(plain.splits["val"]))])
    normalised = torch.stack([cached.dataset("val")[i][0]
                              for i in range(len(cached.splits["val"]))])
    assert normalised.dtype == torch.float32 and normalised.shape == plain_images.shape
    diff = (normalised - plain_images).abs() * pre.std * 255  # in grey levels
    assert diff.mean() <= DRAFT_MEAN_TOLERANCE


@pytest.fixture
def data(synthetic_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    return root


def test_cache_is_reused_and_rebuilt_when_a_file_or_setting_changes(data, tmp_path):
    records = [r for r in scan_kermany(data) if r.folder == "train"][:20]
    pre = Preprocessing(64, 0.5, 0.25)
    cache = tmp_path / "cache"
    first = build_cache(records, pre, cache)
    files = sorted(cache.glob("*.u8"))
    mtime = files[0].stat().st_mtime_ns
    again = build_cache(records, pre, cache)
    assert sorted(cache.glob("*.u8")) == files and files[0].stat().st_mtime_ns == mtime  # reused
    np.testing.assert_array_equal(first, again)
    assert cache_key(records, Preprocessing(96, 0.5, 0.25)) != cache_key(records, pre)
    assert cache_key(records, Preprocessing(64, 0.5, 0.25,
                                            crop=dict(max_width=300, max_height=300))) \
        != cache_key(records, pre)
    # a file rewritten with other pixels
    target = records[3].path
    shutil.copy(records[4].path, target)
    os.utime(target, ns=(mtime + 10**9, mtime + 10**9))
    rebuilt = build_cache(records, pre, cache)
    np.testing.assert_array_equal(rebuilt[3], decode_preprocessed(records[4].path, pre))
    assert len(list(cache.glob("*.u8"))) == 2


def test_damaged_cache_is_detected_and_rebuilt(data, tmp_path):
    records = [r for r in scan_kermany(data) if r.folder == "train"][:10]
    pre = Preprocessing(48, 0.5, 0.25)
    cache = tmp_path / "cache"
    good = np.array(build_cache(records, pre, cache))
    array_file = next(cache.glob("*.u8"))
    raw = bytearray(array_file.read_bytes())
    raw[100:200] = bytes(100)  # silently damaged bytes, same size
    array_file.write_bytes(bytes(raw))
    np.testing.assert_array_equal(build_cache(records, pre, cache), good)
    array_file.write_bytes(bytes(raw[:500]))  # truncated
    np.testing.assert_array_equal(build_cache(records, pre, cache), good)


def test_undecodable_images_are_all_named_before_training(data, tmp_path):
    records = [r for r in scan_kermany(data) if r.folder == "train"][:10]
    for r in records[2:4]:
        corrupt_pixels(r.path, r.path)
    scan_kermany(data)  # their headers still pass the scan: only decoding finds them
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as err:
        build_cache(records, Preprocessing(48, 0.5, 0.25), cache)
    message = str(err.value)
    assert message.startswith("2 undecodable image file(s)") and "data.skip_bad=true" in message
    for r in records[2:4]:
        assert f"{r.path}: cannot decode image (broken data stream" in message
    assert not list(cache.iterdir())  # no cache, not even a temporary file, is left


@pytest.fixture
def file_size_limit():
    """Files this process writes may not grow past the given size (SIGXFSZ ignored, so the
    write fails with EFBIG instead of killing the process), as on a nearly full disk."""
    import resource
    import signal

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    yield lambda size: resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, handler)


def test_a_cache_that_does_not_fit_is_a_clear_error_before_any_write(data, tmp_path,
                                                                     file_size_limit):
    records = [r for r in scan_kermany(data) if r.folder == "train"][:10]
    cache = tmp_path / "cache"
    file_size_limit(10 * 64 * 64 - 1)  # one byte short of the (10, 64, 64) uint8 array
    with pytest.raises(OSError, match=r"cannot reserve 40,960 bytes for the cache file .*\.tmp\d+ "
                                      r".*paths\.cache_dir"):
        build_cache(records, Preprocessing(64, 0.5, 0.25), cache)
    assert not list(cache.iterdir())  # no temporary file is left behind
    file_size_limit(10 * 64 * 64)
    assert build_cache(records, Preprocessing(64, 0.5, 0.25), cache).shape == (10, 64, 64)
