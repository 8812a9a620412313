"""The research scripts' own computations (docs/results.md quotes their figures)."""

import torch
from torch import nn

from pneumonia.pipeline import load_stage, recorded_split, stage_outputs
from research.adapt_bn import adapt_batchnorm
from research.sharpness import sharpness


def test_adapt_batchnorm_takes_the_statistics_of_the_given_images_and_changes_nothing_else(trained):
    _, runs = trained
    module = load_stage(runs["binary"]["best_checkpoint"], "binary")
    before = {k: v.clone() for k, v in module.state_dict().items()}
    images = [r for r in recorded_split(module.hparams.data) if r.split == "test"]
    # one batch: the statistics are then exactly those of the images (with several batches they
    # are the mean of the per-batch statistics, as torch.optim.swa_utils.update_bn computes them)
    adapted = adapt_batchnorm(module, images, batch_size=len(images))

    # the first BatchNorm now holds the mean and variance of its inputs over exactly these images
    bn = next(m for m in adapted.modules() if isinstance(m, nn.BatchNorm2d))
    inputs = []
    hook = bn.register_forward_hook(lambda _, args, __: inputs.append(args[0]))
    stage_outputs(adapted, images)
    hook.remove()
    x = torch.cat(inputs)
    torch.testing.assert_close(bn.running_mean, x.mean((0, 2, 3)), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(bn.running_var, x.var((0, 2, 3), unbiased=True), atol=1e-4, rtol=1e-3)
    assert not adapted.training and not bn.training
    # weights unchanged, and the original module untouched
    for key, value in adapted.state_dict().items():
        if "running_" not in key and "num_batches_tracked" not in key:
            torch.testing.assert_close(value, before[key], msg=key)
    for key, value in module.state_dict().items():
        torch.testing.assert_close(value, before[key], msg=key)


def test_every_ablation_variant_is_a_valid_training_config(tmp_path):
    """A misspelt key or value in a variant fails here, not 40 minutes into an ablation."""
    from pneumonia.config import validate
    from research.ablation import BASE, VARIANTS
    from tests.conftest import compose_train

    for name, overrides in VARIANTS.items():
        cfg = compose_train(tmp_path, ["experiment=scratch_cpu", "data.root=/data", *BASE, *overrides])
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
