"""Fitting the pipeline to a new site (docs/site.md): site calibration on its labelled X-rays
(`TwoStagePipeline.calibrate`), and on its unlabelled X-rays class-balanced AdaBN (Li et al.
2016, stage 1's BatchNorm statistics re-estimated) and prior re-estimation (Saerens, Latinne &
Decaestecker 2002, EM on stage 1's bias-corrected calibrated probabilities, applied as
`Calibration.prior_shift`).

The images that calibrate or adapt and the images that are scored must differ (compared by
content), unless the user asks for transductive adaptation; the report then says so.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from pneumonia.checkpoints import save_stage_weights
from pneumonia.data.datamodule import XrayDataset
from pneumonia.data.kermany import CLASS_FOLDERS, Record, parse_name
from pneumonia.data.transforms import Preprocessing
from pneumonia.errors import ConfigError, DataError
from pneumonia.io import display_name, scan_inputs
from pneumonia.pipeline import softmax_positive, stage_members, stage_outputs

ADAPT_METHODS = ("batchnorm", "prior", "both")


def labelled_images(folder: Path) -> list[Record]:
    """The site's labelled X-rays: <folder>/NORMAL/* and <folder>/PNEUMONIA/* (Kermany names)."""
    folder = Path(folder).expanduser()
    records = []
    for name in CLASS_FOLDERS:
        if not (folder / name).is_dir():
            raise DataError(f"calibration={display_name(folder)} has no {name}/ folder; a labelled "
                            "site folder holds NORMAL/ and PNEUMONIA/ (files named like Kermany's)")
        files, problems = scan_inputs(folder / name)
        if problems:
            raise DataError(f"calibration={display_name(folder)}: {problems[0]}")
        records += [Record(f, *parse_name(name, f.name), "site", 0, 0, split="site") for f in files]
    return records


def unlabelled_images(folder: Path) -> list[Record]:
    """The site's unlabelled X-rays: every file under the folder, any layout."""
    files, problems = scan_inputs(Path(folder).expanduser())
    if problems:
        raise DataError(f"adapt={display_name(Path(folder))}: {problems[0]}")
    if not files:
        raise DataError(f"adapt={display_name(Path(folder))} holds no files")
    return [Record(f, "", "", "site", 0, 0, split="site") for f in files]


def _digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def check_disjoint(fitted: list[Record], scored: list[Record], option: str) -> None:
    """Refuse when an image that calibrates or adapts is also scored (same bytes, any path)."""
    fitting = {_digest(r.path) for r in fitted}
    shared = [r.path for r in scored if _digest(r.path) in fitting]
    if shared:
        raise DataError(
            f"{len(shared)} image(s) given by {option} are also scored (e.g. {shared[0]}): fitting "
            "and scoring on the same images overstates every figure. Use images the report "
            "does not score, or transductive=true to adapt on the scored images on purpose "
            "(the report then says so).")


@torch.no_grad()
def adapt_batchnorm(module: nn.Module, records: list[Record], batch_size: int = 64,
                    num_workers: int = 0, device: str = "cpu") -> nn.Module:
    """A copy of a stage (or ensemble) whose BatchNorm running statistics are those of these
    images (one pass; each layer the mean of its per-batch statistics); every weight unchanged."""
    adapted = copy.deepcopy(module).to(device).eval()
    norms = [m for m in adapted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        raise ConfigError("the network has no BatchNorm layer to adapt")
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over the batches
        bn.train()
    data = XrayDataset(records, module.hparams.stage, Preprocessing(**module.hparams.preprocessing))
    for images, _ in DataLoader(data, batch_size=batch_size, num_workers=num_workers):
        adapted(images.to(device))
    return adapted.eval()


def estimate_prior(p: np.ndarray, prior: float, weights: np.ndarray | None = None,
                   iterations: int = 1000, tolerance: float = 1e-8) -> float:
    """EM estimate of the positive class's prior among images whose calibrated P(positive)
    is `p` under the training prior `prior` (Saerens et al. 2002); `weights` count each image."""
    p = np.clip(p, 1e-9, 1 - 1e-9)
    estimate = prior
    for _ in range(iterations):
        ratio = estimate / prior, (1 - estimate) / (1 - prior)
        adjusted = ratio[0] * p / (ratio[0] * p + ratio[1] * (1 - p))
        new = float(np.average(adjusted, weights=weights))
        if abs(new - estimate) < tolerance:
            return new
        estimate = new
    return estimate


def logit_shift(prior: float, estimate: float) -> float:
    """The shift of a calibrated logit that moves its probabilities from one prior to another."""
    q = np.clip([prior, estimate], 1e-6, 1 - 1e-6)
    logits = np.log(q / (1 - q))
    return float(logits[1] - logits[0])


def _save_adapted(module: nn.Module, stage: str, folder: Path) -> list[str]:
    """The adapted stage's weights (each ensemble member's) in `folder`, which the report names
    as that stage's weights (the model folder saves them from the pipeline itself)."""
    folder.mkdir(parents=True, exist_ok=True)
    return [str(save_stage_weights(member, folder / f"{stage}_{i}"))
            for i, member in enumerate(stage_members(module))]


def adapt_to_site(pipeline, records: list[Record], method: str, folder: Path, **loader) -> dict:
    """Adapt a calibrated pipeline to a site's unlabelled images (`ADAPT_METHODS`); AdaBN's
    checkpoints are written to `folder`. Returns what the report says about it.

    AdaBN adapts stage 1 only, on the site's images resampled to the calibration images' class
    mix (`class_balanced`): its statistics then carry the site's acquisition, not its share of
    pneumonia, which the prior re-estimation carries instead. Stage 2 keeps its statistics:
    re-estimated on the images stage 1 calls pneumonia they cost it accuracy (docs/site.md)."""
    done: dict = {"images": len(records), "method": method}
    stages, cal = pipeline.stages, pipeline.calibration
    if "binary" not in cal.priors:
        raise ConfigError("this pipeline's calibration does not record its class priors (made "
                          "before prior re-estimation existed); calibrate it again to adapt it")
    if method in ("batchnorm", "both"):
        logits = stage_outputs(stages["binary"], records, tta=pipeline.tta, **loader)[0]
        finite = np.isfinite(logits).all(axis=1)  # an unreadable image has no logits
        sample = class_balanced([r for r, ok in zip(records, finite) if ok], logits[finite], cal)
        stages["binary"] = adapt_batchnorm(stages["binary"], sample, **loader)
        done["batchnorm_images"] = {"binary": int(finite.sum()), "subtype": 0}
        pipeline.checkpoints["binary"] = _save_adapted(stages["binary"], "binary", folder)
    if method in ("prior", "both"):
        logits = stage_outputs(stages["binary"], records, tta=pipeline.tta, **loader)[0]
        done["priors"] = adapt_prior(cal, logits[np.isfinite(logits).all(axis=1)])
    return done


def class_balanced(records: list[Record], logits: np.ndarray, cal, seed: int = 0) -> list[Record]:
    """The site's images drawn with replacement (as many as there are) in proportion to how much
    more common their class is at calibration than at the site: weight
    q * pi / pi_site + (1 - q) * (1 - pi) / (1 - pi_site), with pi the calibration images'
    P(pneumonia), pi_site its EM estimate at the site and q each image's posterior there."""
    pi = cal.priors["binary"]
    p = softmax_positive(logits, cal.temperature["binary"], cal.bias.get("binary", 0.0))
    site = estimate_prior(p, pi)
    ratio = site / pi, (1 - site) / (1 - pi)
    q = ratio[0] * p / (ratio[0] * p + ratio[1] * (1 - p))
    weights = q * pi / site + (1 - q) * (1 - pi) / (1 - site)
    chosen = np.random.default_rng(seed).choice(len(records), len(records),
                                                p=weights / weights.sum())
    return [records[i] for i in chosen]


def adapt_prior(cal, logits: np.ndarray) -> dict[str, dict[str, float]]:
    """Re-estimate stage 1's class prior, P(pneumonia), from its logits of the site's images
    (EM on the bias-corrected calibrated probabilities, Alexandari et al. 2020) and move the
    calibration's P(pneumonia) to it (`cal.prior_shift`). Stage 2 keeps its prior: estimated
    from unlabelled images, P(viral | pneumonia) also counts the normal images stage 2 was never
    meant to see (docs/site.md measured the harm)."""
    estimate = estimate_prior(softmax_positive(logits, cal.temperature["binary"],
                                               cal.bias.get("binary", 0.0)),
                              cal.priors["binary"])
    cal.prior_shift = {**cal.prior_shift, "binary": logit_shift(cal.priors["binary"], estimate)}
    return {"binary": {"calibration": cal.priors["binary"], "site": estimate,
                       "logit_shift": cal.prior_shift["binary"]}}
