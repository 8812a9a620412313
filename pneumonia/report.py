"""The evaluation report folder: metrics.json, predictions.csv, figures, report.md (the figures'
values come from `pneumonia.metrics`)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pneumonia.csvio import write_csv  # noqa: E402
from pneumonia.metrics import (  # noqa: E402
    confusion_matrix,
    reliability_curve,
    roc_curve,
    stage_truths,
)
from pneumonia.stages import CLASSES, STAGE_CLASSES  # noqa: E402

STAGE_TITLES = {"binary": "Stage 1, binary: normal vs pneumonia",
                "subtype": "Stage 2, subtype: bacterial vs viral (true pneumonia images)",
                "pipeline": "Three-class pipeline: normal / bacterial / viral"}

def write_predictions(path: Path, paths: list[str], truth: list[str], probabilities: np.ndarray,
                      decisions: list[str], classes: tuple[str, ...]) -> Path:
    """predictions.csv: one row per image, its true class, probabilities and decision."""
    header = ["path", "truth", *(f"p_{c}" for c in classes), "decision"]
    return write_csv(path, header, ([row[0], row[1], *(f"{v:.6f}" for v in row[2]), row[3]]
                                    for row in zip(paths, truth, probabilities, decisions)))


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_confusion(path: Path, counts: np.ndarray, classes: list[str], title: str) -> Path:
    """Counts and row-normalised (recall) side by side."""
    fig, axes = plt.subplots(1, 2, figsize=(4.2 * 2, 3.8))
    rows = counts.sum(axis=1, keepdims=True)
    normalised = counts / np.maximum(rows, 1)
    for ax, values, fmt, name in ((axes[0], counts, "{:d}", "counts"),
                                  (axes[1], normalised, "{:.2f}", "normalised by true class")):
        ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
        for (i, j), value in np.ndenumerate(values):
            ax.text(j, i, fmt.format(value), ha="center", va="center",
                    color="white" if normalised[i, j] > 0.5 else "black")
        ax.set_xticks(range(len(classes)), classes)
        ax.set_yticks(range(len(classes)), classes)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{title}: {name}", fontsize=9)
    return _save(fig, path)


def plot_roc(path: Path, y: np.ndarray, p: np.ndarray, points: dict[str, dict],
             title: str) -> Path:
    """ROC curve with each operating point (a threshold chosen on validation data, with its
    sensitivity and specificity on these images, `metrics.json`'s `operating_points`) marked."""
    fpr, tpr, _ = roc_curve(y, p)
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    ax.plot(fpr, tpr, lw=2, label="ROC")
    ax.plot([0, 1], [0, 1], ls=":", c="grey")
    for (name, point), marker in zip(points.items(), "osD^"):
        x, t = 1 - point["specificity"], point["sensitivity"]
        ax.plot([x], [t], marker, ms=8,
                label=f"{name} (t={point['threshold']:.3f}): sens {t:.3f}, 1-spec {x:.3f}")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def plot_reliability(path: Path, curves: dict[str, tuple[np.ndarray, np.ndarray]]) -> Path:
    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 4))
    for ax, (name, (y, p)) in zip(np.atleast_1d(axes), curves.items()):
        mean_p, observed, counts = reliability_curve(y, p)
        ax.plot([0, 1], [0, 1], ls=":", c="grey")
        ax.plot(mean_p, observed, "o-")
        for x, o, n in zip(mean_p, observed, counts):
            ax.annotate(str(n), (x, o), fontsize=6, xytext=(3, -8), textcoords="offset points")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("mean predicted probability")
        ax.set_ylabel("observed frequency")
        ax.set_title(name, fontsize=9)
    return _save(fig, path)


def _row(name: str, value: float, interval: tuple[float, float] | None) -> str:
    ci = f"{interval[0]:.3f} – {interval[1]:.3f}" if interval else ""
    shown = f"{value:.3f}" if isinstance(value, float) else str(value)
    return f"| {name} | {shown} | {ci} |"


def write_markdown(path: Path, metrics: dict, figures: list[Path]) -> Path:
    lines = ["# Evaluation report", "",
             f"Split: **{metrics['split']}** ({metrics['n_images']} images). Thresholds and "
             f"temperatures were fitted on the {metrics['calibration']['source']} "
             f"({metrics['calibration']['validation_images']}); the decision uses the "
             f"**{metrics['calibration']['operating_point']}** operating point.", ""]
    lines += _site_lines(metrics.get("site") or {})
    unscored = metrics.get("unscored_images") or []
    if unscored:
        lines += [f"**{len(unscored)} images got no decision** and are left out of every figure "
                  "below:", "", *(f"- `{u['path']}`: {u['reason']}" for u in unscored), ""]
    for section in STAGE_TITLES:
        block = metrics[section]
        lines += [f"## {STAGE_TITLES[section]}", "", f"{block['images']} images, threshold "
                  f"{block.get('threshold', '-')}", "", "| metric | value | 95 % CI (bootstrap) |",
                  "|---|---|---|"]
        lines += [_row(k, v, block["ci"].get(k)) for k, v in block["metrics"].items()]
        lines.append("")
        for name, point in block.get("operating_points", {}).items():
            origin = "fixed" if name == "default" else "chosen on validation"
            lines.append(f"- at the **{name}** threshold {point['threshold']:.4f} ({origin}): "
                         f"sensitivity {point['sensitivity']:.3f}, specificity "
                         f"{point['specificity']:.3f}, {point['false_positives']} false positives, "
                         f"{point['false_negatives']} false negatives")
        lines.append("")
    lines += _ood_lines(metrics["ood"])
    lines += ["## Calibration", "", "Expected calibration error (10 bins): " + ", ".join(
        f"{k} {v:.3f}" for k, v in metrics["calibration"]["ece"].items()), ""]
    lines += [f"![{f.stem}]({f.name})" for f in figures]
    path.write_text("\n".join(lines) + "\n")
    return path


def _site_lines(site: dict) -> list[str]:
    lines = []
    adaptation = site.get("adaptation")
    if adaptation:
        adabn = "stage 1's BatchNorm statistics (class-balanced AdaBN; stage 2 unchanged)"
        what = {"batchnorm": adabn, "prior": "the share of pneumonia (EM)",
                "both": f"{adabn} and the share of pneumonia (EM)"}[adaptation["method"]]
        lines.append(f"Adapted to the site: {what}, on the {adaptation['images']} unlabelled "
                     f"images of `{adaptation['folder']}`.")
        for stage, prior in (adaptation.get("priors") or {}).items():
            lines.append(f"- {stage}: positive-class prior {prior['calibration']:.3f} in "
                         f"calibration, {prior['site']:.3f} estimated at the site")
    if site.get("transductive"):
        lines.append("**Transductive**: the calibration or adaptation images may be the scored "
                     "images themselves (transductive=true); the figures are not those of a model "
                     "that meets each image fresh.")
    return lines + [""] if lines else []


def _ood_lines(ood: dict) -> list[str]:
    lines = ["## Out-of-distribution gate", ""]
    if ood["gate"] is None:
        return lines + ["The binary checkpoint has no gate (trained before it existed).", ""]
    lines.append(f"The gate (fitted to flag {100 * ood['gate']['fraction']:.1f} % of validation "
                 f"images) would withhold **{ood['flagged']} of these images** "
                 f"({100 * ood['flagged_fraction']:.1f} %); the figures above include them.")
    without = ood.get("without_flagged")
    if without:
        b, m = without["binary"]["metrics"], without["pipeline"]["metrics"]
        lines.append(f"Without them: stage 1 accuracy {b['accuracy']:.3f}, AUROC {b['auroc']:.3f}; "
                     f"three-class accuracy {m['accuracy']:.3f} "
                     "(metrics.json: ood.without_flagged).")
    return lines + [""]


def evaluation_figures(output_dir: Path, labels: list[str], pred, metrics: dict,
                       thresholds: dict[str, float]) -> list[Path]:
    """Confusion matrices, ROC curves with the operating points, and the reliability diagram."""
    stages = stage_truths(labels, pred)
    counts = {name: confusion_matrix(y, (p >= thresholds[name]).astype(int), 2)
              for name, (y, p) in stages.items()}
    counts["pipeline"] = np.array(metrics["pipeline"]["confusion"])
    classes = {**STAGE_CLASSES, "pipeline": CLASSES}
    figures = [plot_confusion(output_dir / f"confusion_{name}.png", matrix, list(classes[name]),
                              name) for name, matrix in counts.items()]
    for name, (y, p) in stages.items():
        positive = STAGE_CLASSES[name][1]
        figures.append(plot_roc(output_dir / f"roc_{name}.png", y, p,
                                metrics[name]["operating_points"],
                                f"{STAGE_TITLES[name]}: ROC ({positive} positive)"))
    figures.append(plot_reliability(output_dir / "reliability.png", {
        "binary: P(pneumonia)": stages["binary"],
        "subtype: P(viral | pneumonia)": stages["subtype"]}))
    return figures


def write_json(path: Path, payload: dict) -> Path:
    path.write_text(json.dumps(payload, indent=2, default=float))
    return path


