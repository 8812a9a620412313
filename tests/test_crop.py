import numpy as np
import pytest

from pneumonia.data.transforms import Preprocessing, ProportionalCrop


def test_largest_image_loses_35_percent_width_and_20_percent_height():
    crop = ProportionalCrop(max_width=2000, max_height=1000)
    left, top, right, bottom = crop.crop_box(2000, 1000)
    assert right - left == 1300  # (1 - 0.35) * 2000
    assert bottom - top == 800  # (1 - 0.20) * 1000
    assert (left, top) == (350, 100)  # centred


def test_smaller_images_lose_proportionally_less():
    crop = ProportionalCrop(max_width=2000, max_height=1000)
    left, top, right, bottom = crop.crop_box(1000, 500)
    # a_w = 1 - 0.35 * 1000/2000 = 0.825, a_h = 1 - 0.20 * 500/1000 = 0.9
    assert (right - left, bottom - top) == (825, 450)
    assert (left, top) == (87, 25)


def test_crop_takes_the_centre_of_the_pixels():
    image = np.arange(20 * 40, dtype=np.uint8).reshape(20, 40)
    out = ProportionalCrop(max_width=40, max_height=20)(image)
    assert out.shape == (16, 26)
    np.testing.assert_array_equal(out, image[2:18, 7:33])


def test_images_larger_than_the_training_maximum_lose_at_most_the_maximum_share():
    crop = ProportionalCrop(max_width=100, max_height=100)
    left, top, right, bottom = crop.crop_box(400, 400)
    assert (right - left, bottom - top) == (260, 320)


def test_preprocessing_resizes_and_normalises():
    pre = Preprocessing(image_size=32, mean=0.5, std=0.25,
                        crop=dict(max_width=100, max_height=80))
    image = np.full((80, 100), 255, dtype=np.uint8)
    out = pre(image)
    assert out.shape == (32, 32) and out.dtype == np.uint8
    normalised = pre.normalize(out)
    assert normalised.shape == (1, 32, 32)
    assert normalised.max() == pytest.approx((1.0 - 0.5) / 0.25)
