"""The training augmentation: one albumentations pipeline in the dataset, drawn from
(seed, epoch, image index), the same on the decoded and the cached path."""

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

from pneumonia.data.datamodule import EpochShuffle, XrayDataset
from pneumonia.data.kermany import scan_kermany
from pneumonia.data.transforms import Augmentation, Preprocessing
from tests.conftest import REPO, compose_train

NONE = dict(hflip=0.0, brightness=None, contrast=None)  # each test switches on what it measures
SIZE = 64


def _square(size: int = SIZE, side: int = 8, left: int | None = None,
            top: int | None = None) -> np.ndarray:
    image = np.zeros((size, size), np.uint8)
    left = (size - side) // 2 if left is None else left
    top = (size - side) // 2 if top is None else top
    image[top:top + side, left:left + side] = 255
    return image


def _centroid(image: np.ndarray) -> tuple[float, float]:
    """(x, y) of the bright pixels' centre of mass, relative to the image centre."""
    ys, xs = np.indices(image.shape)
    weight = image.astype(np.float64)
    centre = (image.shape[0] - 1) / 2
    return (xs * weight).sum() / weight.sum() - centre, (ys * weight).sum() / weight.sum() - centre


def test_flip_mirrors_the_image_and_is_drawn_with_its_probability():
    image = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
    always = Augmentation(**{**NONE, "hflip": 1.0})
    np.testing.assert_array_equal(always(image, epoch=0, index=0), image[:, ::-1])
    half = Augmentation(**{**NONE, "hflip": 0.5})
    flipped = [np.array_equal(half(image, 0, i), image[:, ::-1]) for i in range(400)]
    assert 0.4 < np.mean(flipped) < 0.6
    np.testing.assert_array_equal(Augmentation(**NONE)(image, 0, 0), image)  # nothing switched on


def test_brightness_and_contrast_stay_in_their_ranges_and_cover_them():
    flat = np.full((16, 16), 100, np.uint8)
    brightness = Augmentation(**{**NONE, "brightness": (-0.1, 0.1)})
    shifts = np.array([brightness(flat, 0, i).mean() - 100 for i in range(500)])
    # img + b * 255 with b in [-0.1, 0.1]: shifts within +-25.5 grey levels, both ends reached
    assert shifts.min() >= -25.5 - 1 and shifts.max() <= 25.5 + 1
    assert shifts.min() < -20 and shifts.max() > 20 and abs(shifts.mean()) < 3
    contrast = Augmentation(**{**NONE, "contrast": (0.0, 0.1)})
    gains = np.array([contrast(flat, 0, i).mean() / 100 for i in range(500)])
    # img * (1 + c), c in [0, 0.1]: albumentations 2.0.8 does not centre contrast on the mean
    assert gains.min() >= 1.0 - 0.01 and gains.max() <= 1.1 + 0.01
    assert gains.min() < 1.02 and gains.max() > 1.08


def test_zoom_stays_within_its_limits_and_keeps_the_aspect_ratio():
    zoom = Augmentation(**{**NONE, "scale": (0.9, 1.15)})
    square = _square(side=16)
    sides = []
    for i in range(100):
        out = zoom(square, 0, i) > 127
        rows, cols = np.flatnonzero(out.any(1)), np.flatnonzero(out.any(0))
        height, width = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
        assert abs(height - width) <= 1  # one zoom for both axes: a square stays a square
        sides.append(width / 16)
    assert min(sides) >= 0.9 - 1 / 16 and max(sides) <= 1.15 + 1 / 16
    assert min(sides) < 0.95 and max(sides) > 1.1


def test_shift_stays_within_its_limit_in_both_directions():
    shift = Augmentation(**{**NONE, "translate": 0.06})
    moves = np.array([_centroid(shift(_square(), 0, i)) for i in range(200)])
    limit = 0.06 * SIZE  # 3.84 px either way, on each axis
    assert np.abs(moves).max() <= limit + 0.5
    assert moves.min(0).max() < -2 and moves.max(0).min() > 2  # both axes, both ways


def test_rotation_stays_within_its_limit_in_both_directions():
    turn = Augmentation(**{**NONE, "rotate": 10.0})
    off_centre = _square(side=6, left=SIZE // 2 + 16, top=(SIZE - 6) // 2)  # 19 px right of centre
    angles = []
    for i in range(200):
        x, y = _centroid(turn(off_centre, 0, i))
        angles.append(np.degrees(np.arctan2(y, x)))
    # a square 19 px right of the centre turns at most 10 degrees about it
    assert max(np.abs(angles)) <= 10 + 1.5
    assert min(angles) < -7 and max(angles) > 7


def test_draws_are_fixed_by_seed_epoch_and_index_and_by_nothing_else():
    image = np.random.default_rng(1).integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
    options = dict(hflip=0.5, brightness=(-0.1, 0.1), contrast=(0.0, 0.1), scale=(0.9, 1.15),
                   rotate=10.0, translate=0.06)
    first = Augmentation(seed=3, **options)
    drawn = first(image, epoch=2, index=7)
    for other_index in range(5):  # other images drawn in between (another order, another worker)
        first(image, epoch=2, index=other_index)
    np.testing.assert_array_equal(first(image, 2, 7), drawn)
    fresh = Augmentation(seed=3, **options)  # as in another loader worker
    np.testing.assert_array_equal(fresh(image, 2, 7), drawn)
    assert not np.array_equal(first(image, 3, 7), drawn)  # another epoch
    assert not np.array_equal(first(image, 2, 8), drawn)  # another image index
    assert not np.array_equal(Augmentation(seed=4, **options)(image, 2, 7), drawn)  # another seed


def _shift_and_brightness(out: np.ndarray) -> tuple[float, float, float]:
    """(x shift, y shift, brightness shift) of `_grey_square` after augmentation."""
    ys, xs = np.nonzero(out > 110)  # the square: 160 +- 26; the background: 60 +- 26
    centre = (SIZE - 1) / 2
    return xs.mean() - centre, ys.mean() - centre, float(out[12, 12]) - 60


def _grey_square() -> np.ndarray:
    image = np.full((SIZE, SIZE), 60, np.uint8)
    image[28:36, 28:36] = 160
    return image


def test_transforms_draw_independently_of_each_other():
    """Each transform has its own stream: with one seed for all, albumentations would draw the
    shift and the brightness from the same numbers (perfectly correlated)."""
    both = Augmentation(**{**NONE, "brightness": (-0.1, 0.1), "translate": 0.06})
    draws = np.array([_shift_and_brightness(both(_grey_square(), 0, i)) for i in range(400)])
    assert draws[:, 2].std() > 10 and draws[:, 0].std() > 1 and draws[:, 1].std() > 1
    correlation = np.corrcoef(draws.T)
    assert abs(correlation[0, 2]) < 0.2 and abs(correlation[1, 2]) < 0.2


def test_cached_and_decoded_paths_augment_the_same_image_identically(synthetic_root):
    records = scan_kermany(synthetic_root)[:6]
    pre = Preprocessing(SIZE, 0.45, 0.22)
    augmentation = Augmentation(seed=5, hflip=0.5, brightness=(-0.1, 0.1), contrast=(0.0, 0.1),
                                scale=(0.9, 1.15), rotate=10.0, translate=0.06)
    decoded = XrayDataset(records, "binary", pre, augmentation)
    rows = np.stack([decoded.image(i) for i in range(len(records))])  # the same preprocessed images
    cached = XrayDataset(records, "binary", pre, augmentation, rows=rows)
    for key in [(0, 0), (3, 0), (3, 1), (5, 4)]:
        image, target = decoded[key]
        torch.testing.assert_close(cached[key][0], image, rtol=0, atol=0)
        assert cached[key][1] == target
        assert image.shape == (1, SIZE, SIZE) and image.dtype == torch.float32
    # a plain index (validation, test) is never augmented: the normalised preprocessed image
    torch.testing.assert_close(cached[3][0], torch.from_numpy(pre.normalize(rows[3])))
    assert not torch.equal(cached[(3, 0)][0], cached[3][0])


def test_epoch_shuffle_yields_index_epoch_pairs_and_works_under_lightnings_ddp_wrapper():
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

    sampler = EpochShuffle(50, seed=1)
    pairs = list(sampler)
    assert sorted(i for i, _ in pairs) == list(range(50)) and {e for _, e in pairs} == {0}
    assert list(sampler) == pairs  # a resumed epoch repeats its order
    sampler.set_epoch(1)
    assert {e for _, e in sampler} == {1} and [i for i, _ in sampler] != [i for i, _ in pairs]
    ranks = [DistributedSamplerWrapper(EpochShuffle(50, seed=1), num_replicas=2, rank=rank,
                                       shuffle=False) for rank in range(2)]
    for wrapper in ranks:
        wrapper.set_epoch(3)  # Lightning calls this on the wrapper; it reaches EpochShuffle
    shares = [list(wrapper) for wrapper in ranks]
    assert all(isinstance(p, tuple) and p[1] == 3 for share in shares for p in share)
    assert sorted(i for share in shares for i, _ in share) == list(range(50))  # split, not repeated


def test_training_data_is_augmented_and_validation_data_is_not(synthetic_root, tmp_path):
    from pneumonia.train import build_datamodule

    for cache in ("true", "false"):
        cfg = compose_train(tmp_path, [f"data.root={synthetic_root}", f"data.cache={cache}",
                                       "model.input_size=48", "data.num_workers=0", "seed=4"])
        datamodule = build_datamodule(cfg)
        train, val = datamodule.train_dataloader(), datamodule.val_dataloader()
        assert isinstance(train.sampler, EpochShuffle) and train.dataset.augmentation.seed == 4
        assert val.dataset.augmentation is None and not isinstance(val.sampler, EpochShuffle)
        images, targets = next(iter(train))
        assert images.dtype == torch.float32 and images.shape[1:] == (1, 48, 48)


def test_the_models_do_not_import_the_data_side():
    for path in sorted((REPO / "pneumonia" / "models").glob("*.py")):
        tree = ast.parse(Path(path).read_text())
        imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
        imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert not [m for m in imported if m.startswith("pneumonia.data")], path


@pytest.mark.parametrize("key", ["brightness", "contrast", "scale"])
def test_bounds_must_be_ordered(tmp_path, key):
    from pneumonia.config import validate

    with pytest.raises(ValueError, match=f"data.augment.{key}"):
        validate(compose_train(tmp_path, ["data.root=/x", f"data.augment.{key}=[1.1,0.9]"]))


def _xray() -> np.ndarray:
    """A smooth, X-ray-like 96 px image: two dark lung fields in a brighter body, some noise."""
    ys, xs = np.mgrid[0:96, 0:96] / 96.0
    body = 170 - 60 * np.exp(-((xs - 0.3) ** 2 / 0.01 + (ys - 0.5) ** 2 / 0.05)) \
        - 60 * np.exp(-((xs - 0.7) ** 2 / 0.01 + (ys - 0.5) ** 2 / 0.05))
    noisy = body + np.random.default_rng(0).normal(0, 6, body.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


ACQUISITION = dict(gamma=[0.6, 0.7], noise=[0.05, 0.06], blur=[1.5, 2.0], jpeg=[10, 12],
                   downscale=[0.3, 0.35])


@pytest.mark.parametrize("key", sorted(ACQUISITION))
def test_each_acquisition_change_does_what_it_says(key):
    image = np.tile(np.linspace(40, 215, 96, dtype=np.float32), (96, 1)).astype(np.uint8)
    image[40:56, 40:56] = 250  # an edge for blur, downscaling and JPEG to soften
    out = Augmentation(**NONE, acquisition=1.0, **{key: ACQUISITION[key]})(image, 0, 0)
    diff = out.astype(np.float32) - image
    if key == "gamma":  # a gamma below 1 brightens every mid-tone
        assert (diff[:, 10:86] > 0).mean() > 0.95
    elif key == "noise":  # zero-mean, about 0.055 * 255 = 14 grey levels
        assert abs(diff.mean()) < 2 and 10 < diff.std() < 18
    elif key == "jpeg":  # a JPEG round trip at the drawn quality
        import cv2

        out = Augmentation(**NONE, acquisition=1.0, jpeg=[10, 10])(image, 0, 0)
        encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 10])[1]
        np.testing.assert_array_equal(out, cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED))
        assert np.abs(out.astype(np.float32) - image).mean() > 1
    else:  # blur and downscaling lose the sharp edge's high frequencies
        edge = np.abs(np.diff(image.astype(np.float32), axis=1)).max()
        assert np.abs(np.diff(out.astype(np.float32), axis=1)).max() < 0.8 * edge


def test_acquisition_changes_are_drawn_with_their_probability():
    image = _square()
    aug = Augmentation(**NONE, acquisition=0.3, noise=[0.05, 0.05])
    changed = np.mean([not np.array_equal(aug(image, 0, i), image) for i in range(400)])
    assert changed == pytest.approx(0.3, abs=0.07)


def test_standardisations_remove_a_global_intensity_change():
    from pneumonia.data.transforms import standardize

    image = _xray()
    darker = (image.astype(np.float32) * 0.6 + 20).round().astype(np.uint8)
    for method in ("stretch", "equalize"):
        a, b = standardize(image, method), standardize(darker, method)
        assert np.abs(a.astype(float) - b).mean() < 4, method  # raw: 0.4 * mean - 20 apart
    stretched = standardize(darker, "stretch")
    assert np.percentile(stretched, 1) <= 3 and np.percentile(stretched, 99) >= 252
    assert standardize(image, "none") is image
    pre = Preprocessing(image_size=96, mean=0.5, std=0.25, standardize="equalize")
    # equalised, the mean is mid-grey (0 after mean 0.5, std 0.25); the image's own is brighter
    assert pre.normalize(image).mean() == pytest.approx(0.0, abs=0.1)
    assert Preprocessing(image_size=96, mean=0.5, std=0.25).normalize(image).mean() > 0.2


def test_held_out_shifts_are_fixed_by_index_and_each_changes_the_image():
    from pneumonia.data.transforms import HELD_OUT_SHIFTS, held_out_shift

    image = _xray()
    outs = [held_out_shift(image, i) for i in range(len(HELD_OUT_SHIFTS))]
    for i, out in enumerate(outs):
        assert out.dtype == np.uint8 and out.shape == image.shape
        assert np.abs(out.astype(float) - image).mean() > 1, list(HELD_OUT_SHIFTS)[i]
        np.testing.assert_array_equal(out, held_out_shift(image, i))
