"""The research scripts' own computations (docs/results.md quotes their figures)."""

from research.sharpness import sharpness


def test_every_ablation_variant_is_a_valid_training_config(tmp_path):
    """A misspelt key or value in a variant fails here, not 40 minutes into an ablation."""
    from pneumonia.config import validate
    from research.ablation import BASE, VARIANTS
    from tests.conftest import compose_train

    for name, overrides in VARIANTS.items():
        cfg = compose_train(tmp_path, ["experiment=scratch_cpu", "data.root=/data", *BASE,
                                       *overrides])
        validate(cfg)
        assert cfg.model.pretrained is False, name
        if name.startswith("densenet121"):
            assert cfg.model.backbone == "densenet121" and cfg.data.augment.rotate == 10, name
        elif name in ("baseline", "tta", "label_smoothing", "size128", "no_class_weights"):
            assert cfg.model.backbone == "resnet18" and cfg.data.augment.rotate == 0, name


def test_sharpness_is_lower_for_a_blurred_image_and_zero_for_a_flat_one():
    import numpy as np
    from scipy import ndimage

    image = np.random.default_rng(0).integers(0, 256, (64, 64)).astype(np.uint8)
    blurred = ndimage.gaussian_filter(image, 1.0)
    assert sharpness(blurred) < 0.5 * sharpness(image)
    assert sharpness(np.full((64, 64), 128, np.uint8)) == 0.0
