"""A small synthetic data set in the Kermany layout, for the demo and the tests.

Each image is a crude chest X-ray: dark background, a body, two dark lungs, a bright spine
and faint ribs. Bacterial pneumonia adds one dense focal consolidation in one lung; viral
pneumonia adds a diffuse interstitial pattern in both lungs. Sizes vary like the real data
(scaled down), a few files are stored as RGB, and file names follow Kermany's, so the data
goes through exactly the same loading code as the real X-rays.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from pneumonia.data.kermany import LABELS
from pneumonia.errors import OutputError

_MARKER = ".synthetic.json"
_COUNTS = {"train": 1.0, "val": 0.1, "test": 0.3}


def draw_xray(label: str, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """One synthetic chest X-ray as an (height, width) uint8 array."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = xx / width, yy / height
    body = ((u - 0.5) / 0.46) ** 2 + ((v - 0.55) / 0.55) ** 2 < 1
    img = np.where(body, 0.55, 0.08).astype(np.float32)
    lungs = []
    for side in (-1, 1):
        cx, cy = 0.5 + side * rng.uniform(0.17, 0.21), rng.uniform(0.48, 0.54)
        rx, ry = rng.uniform(0.12, 0.15), rng.uniform(0.26, 0.31)
        mask = ((u - cx) / rx) ** 2 + ((v - cy) / ry) ** 2 < 1
        lungs.append((mask, cx, cy, rx, ry))
        img[mask] = 0.22
    img += 0.35 * np.exp(-(((u - 0.5) / 0.035) ** 2)) * (v > 0.1)  # spine
    img += 0.06 * (np.sin(v * rng.uniform(55, 65)) > 0.6) * body  # ribs
    if label == "bacterial":
        mask, cx, cy, rx, ry = lungs[rng.integers(2)]
        bx, by = cx + rng.uniform(-0.4, 0.4) * rx, cy + rng.uniform(-0.4, 0.5) * ry
        r = rng.uniform(0.07, 0.10)
        img += 0.6 * np.exp(-(((u - bx) ** 2 + ((v - by) * width / height) ** 2) / r**2)) * mask
    elif label == "viral":
        both = lungs[0][0] | lungs[1][0]
        fx, fy = rng.uniform(35, 50), rng.uniform(35, 50)
        streaks = (np.sin(u * fx * np.pi + rng.uniform(0, 6)) * np.sin(v * fy * np.pi) > 0.3)
        img += (0.10 + 0.14 * streaks) * both
    img += rng.normal(0, 0.04, img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def _file_name(label: str, patient: int, index: int) -> str:
    """The image's path below its split folder, named as Kermany's files are."""
    if label == "normal":
        return f"NORMAL/IM-{patient:04d}-{index + 1:04d}.jpeg"
    kind = "bacteria" if label == "bacterial" else "virus"
    return f"PNEUMONIA/person{patient}_{kind}_{index + 1}.jpeg"


def _write_images(folder: Path, rng: np.random.Generator, patients_per_class: int,
                  images_per_patient: int, min_size: int, max_size: int) -> None:
    """Every split's patients of every label, numbered across the data set, and their images."""
    patients = [(split, label) for split, share in _COUNTS.items() for label in LABELS
                for _ in range(max(1, round(share * patients_per_class)))]
    for patient, (split, label) in enumerate(patients, start=1):
        for index in range(images_per_patient):
            height = int(rng.integers(min_size, max_size + 1))
            width = int(height * rng.uniform(1.0, 1.45))
            image = Image.fromarray(draw_xray(label, width, height, rng))
            if rng.random() < 0.2:  # some real files are stored as RGB
                image = image.convert("RGB")
            out = folder / split / _file_name(label, patient, index)
            out.parent.mkdir(parents=True, exist_ok=True)
            image.save(out, quality=92)


def make_synthetic_dataset(
    root: str | Path,
    patients_per_class: int = 40,
    images_per_patient: int = 2,
    min_size: int = 160,
    max_size: int = 320,
    seed: int = 0,
) -> Path:
    """Write (or reuse) a synthetic Kermany-layout folder at root; deterministic by seed.

    The folder is written under a temporary name and renamed when complete, so an interrupted
    run never leaves half a data set. An existing folder is reused only if it was made by
    this function with the same settings; any other existing folder is left untouched.
    """
    root = Path(root).expanduser().resolve()
    settings = dict(patients_per_class=patients_per_class, images_per_patient=images_per_patient,
                    min_size=min_size, max_size=max_size, seed=seed)
    marker = root / _MARKER
    if root.exists():
        if marker.is_file() and json.loads(marker.read_text()) == settings:
            return root
        raise OutputError(
            f"{root} exists but is not a synthetic data set made with {settings}; "
            "choose another data.root (nothing was written there)"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".synthetic-", dir=root.parent))
    try:
        _write_images(tmp, np.random.default_rng(seed), patients_per_class, images_per_patient,
                      min_size, max_size)
        (tmp / _MARKER).write_text(json.dumps(settings))
        tmp.rename(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root
