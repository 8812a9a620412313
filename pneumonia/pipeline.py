"""TwoStagePipeline: stage 1 (normal vs pneumonia) then stage 2 (bacterial vs viral).

Three-class probabilities from the two stages' calibrated outputs:
P(normal) = 1 - p, P(bacterial) = p * (1 - r), P(viral) = p * r, with p = P(pneumonia)
from stage 1 (`binary`) and r = P(viral | pneumonia) from stage 2 (`subtype`). Temperatures and
decision thresholds are fitted on the validation split only and saved with the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from pneumonia.checkpoints import as_list, load_stage
from pneumonia.data.datamodule import XrayDataset
from pneumonia.data.kermany import SPLIT_KEYS, Record, scan_kermany, split_records
from pneumonia.data.transforms import Preprocessing, held_out_shift
from pneumonia.errors import CheckpointError, DataError, ImageReadError
from pneumonia.metrics import threshold_for_sensitivity, youden_threshold
from pneumonia.models import StageClassifier
from pneumonia.stages import stage_targets

OPERATING_POINTS = ("youden", "sensitivity", "default")


def forward_outputs(module: StageClassifier, images: torch.Tensor,
                    tta: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of normalised images (with `tta` the mean with those of the mirrored images) and
    the stage's out-of-distribution scores of the images as given (NaN without a gate)."""
    logits, ood = module.outputs(images)
    logits = logits.float()
    if tta:
        logits = (logits + module(images.flip(-1)).float()) / 2
    return logits, ood.float()


class MeanLogits(nn.Module):
    """The mean of several networks' logits."""

    def __init__(self, nets: list[nn.Module]):
        super().__init__()
        self.nets = nn.ModuleList(nets)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([net(x).float() for net in self.nets]).mean(0)


class StageEnsemble(nn.Module):
    """Checkpoints of one stage trained alike (e.g. several seeds) as one model: the mean of
    their logits. Stands in for a StageClassifier in the pipeline: `hparams` are the first
    member's (all must share stage, preprocessing and data split), `net` averages the nets."""

    def __init__(self, members: list[StageClassifier], paths: list[Path]):
        super().__init__()
        first = members[0].hparams
        for member, path in zip(members[1:], paths[1:]):
            for key in ("stage", "preprocessing", "data"):
                if member.hparams.get(key) != first.get(key):
                    raise CheckpointError(f"{path}: its {key} differs from {paths[0]}'s; "
                                          "an ensemble's members must be trained alike on the "
                                          "same split")
        self.members = nn.ModuleList(members)
        self.net = MeanLogits([m.net for m in members])

    @property
    def hparams(self):
        return self.members[0].hparams

    @property
    def mlflow_run_id(self) -> str | None:
        ids = [m.mlflow_run_id for m in self.members if m.mlflow_run_id]
        return ",".join(ids) or None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean of the members' logits and of their OOD scores (NaN unless all have a gate)."""
        logits, ood = zip(*(member.outputs(x) for member in self.members))
        return torch.stack([z.float() for z in logits]).mean(0), torch.stack(ood).mean(0)


def stage_members(module: StageClassifier | StageEnsemble) -> list[StageClassifier]:
    """Each trained network of a stage: an ensemble's members, or the stage itself."""
    return list(getattr(module, "members", [module]))


def load_stages(paths: Path | list[Path], stage: str) -> StageClassifier | StageEnsemble:
    """One checkpoint, or a list of them averaged as a `StageEnsemble`."""
    paths = [Path(p) for p in as_list(paths)]
    if len(paths) == 1:
        return load_stage(paths[0], stage)
    return StageEnsemble([load_stage(p, stage) for p in paths], paths).eval()


def recorded_split(settings: dict, root: str | Path | None = None) -> list[Record]:
    """Every image with its split, rebuilt from a checkpoint's `data` settings (`root`, if
    given, replaces the recorded folder)."""
    root = Path(root or settings["root"])
    # a run trained with data.skip_bad left the same unreadable files out of its split
    records = scan_kermany(root, skip_bad=bool(settings.get("skip_bad", False)))
    return split_records(records, settings["split"], settings["val_fraction"],
                         settings["test_fraction"], settings["split_seed"])


class ScoredImages(XrayDataset):
    """The images a stage scores; one that cannot be read becomes NaN pixels, so its logits are
    NaN and the pipeline gives it no decision, while the rest of its batch is scored."""

    def __getitem__(self, key: int) -> tuple[torch.Tensor, int]:
        try:
            return super().__getitem__(key)
        except ImageReadError:
            size = self.preprocessing.image_size
            return torch.full((1, size, size), float("nan")), self.targets[key]


class ShiftedImages(ScoredImages):
    """The images each under one held-out acquisition change (`held_out_shift`)."""

    def image(self, index: int) -> np.ndarray:
        return held_out_shift(super().image(index), index)


@torch.inference_mode()
def stage_outputs(module: StageClassifier, records: list[Record], batch_size: int = 32,
                  num_workers: int = 0, device: str = "cpu", tta: bool = False,
                  shifted: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2) logits and (N,) OOD scores of one stage for these images, preprocessed as that
    stage was trained (`forward_outputs`); `shifted`: each under a held-out acquisition change."""
    data = (ShiftedImages if shifted else ScoredImages)(
        records, module.hparams.stage, Preprocessing(**module.hparams.preprocessing))
    loader = DataLoader(data, batch_size=batch_size, num_workers=num_workers)
    module = module.to(device)
    out = [forward_outputs(module, images.to(device), tta) for images, _ in loader]
    if not out:
        return np.zeros((0, 2), np.float32), np.zeros(0, np.float32)
    return tuple(torch.cat([o[i].cpu() for o in out]).numpy() for i in (0, 1))


def stage_inputs(module: StageClassifier,
                 images: list[np.ndarray]) -> tuple[list[np.ndarray], torch.Tensor]:
    """What a stage sees: the preprocessed uint8 images and the normalised (N, 1, S, S) batch."""
    pre = Preprocessing(**module.hparams.preprocessing)
    seen = [pre(image) for image in images]
    return seen, torch.from_numpy(np.stack([pre.normalize(image) for image in seen]))


def fit_temperature(logits: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
    """Bias-corrected temperature scaling (Alexandari et al. 2020): the temperature T and bias b
    minimising the negative log-likelihood of P(class 1) = sigmoid((z1 - z0) / T + b). The bias
    takes up a miscalibrated class prior, which prior re-estimation by EM needs removed."""
    x = torch.as_tensor(logits[:, 1] - logits[:, 0], dtype=torch.float64)
    y = torch.as_tensor(targets, dtype=torch.float64)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t, bias], lr=0.1, max_iter=200)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x / log_t.exp() + bias, y)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0)), float(bias.detach().clamp(-10, 10))


def softmax_positive(logits: np.ndarray, temperature: float = 1.0,
                     shift: float = 0.0) -> np.ndarray:
    """Probability of class 1 from (N, 2) logits, at `temperature`, its logit moved by `shift`."""
    z = logits / temperature
    return 1.0 / (1.0 + np.exp(z[:, 0] - z[:, 1] - shift))


def combine(p_pneumonia: np.ndarray, p_viral_given_pneumonia: np.ndarray) -> np.ndarray:
    """(N, 3) probabilities of normal, bacterial, viral."""
    p, r = p_pneumonia, p_viral_given_pneumonia
    return np.stack([1 - p, p * (1 - r), p * r], 1)


@dataclass
class Calibration:
    """What the calibration images (the validation split, or a site's labelled folder) decide:
    temperatures and thresholds of both stages; and, after prior re-estimation on a site's
    unlabelled images (pneumonia.site), each stage's logit shift."""

    temperature: dict[str, float]
    thresholds: dict[str, dict[str, float]]  # stage -> operating point -> threshold
    target_sensitivity: float
    operating_point: str = "youden"
    validation_images: dict[str, int] = field(default_factory=dict)  # images fitted on, per stage
    source: str = "validation split"  # which images those were
    # their positive-class fraction, per stage
    priors: dict[str, float] = field(default_factory=dict)
    prior_shift: dict[str, float] = field(default_factory=lambda: {"binary": 0.0, "subtype": 0.0})
    # temperatures and thresholds fitted on the images pooled with a held-out shifted copy
    shifted_copy: bool = False
    # each stage's logit bias fitted with its temperature (0: a model calibrated before)
    bias: dict[str, float] = field(default_factory=lambda: {"binary": 0.0, "subtype": 0.0})

    def shift(self, stage: str) -> float:
        """The calibrated logit's offset: the fitted bias and any re-estimated prior's shift."""
        return self.bias.get(stage, 0.0) + self.prior_shift.get(stage, 0.0)


@dataclass
class Prediction:
    p_pneumonia: np.ndarray
    p_viral_given_pneumonia: np.ndarray
    probabilities: np.ndarray  # (N, 3): normal, bacterial, viral
    decision: np.ndarray  # class index into CLASSES; -1 where an output is not finite
    ood_score: np.ndarray  # stage 1's out-of-distribution score (pneumonia.ood); NaN: no gate

    @property
    def out_of_distribution(self) -> np.ndarray:
        """Where the gate flags the image (score above 1): no diagnosis unless accepted."""
        return np.nan_to_num(self.ood_score, nan=0.0) > 1

    def subset(self, keep: np.ndarray) -> Prediction:
        return Prediction(*(getattr(self, f.name)[keep] for f in fields(self)))


class TwoStagePipeline:
    """Two stage checkpoints, calibrated on validation data, as one three-class classifier.

    `tta`: each stage's logits are the mean over the image and its mirror image."""

    def __init__(self, binary: StageClassifier, subtype: StageClassifier,
                 calibration: Calibration | None = None, checkpoints: dict[str, str] | None = None,
                 tta: bool = False):
        self.stages = {"binary": binary, "subtype": subtype}
        self.calibration = calibration
        self.checkpoints = checkpoints or {}
        self.tta = tta

    @classmethod
    def from_checkpoints(cls, binary, subtype, tta: bool = False) -> TwoStagePipeline:
        """Each stage from one checkpoint path or a list of them (averaged)."""
        def names(paths):
            return [str(p) for p in paths] if isinstance(paths, (list, tuple)) else str(paths)

        return cls(load_stages(binary, "binary"), load_stages(subtype, "subtype"),
                   checkpoints={"binary": names(binary), "subtype": names(subtype)}, tta=tta)

    def data_settings(self) -> dict:
        """The split both stages were trained on; they must agree or the test split leaks."""
        settings = {name: dict(m.hparams.get("data") or {}) for name, m in self.stages.items()}
        if any(settings["binary"].get(k) != settings["subtype"].get(k) for k in SPLIT_KEYS):
            raise CheckpointError(
                "the two checkpoints were trained on different splits "
                f"(binary: {settings['binary']}, subtype: {settings['subtype']}); "
                "one stage's test images could be the other's training images"
            )
        return settings["binary"]

    def split(self, root: str | Path | None = None) -> list[Record]:
        """Every image with its split, rebuilt from the recorded settings (root may be moved)."""
        return recorded_split(self.data_settings(), root)

    def outputs(self, records: list[Record], shifted: bool = False,
                **loader) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Each stage's logits and stage 1's OOD scores (`stage_outputs`)."""
        out = {name: stage_outputs(m, records, tta=self.tta, shifted=shifted, **loader)
               for name, m in self.stages.items()}
        return {name: logits for name, (logits, _) in out.items()}, out["binary"][1]

    @property
    def ood_gate(self) -> dict | None:
        """Stage 1's out-of-distribution gate as the report states it, or None without one."""
        binary = self.stages["binary"]
        gates = [m.ood for m in stage_members(binary)]
        if any(g is None for g in gates):
            return None
        return {"fraction": gates[0].fraction, "members": len(gates), "images": gates[0].images}

    def calibrate(self, val: list[Record], target_sensitivity: float = 0.99,
                  operating_point: str = "youden", source: str = "validation split",
                  shifted: bool = True, **loader) -> Calibration:
        """Fit temperatures and thresholds on labelled images: the validation split, or a
        site's own (`source` names them); never on the test split.

        With `shifted` (for the training folder's validation split, not a site's own images)
        the temperatures, biases and thresholds are fitted on the images pooled with a copy
        under held-out acquisition changes (`held_out_shift`): validation from the training
        folder separates the classes so cleanly that its own best threshold can land anywhere
        in a wide gap, where a new site's images fall, and its probabilities are so confident
        that EM overestimates a new site's prior (docs/site.md)."""
        if any(r.split == "test" for r in val):
            raise DataError("calibration was given test images; it must only see validation data")
        logits, _ = self.outputs(val, **loader)
        moved = self.outputs(val, shifted=True, **loader)[0] if shifted else None
        temperature, bias, thresholds, counts, priors = {}, {}, {}, {}, {}
        for name, z in logits.items():
            y = np.array(stage_targets(name, (r.label for r in val)))
            keep = (y >= 0) & np.isfinite(z).all(axis=1)  # an unreadable image has no logits
            if len(np.unique(y[keep])) < 2:
                raise DataError(f"the {source} has no images of one {name} class")
            z_fit, y_fit = z[keep], y[keep]
            if moved is not None:
                z_fit, y_fit = np.vstack([z_fit, moved[name][keep]]), np.r_[y_fit, y_fit]
            temperature[name], bias[name] = fit_temperature(z_fit, y_fit)
            p = softmax_positive(z_fit, temperature[name], bias[name])
            thresholds[name] = {"youden": youden_threshold(y_fit, p), "default": 0.5}
            if name == "binary":  # a sensitivity target is a screening question: stage 1 only
                thresholds[name]["sensitivity"] = threshold_for_sensitivity(y_fit, p,
                                                                            target_sensitivity)
            counts[name], priors[name] = int(keep.sum()), float(y[keep].mean())
        self.calibration = Calibration(temperature, thresholds, target_sensitivity, operating_point,
                                       counts, source, priors, bias=bias, shifted_copy=shifted)
        return self.calibration

    def predict_logits(self, logits: dict[str, np.ndarray],
                       ood: np.ndarray | None = None) -> Prediction:
        """Calibrated probabilities and decisions from both stages' logits (and stage 1's OOD
        scores, NaN if not given)."""
        if self.calibration is None:
            raise RuntimeError("calibrate the pipeline on validation data first")
        cal = self.calibration
        p, r = (softmax_positive(logits[name], cal.temperature[name], cal.shift(name))
                for name in ("binary", "subtype"))
        t = self.stage_thresholds()
        decision = np.where(p >= t["binary"], np.where(r >= t["subtype"], 2, 1), 0)
        # A NaN compares False and would read as "normal": a non-finite output gets no decision.
        finite = np.isfinite(np.hstack([logits["binary"], logits["subtype"]])).all(axis=1)
        decision[~finite] = -1
        ood = np.full(len(p), np.nan, np.float32) if ood is None else ood
        return Prediction(p, r, combine(p, r), decision, ood)

    def predict(self, records: list[Record], **loader) -> Prediction:
        return self.predict_logits(*self.outputs(records, **loader))

    def stage_batches(
        self, images: list[np.ndarray]
    ) -> dict[str, tuple[list[np.ndarray], torch.Tensor]]:
        """Each stage's view of decoded (H, W) uint8 images (see `stage_inputs`)."""
        return {name: stage_inputs(module, images) for name, module in self.stages.items()}

    @torch.inference_mode()
    def predict_batches(self, batches: dict[str, tuple[list[np.ndarray], torch.Tensor]],
                        device: str = "cpu") -> Prediction:
        """Predictions from `stage_batches` output."""
        out = {name: forward_outputs(module.to(device), batches[name][1].to(device), self.tta)
               for name, module in self.stages.items()}
        return self.predict_logits({name: z.cpu().numpy() for name, (z, _) in out.items()},
                                   out["binary"][1].cpu().numpy())

    def stage_thresholds(self) -> dict[str, float]:
        """The decision threshold of each stage at the chosen operating point, on the
        probabilities the pipeline reports.

        Youden's and the sensitivity target's points are places on the ROC curve, which a new
        prior does not move: a re-estimated prior shifts the threshold with the probabilities
        (the same logit shift), so it changes the reported probabilities, not those decisions.
        `default` (0.5) is the most probable class: it decides under the new prior."""
        cal = self.calibration
        point = cal.operating_point
        thresholds = {"binary": cal.thresholds["binary"][point],
                      "subtype": cal.thresholds["subtype"]["default" if point == "default"
                                                          else "youden"]}
        if point == "default":
            return thresholds
        shift = {stage: cal.prior_shift.get(stage, 0.0) for stage in thresholds}
        return {stage: float(1 / (1 + np.exp(-(np.log(t / (1 - t)) + shift[stage]))))
                if shift[stage] and 0 < t < 1 else t for stage, t in thresholds.items()}

    @staticmethod
    def uncalibrated() -> Calibration:
        """Temperature 1 and threshold 0.5: for when no validation data is at hand."""
        return Calibration({"binary": 1.0, "subtype": 1.0},
                           {"binary": {"default": 0.5}, "subtype": {"default": 0.5}},
                           target_sensitivity=float("nan"), operating_point="default")
