"""metadata.json of a model folder: what the model is for, what it was made from and how it
answers, in the spirit of a MONAI bundle's metadata.json. Its contract is
metadata.schema.json (beside this file; tests/test_model_folder.py validates against
it)."""

from __future__ import annotations

import importlib.metadata
import json
from datetime import datetime, timezone
from pathlib import Path

SCHEMA = Path(__file__).with_name("metadata.schema.json")
INTENDED_USE = ("Research on pediatric chest X-ray classification (normal, bacterial pneumonia, "
                "viral pneumonia). Not a medical device and not for clinical use: no decision "
                "about a patient may rest on it.")
DATA = {"source": "Kermany D. et al. (2018), Labeled Optical Coherence Tomography (OCT) and "
                  "Chest X-Ray Images for Classification, Mendeley Data v2, "
                  "doi:10.17632/rscbjbr9sj.2 (pediatric patients aged 1-5, Guangzhou Women and "
                  "Children's Medical Center)",
        "licence": "CC BY 4.0"}
OUTPUT_FIELDS = {
    "p_normal": ("number or null", "[0, 1]", "P(normal); null when `error` is set"),
    "p_bacterial": ("number or null", "[0, 1]", "P(bacterial pneumonia); null when `error` is set"),
    "p_viral": ("number or null", "[0, 1]", "P(viral pneumonia); null when `error` is set"),
    "ood_score": ("number or null", "[0, inf)", "stage 1's out-of-distribution score; above 1 "
                  "the image is unlike the training X-rays and gets no diagnosis"),
    "decision": ("string", "normal | bacterial | viral | empty", "empty when `error` is set"),
    "threshold_binary": ("number", "[0, 1]", "stage 1's threshold on P(pneumonia)"),
    "threshold_subtype": ("number", "[0, 1]", "stage 2's threshold on P(viral | pneumonia)"),
    "error": ("string", "empty or a reason", "why no diagnosis was given"),
}
# the kinds of `error` value the served model gives (pneumonia.serving.predict_images; a DICOM
# header it cannot use gets its own reason from pneumonia.io)
# what one request may hold; a larger one is refused (HTTP 400) before any image is decoded
MAX_REQUEST_IMAGES = 256
MAX_REQUEST_BYTES = 64 * 2**20  # of base64 text, all images together
OOD_ERROR = "out of distribution: unlike the training X-rays (score above 1), no diagnosis"
NONFINITE_ERROR = "the model gave a non-finite output: no diagnosis"
ERRORS = ["not valid base64 text", "expected base64 text of a JPEG, PNG or DICOM file",
          "not a JPEG, PNG or DICOM file (unrecognised content)", "cannot open (<reason>)",
          "not a chest radiograph (Modality=<modality>[, BodyPartExamined=<part>])",
          OOD_ERROR, NONFINITE_ERROR]


def _headline(evaluation: dict | None) -> dict | None:
    if not evaluation:
        return None
    stage1, stage2 = (evaluation[s]["metrics"] for s in ("binary", "subtype"))
    return {"split": evaluation["split"], "images": evaluation["n_images"],
            "stage1_accuracy": stage1["accuracy"], "stage1_auroc": stage1["auroc"],
            "stage1_sensitivity": stage1["sensitivity"],
            "stage1_specificity": stage1["specificity"],
            "stage2_accuracy": stage2["accuracy"],
            "three_class_accuracy": evaluation["pipeline"]["metrics"]["accuracy"]}


def write_metadata(path: Path, pipeline, spec: dict, evaluation: dict | None = None) -> Path:
    """metadata.json for a model folder from its pipeline, its pipeline.json `spec` and the
    evaluation that made it (None: no figures)."""
    cal = pipeline.calibration
    site = (evaluation or {}).get("site") or {}
    metadata = {
        "name": "pneumonia two-stage chest X-ray classifier",
        "version": importlib.metadata.version("pneumonia"),
        "commit": spec["versions"].get("git_commit"),
        "commit_dirty": spec["versions"].get("git_dirty") in (True, "true", "True"),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "intended_use": INTENDED_USE,
        "data": DATA,
        "input": {"column": "image", "encoding": "base64 text of one file per row",
                  "max_images_per_request": MAX_REQUEST_IMAGES,
                  "max_base64_bytes_per_request": MAX_REQUEST_BYTES,
                  "formats": ["JPEG", "PNG", "DICOM"],
                  "modality_gate": "a DICOM header of another modality is refused; stage 1's "
                                   "out-of-distribution gate flags images unlike the training "
                                   "X-rays (no diagnosis)",
                  "preprocessing": {stage: dict(module.hparams["preprocessing"])
                                    for stage, module in pipeline.stages.items()}},
        "outputs": {name: {"type": t, "range": r, "meaning": m}
                    for name, (t, r, m) in OUTPUT_FIELDS.items()},
        "errors": ERRORS,
        "classes": spec["classes"],
        "thresholds": spec["thresholds"],
        "operating_point": cal.operating_point,
        "calibration": {"source": cal.source, "images": cal.validation_images,
                        "shifted_copy": cal.shifted_copy},
        "adaptation": site.get("adaptation"),
        "weights": {stage: {**spec["weights"][stage], "files": spec["checkpoints"][stage]}
                    for stage in spec["checkpoints"]},
        "evaluation": _headline(evaluation),
    }
    path.write_text(json.dumps(metadata, indent=2, default=str) + "\n")
    return path
