"""Clinical-study metrics on arrays of labels and probabilities, with bootstrap intervals.

Plain numpy so every value can be checked by hand. Binary inputs: y in {0, 1} (1 = the
stage's positive class), p = predicted probability of class 1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict

import numpy as np

from pneumonia.stages import CLASSES, STAGE_CLASSES


def roc_curve(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) for "positive if p >= threshold", thresholds descending.

    The first point is (0, 0) at threshold +inf.
    """
    y, p = np.asarray(y), np.asarray(p, dtype=np.float64)
    order = np.argsort(-p, kind="stable")
    p_sorted, y_sorted = p[order], y[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(p_sorted)), len(p_sorted) - 1]
    tp = np.cumsum(y_sorted)[last_of_tie]
    fp = (last_of_tie + 1) - tp
    n_pos, n_neg = max(y.sum(), 1), max(len(y) - y.sum(), 1)
    return (np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos], np.r_[np.inf, p_sorted[last_of_tie]])


def auroc(y: np.ndarray, p: np.ndarray) -> float:
    """Probability that a random positive scores above a random negative (ties count half):
    the trapezoidal area under `roc_curve`."""
    y = np.asarray(y)
    if not 0 < y.sum() < len(y):
        return float("nan")
    fpr, tpr, _ = roc_curve(y, p)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def average_precision(y: np.ndarray, p: np.ndarray) -> float:
    """Sum over thresholds of (recall step) x precision, as scikit-learn defines it."""
    y, p = np.asarray(y), np.asarray(p, dtype=np.float64)
    if y.sum() == 0:
        return float("nan")
    fpr, tpr, _ = roc_curve(y, p)
    n_pos, n_neg = y.sum(), len(y) - y.sum()
    tp, fp = tpr[1:] * n_pos, fpr[1:] * n_neg
    precision = tp / np.maximum(tp + fp, 1)
    return float(np.sum(np.diff(tpr) * precision))  # tpr[0] = 0


def specificity_at_sensitivity(y: np.ndarray, p: np.ndarray, sensitivity: float) -> float:
    """The best specificity among thresholds that reach at least this sensitivity."""
    fpr, tpr, _ = roc_curve(y, p)
    return float(np.max(1 - fpr[tpr >= sensitivity - 1e-12]))


def threshold_for_sensitivity(y: np.ndarray, p: np.ndarray, sensitivity: float) -> float:
    """The highest threshold whose sensitivity is at least the target."""
    _, tpr, thresholds = roc_curve(y, p)
    return float(thresholds[np.argmax(tpr >= sensitivity - 1e-12)])


def youden_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The threshold maximising sensitivity + specificity - 1 (the highest one on ties)."""
    fpr, tpr, thresholds = roc_curve(y, p)
    j = tpr - fpr
    j[0] = -np.inf  # never "nobody is positive"
    return float(thresholds[int(np.argmax(j))])


def binary_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    y, p = np.asarray(y), np.asarray(p, dtype=np.float64)
    (tn, fp), (fn, tp) = confusion_matrix(y, p >= threshold, 2).tolist()
    sensitivity = tp / max(tp + fn, 1)
    precision = tp / max(tp + fp, 1)
    return {
        "accuracy": (tp + tn) / len(y),
        "sensitivity": sensitivity,
        "specificity": tn / max(tn + fp, 1),
        "precision": precision,
        "f1": 2 * precision * sensitivity / max(precision + sensitivity, 1e-12),
        "auroc": auroc(y, p),
        "average_precision": average_precision(y, p),
        "specificity_at_95_sensitivity": specificity_at_sensitivity(y, p, 0.95),
        "specificity_at_99_sensitivity": specificity_at_sensitivity(y, p, 0.99),
        "false_positives": fp,
        "false_negatives": fn,
    }


def confusion_matrix(y: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts[true, predicted]."""
    return np.bincount(np.asarray(y) * n_classes + np.asarray(pred),
                       minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def multiclass_metrics(y: np.ndarray, pred: np.ndarray, classes: Sequence[str]) -> dict[str, float]:
    cm = confusion_matrix(y, pred, len(classes))
    out = {"accuracy": float(np.trace(cm) / cm.sum())}
    for i, name in enumerate(classes):
        precision = cm[i, i] / max(cm[:, i].sum(), 1)
        recall = cm[i, i] / max(cm[i, :].sum(), 1)
        out[f"precision_{name}"] = float(precision)
        out[f"recall_{name}"] = float(recall)
        out[f"f1_{name}"] = float(2 * precision * recall / max(precision + recall, 1e-12))
    return out


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """Mean |observed positive rate - mean predicted probability| over the bins of
    `reliability_curve`, weighted by the share of predictions in each bin."""
    mean_p, observed, counts = reliability_curve(y, p, bins)
    return float(np.sum(counts * np.abs(observed - mean_p)) / max(len(y), 1))


def reliability_curve(y: np.ndarray, p: np.ndarray, bins: int = 10):
    """(mean predicted, observed rate, count) per non-empty bin."""
    y, p = np.asarray(y), np.asarray(p, dtype=np.float64)
    index = np.minimum((p * bins).astype(int), bins - 1)
    rows = [(p[index == b].mean(), y[index == b].mean(), int((index == b).sum()))
            for b in range(bins) if (index == b).any()]
    return tuple(np.array(col) for col in zip(*rows)) if rows else (np.array([]),) * 3


# Metrics that are counts, not rates: they get no confidence interval.
_NO_INTERVAL = ("false_positives", "false_negatives")


def bootstrap_intervals(
    metric_fn: Callable[..., dict[str, float]],
    arrays: tuple[np.ndarray, ...],
    n: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap interval of every rate metric_fn returns, resampling images."""
    rng = np.random.default_rng(seed)
    size = len(arrays[0])
    samples: dict[str, list[float]] = {}
    for _ in range(n):
        index = rng.integers(0, size, size)
        for key, value in metric_fn(*(a[index] for a in arrays)).items():
            if key not in _NO_INTERVAL:
                samples.setdefault(key, []).append(value)
    alpha = (1 - level) / 2
    return {
        key: (float(np.nanquantile(v, alpha)), float(np.nanquantile(v, 1 - alpha)))
        for key, v in samples.items()
    }


def _stage_block(y: np.ndarray, p: np.ndarray, threshold: float, points: dict[str, float],
                 samples: int, seed: int) -> dict:
    """One stage's metrics at its decision threshold, with intervals, and at every operating
    point chosen on validation."""
    at = {}
    for name, t in points.items():
        m = binary_metrics(y, p, t)
        at[name] = {"threshold": t, **{k: m[k] for k in
                    ("sensitivity", "specificity", "false_positives", "false_negatives")}}
    return {"images": int(len(y)), "threshold": round(threshold, 6),
            "metrics": binary_metrics(y, p, threshold),
            "ci": bootstrap_intervals(lambda yy, pp: binary_metrics(yy, pp, threshold), (y, p),
                                      samples, seed),
            "operating_points": at}


def stage_truths(labels: list[str], pred) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(truth, P(positive class)) of each stage: binary on every image, subtype on the truly
    pneumonic ones."""
    truth = np.array([CLASSES.index(label) for label in labels])
    pneumonia = truth > 0
    return {"binary": (pneumonia.astype(int), pred.p_pneumonia),
            "subtype": ((truth[pneumonia] == 2).astype(int),
                        pred.p_viral_given_pneumonia[pneumonia])}


def evaluation_metrics(labels: list[str], pred, calibration, thresholds: dict[str, float],
                       samples: int, seed: int) -> dict:
    """metrics.json's figures: each stage at its decision threshold and the three-class
    decision, with bootstrap intervals, and the calibration that chose the thresholds."""
    stages = stage_truths(labels, pred)
    truth = np.array([CLASSES.index(label) for label in labels])
    metrics = {name: _stage_block(y, p, thresholds[name], calibration.thresholds[name],
                                  samples, seed)
               for name, (y, p) in stages.items()}
    metrics["pipeline"] = {
        "images": len(truth), "metrics": multiclass_metrics(truth, pred.decision, CLASSES),
        "ci": bootstrap_intervals(lambda a, b: multiclass_metrics(a, b, CLASSES),
                                  (truth, pred.decision), samples, seed),
        "confusion": confusion_matrix(truth, pred.decision, 3).tolist()}
    metrics["calibration"] = {
        **asdict(calibration),
        "ece": {name: expected_calibration_error(y, p) for name, (y, p) in stages.items()}}
    return metrics


def ood_metrics(labels: list[str], paths: list[str], pred, gate: dict | None, calibration,
                thresholds: dict[str, float], samples: int, seed: int) -> dict:
    """What stage 1's out-of-distribution gate would withhold from these images, and each
    stage's and the pipeline's figures without those images."""
    if gate is None:
        return {"gate": None}
    flagged = pred.out_of_distribution
    out = {"gate": gate, "flagged": int(flagged.sum()), "flagged_fraction": float(flagged.mean()),
           "flagged_images": [{"path": p, "score": float(s)}
                              for p, s, f in zip(paths, pred.ood_score, flagged) if f]}
    kept = [label for label, f in zip(labels, flagged) if not f]
    if flagged.any() and len(set(kept)) > 1:
        figures = evaluation_metrics(kept, pred.subset(~flagged), calibration, thresholds,
                                     samples, seed)
        out["without_flagged"] = {k: figures[k] for k in (*STAGE_CLASSES, "pipeline")}
    return out
