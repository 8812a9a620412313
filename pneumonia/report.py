"""The evaluation report folder (metrics.json, predictions.csv, figures, report.md), and the
project's CSV writer, which keeps spreadsheet formulas out of every file it writes."""

from __future__ import annotations

import csv
import html
import json
import urllib.parse
from collections.abc import Iterable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pneumonia.metrics import (  # noqa: E402
    binary_metrics,
    bootstrap_intervals,
    confusion_matrix,
    expected_calibration_error,
    multiclass_metrics,
    reliability_curve,
    roc_curve,
)
from pneumonia.stages import CLASSES, STAGE_CLASSES  # noqa: E402

STAGE_TITLES = {"binary": "Stage 1, binary: normal vs pneumonia",
                "subtype": "Stage 2, subtype: bacterial vs viral (true pneumonia images)",
                "pipeline": "Three-class pipeline: normal / bacterial / viral"}

# A spreadsheet runs a cell that starts with one of these as a formula (OWASP: CSV injection).
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
ESCAPE = "'"  # spreadsheets show a cell that starts with it as text


def _looks_like_formula(text: str) -> bool:
    return text.lstrip(ESCAPE).startswith(FORMULA_PREFIXES)


def neutralise(cell: object) -> object:
    """The cell as written to a CSV file: text that could run as a formula gets a leading
    apostrophe; numbers stay numbers (-0.5 from a float is data, "-x.png" is text).

    Text that starts with apostrophes before a formula character gets one more, so that
    `restore` gives back every text exactly.
    """
    if isinstance(cell, str) and _looks_like_formula(cell):
        return ESCAPE + cell
    return cell


def restore(cell: str) -> str:
    """The text `neutralise` was given, from the text it wrote."""
    return cell[1:] if cell.startswith(ESCAPE) and _looks_like_formula(cell) else cell


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[object]],
              append: bool = False) -> Path:
    """A CSV file safe to open in a spreadsheet (every cell through `neutralise`); with
    append=True the rows go at the end of an existing file, the header only into a new one."""
    new = not (append and path.is_file())
    with path.open("a" if append else "w", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow([neutralise(c) for c in header])
        writer.writerows([neutralise(c) for c in row] for row in rows)
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    """The rows of a file `write_csv` wrote, as {column: text}, each text as it was given."""
    with Path(path).open(newline="") as f:
        return [{restore(k): restore(v) for k, v in row.items()} for row in csv.DictReader(f)]


def write_predictions(path: Path, paths: list[str], truth: list[str], probabilities: np.ndarray,
                      decisions: list[str], classes: tuple[str, ...]) -> Path:
    """predictions.csv: one row per image, its true class, probabilities and decision."""
    header = ["path", "truth", *(f"p_{c}" for c in classes), "decision"]
    return write_csv(path, header, ([row[0], row[1], *(f"{v:.6f}" for v in row[2]), row[3]]
                                    for row in zip(paths, truth, probabilities, decisions)))


def plot_confusion(path: Path, counts: np.ndarray, classes: list[str], title: str) -> Path:
    """Counts and row-normalised (recall) side by side."""
    fig, axes = plt.subplots(1, 2, figsize=(4.2 * 2, 3.8))
    rows = counts.sum(axis=1, keepdims=True)
    normalised = counts / np.maximum(rows, 1)
    for ax, values, fmt, name in ((axes[0], counts, "{:d}", "counts"),
                                  (axes[1], normalised, "{:.2f}", "normalised by true class")):
        ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
        for i in range(len(classes)):
            for j in range(len(classes)):
                ax.text(j, i, fmt.format(values[i, j]), ha="center", va="center",
                        color="white" if normalised[i, j] > 0.5 else "black")
        ax.set_xticks(range(len(classes)), classes)
        ax.set_yticks(range(len(classes)), classes)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{title}: {name}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_roc(path: Path, y: np.ndarray, p: np.ndarray, points: dict[str, float], title: str) -> Path:
    """ROC curve with each operating point (a threshold chosen on validation data) marked."""
    fpr, tpr, _ = roc_curve(y, p)
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    ax.plot(fpr, tpr, lw=2, label="ROC")
    ax.plot([0, 1], [0, 1], ls=":", c="grey")
    for (name, threshold), marker in zip(points.items(), "osD^"):
        pred = p >= threshold
        x = pred[y == 0].mean() if (y == 0).any() else 0.0
        t = pred[y == 1].mean() if (y == 1).any() else 0.0
        ax.plot([x], [t], marker, ms=8, label=f"{name} (t={threshold:.3f}): sens {t:.3f}, 1-spec {x:.3f}")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
        what = {"batchnorm": "BatchNorm statistics (AdaBN)", "prior": "the share of pneumonia (EM)",
                "both": "BatchNorm statistics (AdaBN) and the share of pneumonia (EM)"}[adaptation["method"]]
        lines.append(f"Adapted to the site: {what}, on the {adaptation['images']} unlabelled images "
                     f"of `{adaptation['folder']}`.")
        for stage, prior in (adaptation.get("priors") or {}).items():
            lines.append(f"- {stage}: positive-class prior {prior['calibration']:.3f} in calibration, "
                         f"{prior['site']:.3f} estimated at the site")
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
                     f"three-class accuracy {m['accuracy']:.3f} (metrics.json: ood.without_flagged).")
    return lines + [""]


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
            "subtype": ((truth[pneumonia] == 2).astype(int), pred.p_viral_given_pneumonia[pneumonia])}


def evaluation_metrics(labels: list[str], pred, calibration, thresholds: dict[str, float],
                       samples: int, seed: int) -> dict:
    """metrics.json's figures: each stage at its decision threshold and the three-class
    decision, with bootstrap intervals, and the calibration that chose the thresholds."""
    stages = stage_truths(labels, pred)
    truth = np.array([CLASSES.index(label) for label in labels])
    metrics = {name: _stage_block(y, p, thresholds[name], calibration.thresholds[name], samples, seed)
               for name, (y, p) in stages.items()}
    labels3 = list(CLASSES)
    metrics["pipeline"] = {
        "images": len(truth), "metrics": multiclass_metrics(truth, pred.decision, labels3),
        "ci": bootstrap_intervals(lambda a, b: multiclass_metrics(a, b, labels3),
                                  (truth, pred.decision), samples, seed),
        "confusion": confusion_matrix(truth, pred.decision, 3).tolist()}
    metrics["calibration"] = {
        "operating_point": calibration.operating_point, "temperature": calibration.temperature,
        "thresholds": calibration.thresholds, "target_sensitivity": calibration.target_sensitivity,
        "validation_images": calibration.validation_images, "source": calibration.source,
        "priors": calibration.priors, "prior_shift": calibration.prior_shift,
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
        figures = evaluation_metrics(kept, pred.subset(~flagged), calibration, thresholds, samples, seed)
        out["without_flagged"] = {k: figures[k] for k in STAGE_TITLES}
    return out


def evaluation_figures(output_dir: Path, labels: list[str], pred, metrics: dict,
                       thresholds: dict[str, float]) -> list[Path]:
    """Confusion matrices, ROC curves with the operating points, and the reliability diagram."""
    stages = stage_truths(labels, pred)
    figures = []
    for name, (y, p) in stages.items():
        decided = (p >= thresholds[name]).astype(int)
        figures.append(plot_confusion(output_dir / f"confusion_{name}.png", confusion_matrix(y, decided, 2),
                                      list(STAGE_CLASSES[name]), name))
    figures.append(plot_confusion(output_dir / "confusion_pipeline.png",
                                  np.array(metrics["pipeline"]["confusion"]), list(CLASSES), "pipeline"))
    for name, (y, p) in stages.items():
        positive = STAGE_CLASSES[name][1]
        figures.append(plot_roc(output_dir / f"roc_{name}.png", y, p, metrics["calibration"]["thresholds"][name],
                                f"{STAGE_TITLES[name]}: ROC ({positive} positive)"))
    figures.append(plot_reliability(output_dir / "reliability.png", {
        "binary: P(pneumonia)": stages["binary"], "subtype: P(viral | pneumonia)": stages["subtype"]}))
    return figures


def write_json(path: Path, payload: dict) -> Path:
    path.write_text(json.dumps(payload, indent=2, default=float))
    return path


def plot_explanation(path: Path, image: np.ndarray, heatmap: np.ndarray, probabilities: np.ndarray,
                     classes: tuple[str, ...], decision: str, caption: str, threshold_note: str,
                     title: str) -> Path:
    """One image's report: what the model saw, the heatmap over it, the three probabilities."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.4), gridspec_kw={"width_ratios": [1, 1.2, 1]})
    axes[0].imshow(image, cmap="gray", vmin=0, vmax=255)
    axes[0].set_title("input as the model saw it\n(cropped, resized)", fontsize=9)
    axes[1].imshow(image, cmap="gray", vmin=0, vmax=255)
    limit = float(np.abs(heatmap).max()) or 1.0
    overlay = axes[1].imshow(heatmap, cmap="bwr", vmin=-limit, vmax=limit, alpha=0.5)
    fig.colorbar(overlay, ax=axes[1], fraction=0.046, pad=0.04, label="change in probability")
    axes[1].set_title(caption, fontsize=9)
    for ax in axes[:2]:
        ax.axis("off")
    bars = axes[2].bar(classes, probabilities, color=["#4c72b0", "#dd8452", "#c44e52"])
    bars[classes.index(decision)].set_edgecolor("black")
    bars[classes.index(decision)].set_linewidth(2.5)
    for bar, value in zip(bars, probabilities):
        axes[2].text(bar.get_x() + bar.get_width() / 2, value + 0.02, f"{value:.2f}", ha="center")
    axes[2].set_ylim(0, 1.1)
    axes[2].set_title(f"decision: {decision}", fontsize=11)
    axes[2].set_xlabel(threshold_note, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def report_names(files: list[str]) -> list[Path]:
    """A report path per input file (relative display names, as `display_name` gives them), unique
    even where file systems ignore case: `a/x.jpeg` -> `reports/a/x.jpeg.png` (the suffix stays,
    so x.png and x.jpeg differ), and a name already taken in any case gets `-2`, `-3`... before
    `.png`."""
    taken: set[str] = set()
    names = []
    for file in map(Path, files):
        base = Path("reports") / file.parent / (file.name + ".png")
        candidate, n = base, 1
        while candidate.as_posix().lower() in taken:
            n += 1
            candidate = base.with_name(f"{file.name}-{n}.png")
        taken.add(candidate.as_posix().lower())
        names.append(candidate)
    return names


def index_html(rows: list[dict], title: str, classes: tuple[str, ...]) -> str:
    """The explanation index page: every report as a card, every failed file with its reason.
    Names are escaped as HTML, links as URLs (so `#`, `?` and `%` in names still work)."""
    cards, failed = [], []
    for row in rows:
        name = html.escape(row["file"])
        if row["status"] != "ok":
            failed.append(f"<li><code>{name}</code> ({html.escape(row['status'])}): "
                          f"{html.escape(row['reason'])}</li>")
            continue
        link = html.escape(urllib.parse.quote(row["report"], errors="replace"))
        probs = ", ".join(f"{c} {float(row['p_' + c]):.2f}" for c in classes)
        cards.append(f'<figure><a href="{link}"><img src="{link}" loading="lazy"></a><figcaption>'
                     f'<b class="{html.escape(row["decision"])}">{html.escape(row["decision"])}</b> '
                     f"{name}<br>{probs}</figcaption></figure>")
    failures = f"<h2>Not explained ({len(failed)})</h2><ul>{''.join(failed)}</ul>" if failed else ""
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:1em}} figure{{display:inline-block;width:640px;margin:.5em;
vertical-align:top}} img{{width:100%}} .normal{{color:#4c72b0}} .bacterial{{color:#dd8452}}
.viral{{color:#c44e52}}</style></head><body><h1>{html.escape(title)}</h1>
<p>{len(cards)} images explained. Click a report to open it full size.</p>{failures}{''.join(cards)}
</body></html>"""
