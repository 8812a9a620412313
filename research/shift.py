"""What separates the training folder's X-rays from a new site's? (docs/notes/site-shift.md)

python -m research.shift [--data ../shared/data/kermany224] [--out outputs/shift] [--cnn]

Describes every image of <data>/train and <data>/test as stored (224 px grayscale JPEGs) by:
  intensity   mean, std, 1st/50th/99th percentiles, black and saturated fractions
  contrast    p95 - p5
  sharpness   variance of the Laplacian, mean gradient magnitude
  noise       Immerkaer's estimate (the 3x3 second-difference filter's mean absolute response)
  JPEG        the luminance quantisation table's mean, bytes per pixel
  framing     dark border width, the body's bounding box, the lungs' (dark pixels inside the
              body) centroid and area
  markers     bright pixels (>= 245) in the outer frame (letters, lead markers)
and fits a small domain classifier (logistic regression, 5-fold cross-validated AUROC) that tells
the training folder from the test folder: on all of these properties, and with --cnn on the
pooled ImageNet features of EfficientNet-Lite0 (the pretrained recipe's starting point), raw and
after each input standardisation of pneumonia.data.transforms (the features recomputed on the
standardised images).

Pooled (train vs test, no test labels) is what chooses; the per-class rows read the test
folder's class folders only to describe where the shift lives, and choose nothing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from benchmarks.common import SHARED_DATA, header
from pneumonia.data.transforms import STANDARDIZATIONS, standardize
from pneumonia.metrics import auroc

LAPLACE = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], np.float32)
IMMERKAER = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)
GROUPS = ("intensity", "contrast", "sharpness", "noise", "jpeg", "framing", "markers")


def load(folder: Path) -> tuple[list[Path], np.ndarray, np.ndarray]:
    """Files, (N, H, W) uint8 images and class folder (0 normal, 1 pneumonia) of a split."""
    files = sorted((folder / "NORMAL").glob("*")) + sorted((folder / "PNEUMONIA").glob("*"))
    images = np.stack([np.asarray(Image.open(f).convert("L")) for f in files])
    return files, images, np.array([f.parent.name == "PNEUMONIA" for f in files], int)


def jpeg_properties(path: Path) -> dict[str, float]:
    with Image.open(path) as image:
        tables = getattr(image, "quantization", None) or {0: [0]}
        size = image.size
    return {"jpeg quant mean": float(np.mean(tables[0])),
            "jpeg bytes/pixel": path.stat().st_size / (size[0] * size[1])}


def properties(image: np.ndarray) -> dict[str, float]:
    """Intensity, contrast, sharpness, noise, framing and marker properties of a uint8 image."""
    x = image.astype(np.float32)
    p1, p5, p50, p95, p99 = np.percentile(x, [1, 5, 50, 95, 99])
    lap = ndimage.convolve(x, LAPLACE, mode="reflect")
    gy, gx = np.gradient(x)
    h, w = x.shape
    noise = np.sqrt(np.pi / 2) * np.abs(ndimage.convolve(x, IMMERKAER))[1:-1, 1:-1].mean() / 6
    rows, cols = x.mean(1), x.mean(0)
    dark = 10.0
    border = np.mean([np.argmax(profile > dark) if (profile > dark).any() else len(profile)
                      for profile in (rows, rows[::-1], cols, cols[::-1])])
    body = x > np.percentile(x, 30)
    ys, xs = np.nonzero(body)
    box = (ys.min() / h, ys.max() / h, xs.min() / w, xs.max() / w) if len(ys) else (0, 1, 0, 1)
    top, bottom, left, right = (int(box[0] * h), int(box[1] * h) + 1,
                                int(box[2] * w), int(box[3] * w) + 1)
    inner = x[top:bottom, left:right]
    lungs = inner < np.percentile(inner, 35)  # the darkest third of the body: the lung fields
    ly, lx = np.nonzero(lungs)
    frame = np.ones_like(x, bool)
    frame[h // 5: -h // 5, w // 5: -w // 5] = False
    return {
        "intensity mean": x.mean(), "intensity std": x.std(), "intensity p1": p1,
        "intensity p50": p50, "intensity p99": p99,
        "black fraction": float((x <= 5).mean()), "saturated fraction": float((x >= 250).mean()),
        "contrast p95-p5": p95 - p5,
        "sharpness laplacian var": lap.var(), "sharpness gradient": np.hypot(gx, gy).mean(),
        "noise sigma": noise,
        "framing border px": border, "framing body top": box[0], "framing body bottom": box[1],
        "framing body left": box[2], "framing body right": box[3],
        "framing lungs y": (ly.mean() + top) / h if len(ly) else 0.5,
        "framing lungs x": (lx.mean() + left) / w if len(lx) else 0.5,
        "framing lungs area": lungs.sum() / (h * w),
        "markers bright frame": float((x[frame] >= 245).mean()),
    }


def table(images: np.ndarray, files: list[Path] | None) -> tuple[list[str], np.ndarray]:
    rows = [properties(image) for image in images]
    if files is not None:  # the file's own encoding (unchanged by a standardisation)
        rows = [{**row, **jpeg_properties(f)} for row, f in zip(rows, files)]
    names = list(rows[0])
    return names, np.array([[row[n] for n in names] for row in rows], np.float64)


def domain_auroc(features: np.ndarray, domain: np.ndarray, seed: int = 0) -> float:
    """Cross-validated AUROC of a logistic regression telling domain 1 from domain 0."""
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    p = cross_val_predict(model, features, domain, cv=folds, method="predict_proba")[:, 1]
    return auroc(domain, p)


def separation(train: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Standardised mean difference (test - train) / pooled std, per column."""
    pooled = np.sqrt((train.var(0) + test.var(0)) / 2) + 1e-12
    return (test.mean(0) - train.mean(0)) / pooled


def cnn_features(images: np.ndarray, standardization: str, batch: int = 128) -> np.ndarray:
    """Global-average-pooled ImageNet features of EfficientNet-Lite0 (no fine-tuning)."""
    import torch

    from pneumonia.data.transforms import normalize
    from pneumonia.hardware import cpu_has_native_bf16
    from pneumonia.models.network import build_network, normalization_stats

    net = build_network("tf_efficientnet_lite0", pretrained=True).eval()
    net = net.to(memory_format=torch.channels_last)
    mean, std = normalization_stats("tf_efficientnet_lite0", "backbone")
    out = []
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16,
                                                enabled=cpu_has_native_bf16()):
        for start in range(0, len(images), batch):
            chunk = np.stack([standardize(im, standardization)
                              for im in images[start:start + batch]])
            x = normalize(torch.from_numpy(chunk).float()[:, None] / 255.0, mean, std)
            x = x.contiguous(memory_format=torch.channels_last)
            out.append(net.features(x).mean((2, 3)).float().numpy())
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED_DATA / "kermany224")
    parser.add_argument("--out", type=Path, default=Path("outputs/shift"))
    parser.add_argument("--cnn", action="store_true", help="also the ImageNet-feature classifier")
    args = parser.parse_args()
    header("research.shift: training folder vs test folder")
    files, images, labels = {}, {}, {}
    for split in ("train", "test"):
        files[split], images[split], labels[split] = load(args.data / split)
    domain = np.r_[np.zeros(len(images["train"]), int), np.ones(len(images["test"]), int)]
    both = np.r_[labels["train"], labels["test"]]
    subsets = {"all (no test labels)": np.ones_like(domain, bool),
               "normal": both == 0, "pneumonia": both == 1}

    names, raw = table(np.concatenate([images["train"], images["test"]]),
                       files["train"] + files["test"])
    print("\n## Properties, test folder against training folder "
          "(standardised mean difference; |d| > 0.5 is a large shift)\n")
    print("| property | train mean | test mean | d, all | d, normal | d, pneumonia |")
    print("|---|---|---|---|---|---|")
    for j, name in enumerate(names):
        d = [separation(raw[(domain == 0) & keep, j:j + 1], raw[(domain == 1) & keep, j:j + 1])[0]
             for keep in subsets.values()]
        print(f"| {name} | {raw[domain == 0, j].mean():.3g} | {raw[domain == 1, j].mean():.3g} | "
              + " | ".join(f"{v:+.2f}" for v in d) + " |")

    print("\n## Domain classifier AUROC (train vs test folder; 0.5 = indistinguishable)\n")
    print("| features | standardisation | " + " | ".join(subsets) + " |")
    print("|---|---|" + "---|" * len(subsets))
    groups = {g: [j for j, n in enumerate(names) if n.split()[0] == g] for g in GROUPS}
    for group, columns in groups.items():
        cells = [domain_auroc(raw[keep][:, columns], domain[keep]) for keep in subsets.values()]
        print(f"| {group} | none | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    for method in STANDARDIZATIONS:
        stack = np.concatenate([images["train"], images["test"]])
        seen = np.stack([standardize(im, method) for im in stack])
        _, values = table(seen, None)
        cells = [domain_auroc(values[keep], domain[keep]) for keep in subsets.values()]
        print(f"| all image properties | {method} | " + " | ".join(f"{c:.3f}" for c in cells)
              + " |")
        if args.cnn:
            deep = cnn_features(stack, method)
            cells = [domain_auroc(deep[keep], domain[keep]) for keep in subsets.values()]
            print(f"| ImageNet features (lite0) | {method} | "
                  + " | ".join(f"{c:.3f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
