"""The research scripts' own computations (docs/notes/ quote their figures)."""

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


def _evaluation(folder, truth, p_normal, p_viral, decision, subtype_threshold=0.5):
    """An evaluation output folder as research.paired reads it."""
    import json

    folder.mkdir()
    lines = ["path,truth,p_normal,p_bacterial,p_viral,decision"]
    lines += [f"/x/{i}.jpeg,{t},{n},{1 - n - v},{v},{d}"
              for i, (t, n, v, d) in enumerate(zip(truth, p_normal, p_viral, decision))]
    (folder / "predictions.csv").write_text("\n".join(lines) + "\n")
    (folder / "metrics.json").write_text(json.dumps({"subtype": {"threshold": subtype_threshold}}))
    return folder


def test_paired_comparison_is_zero_against_itself_and_positive_against_a_worse_model(tmp_path):
    import numpy as np

    from research.paired import compare

    rng = np.random.default_rng(0)
    truth = rng.choice(["normal", "bacterial", "viral"], 300)
    # A: right on every image, with margin; B: the same scores with a third of them swapped
    p_normal = np.where(truth == "normal", 0.9, 0.1)
    p_viral = np.where(truth == "viral", 0.8, np.where(truth == "bacterial", 0.1, 0.05))
    a = _evaluation(tmp_path / "a", truth, p_normal, p_viral, truth)
    worse = rng.random(300) < 0.33
    b_normal = np.where(worse, 1 - p_normal, p_normal)
    r = p_viral / (1 - p_normal)  # P(viral | pneumonia), which B keeps
    b = _evaluation(tmp_path / "b", truth, b_normal, r * (1 - b_normal),
                    np.where(worse & (truth == "normal"), "bacterial",
                             np.where(worse, "normal", truth)))

    for a_value, b_value, (lo, hi) in compare(a, a).values():
        assert a_value == b_value and lo == hi == 0.0
    figures = compare(a, b)
    assert figures["stage 1 AUROC"][0] == 1.0 and figures["three-class accuracy"][0] == 1.0
    for name in ("stage 1 AUROC", "stage 1 accuracy", "three-class accuracy"):
        a_value, b_value, (lo, hi) = figures[name]
        assert a_value > b_value and lo > 0, name
    assert figures["stage 2 AUROC"][2] == (0.0, 0.0)  # B changed stage 1 only


def test_shift_diagnosis_measures_what_it_names():
    """research.shift: the noise and sharpness estimates rise with noise, framing finds a dark
    border, and the domain classifier tells separable domains apart and not random ones."""
    import numpy as np
    from scipy import ndimage

    from research.shift import domain_auroc, properties

    rng = np.random.default_rng(0)
    smooth = ndimage.gaussian_filter(rng.normal(128, 40, (96, 96)), 4).clip(0, 255)
    noisy = (smooth + rng.normal(0, 8, smooth.shape)).clip(0, 255)
    a, b = properties(smooth.astype(np.uint8)), properties(noisy.astype(np.uint8))
    assert b["noise sigma"] > 3 * a["noise sigma"] and abs(b["noise sigma"] - 8) < 2
    assert b["sharpness laplacian var"] > a["sharpness laplacian var"]
    framed = smooth.astype(np.uint8).copy()
    framed[:, :10] = 0
    assert properties(framed)["framing border px"] > a["framing border px"]
    domain = np.r_[np.zeros(200, int), np.ones(200, int)]
    apart = rng.normal(domain[:, None] * 1.5, 1.0, (400, 3))
    assert domain_auroc(apart, domain) > 0.9
    assert abs(domain_auroc(rng.normal(0, 1, (400, 3)), domain) - 0.5) < 0.1
