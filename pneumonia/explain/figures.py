"""What explain.py writes besides the heatmaps: one figure per X-ray and the index page."""

from __future__ import annotations

import html
import urllib.parse
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from pneumonia.metadata import INTENDED_USE


def plot_explanation(path: Path, image: np.ndarray, heatmap: np.ndarray, probabilities: np.ndarray,
                     classes: tuple[str, ...], decision: str, caption: str, threshold_note: str,
                     title: str) -> None:
    """One image's report: what the model saw, the heatmap over it, the three probabilities."""
    fig = Figure(figsize=(13, 4.4))  # no pyplot: no global figure to close, no GUI backend
    axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1.2, 1]})
    for ax in axes[:2]:
        ax.imshow(image, cmap="gray", vmin=0, vmax=255)
        ax.axis("off")
    axes[0].set_title("input as the model saw it\n(cropped, resized)", fontsize=9)
    limit = float(np.abs(heatmap).max()) or 1.0
    overlay = axes[1].imshow(heatmap, cmap="bwr", vmin=-limit, vmax=limit, alpha=0.5)
    fig.colorbar(overlay, ax=axes[1], fraction=0.046, pad=0.04, label="change in probability")
    axes[1].set_title(caption, fontsize=9)
    bars = axes[2].bar(classes, probabilities, color=["#4c72b0", "#dd8452", "#c44e52"])
    bars[classes.index(decision)].set(edgecolor="black", linewidth=2.5)
    axes[2].bar_label(bars, fmt="%.2f", padding=2)
    axes[2].set_ylim(0, 1.1)
    axes[2].set_title(f"decision: {decision}", fontsize=11)
    axes[2].set_xlabel(threshold_note, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


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
    """The explanation index page: the model's intended use, every report as a card, every failed
    file with its reason.
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
        decision = html.escape(row["decision"])
        cards.append(f'<figure><a href="{link}"><img src="{link}" loading="lazy"></a>'
                     f'<figcaption><b class="{decision}">{decision}</b> {name}<br>{probs}'
                     "</figcaption></figure>")
    failures = f"<h2>Not explained ({len(failed)})</h2><ul>{''.join(failed)}</ul>" if failed else ""
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:1em}} figure{{display:inline-block;width:640px;\
margin:.5em;
vertical-align:top}} img{{width:100%}} .normal{{color:#4c72b0}} .bacterial{{color:#dd8452}}
.viral{{color:#c44e52}}</style></head><body><h1>{html.escape(title)}</h1>
<p><b>Intended use:</b> {html.escape(INTENDED_USE)}</p>
<p>{len(cards)} images explained. Click a report to open it full size.</p>{failures}{''.join(cards)}
</body></html>"""
