"""explain(cfg): a folder of X-rays in, one report figure per image, a summary and an index page."""

from __future__ import annotations

import csv
import html
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from pneumonia.attribution import METHODS, attribution_map
from pneumonia.io import IMAGE_SUFFIXES, ImageReadError, read_grayscale
from pneumonia.pipeline import CLASSES, TwoStagePipeline, resolve_checkpoints
from pneumonia.report import plot_explanation
from pneumonia.stages import STAGE_CLASSES

log = logging.getLogger(__name__)
SUMMARY_FIELDS = ("file", "status", "reason", "p_normal", "p_bacterial", "p_viral", "decision",
                  "explained_class", "attribution_seconds", "report")


def input_files(folder: Path) -> list[Path]:
    """Every visible file under the folder, images or not (non-images are reported, not hidden)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"input={folder} does not exist or is not a folder")
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _prepare_output(output_dir: Path, input_dir: Path, overwrite: bool) -> None:
    out, inp = output_dir.resolve(), input_dir.resolve()
    if out == inp or inp in out.parents:
        raise ValueError(f"output folder {out} is inside the input folder {inp}; inputs are never written")
    existing = [n for n in ("summary.csv", "index.html", "reports") if (output_dir / n).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{output_dir} already holds results; choose another output or pass overwrite=true")
    output_dir.mkdir(parents=True, exist_ok=True)


def load_pipeline(cfg: DictConfig, downloads: Path) -> TwoStagePipeline:
    """From an evaluation's pipeline.json, or two checkpoints calibrated on their validation split."""
    if cfg.pipeline:
        return TwoStagePipeline.load(Path(cfg.pipeline))
    if not cfg.binary or not cfg.subtype:
        raise ValueError("explain needs pipeline=<pipeline.json> or binary=... and subtype=...")
    ckpts = {s: resolve_checkpoints(cfg[s], s, cfg.paths.tracking_uri, downloads / s) for s in ("binary", "subtype")}
    pipeline = TwoStagePipeline.from_checkpoints(ckpts["binary"], ckpts["subtype"])
    root = Path(pipeline.data_settings().get("root") or "")
    if root.is_dir():
        val = [r for r in pipeline.split(root) if r.split == "val"]
        pipeline.calibrate(val, operating_point=cfg.operating_point, device=cfg.device)
    else:
        log.warning("Training data %s not found: no validation calibration, thresholds 0.5", root)
        pipeline.calibration = TwoStagePipeline.uncalibrated()
    return pipeline


def _index_html(rows: list[dict], title: str) -> str:
    cards, failed = [], []
    for row in rows:
        name = html.escape(row["file"])
        if row["status"] != "ok":
            failed.append(f"<li><code>{name}</code>: {html.escape(row['reason'])}</li>")
            continue
        probs = ", ".join(f"{c} {float(row['p_' + c]):.2f}" for c in CLASSES)
        cards.append(f'<figure><a href="{html.escape(row["report"])}"><img src="{html.escape(row["report"])}" '
                     f'loading="lazy"></a><figcaption><b class="{row["decision"]}">{row["decision"]}</b> '
                     f"{name}<br>{probs}</figcaption></figure>")
    failures = f"<h2>Not explained ({len(failed)})</h2><ul>{''.join(failed)}</ul>" if failed else ""
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:1em}} figure{{display:inline-block;width:640px;margin:.5em;
vertical-align:top}} img{{width:100%}} .normal{{color:#4c72b0}} .bacterial{{color:#dd8452}}
.viral{{color:#c44e52}}</style></head><body><h1>{html.escape(title)}</h1>
<p>{len(cards)} images explained. Click a report to open it full size.</p>{failures}{''.join(cards)}
</body></html>"""


def explain(cfg: DictConfig) -> dict[str, Any]:
    """Explain every image of cfg.input. Returns the summary rows and the number of failures."""
    if cfg.method not in METHODS:
        raise ValueError(f"method={cfg.method!r} is not one of: {', '.join(METHODS)}")
    if cfg.stage not in STAGE_CLASSES:
        raise ValueError(f"stage={cfg.stage!r} is not one of: {', '.join(STAGE_CLASSES)}")
    input_dir, output_dir = Path(cfg.input).expanduser(), Path(cfg.paths.output_dir)
    files = input_files(input_dir)[: cfg.limit or None]
    _prepare_output(output_dir, input_dir, cfg.overwrite)
    pipeline = load_pipeline(cfg, output_dir / "checkpoints")
    module = pipeline.stages[cfg.stage]
    pre = module.hparams.preprocessing
    baseline = (cfg.baseline - pre["mean"]) / pre["std"]  # pixel value in [0, 1] -> model space
    thresholds = pipeline.stage_thresholds()
    classes = STAGE_CLASSES[cfg.stage]
    if cfg.precision not in ("32", "bf16"):
        raise ValueError(f"precision={cfg.precision!r} is not one of: 32, bf16")
    # channels_last paid 1.8x for occlusion on a 2-core CPU (benchmarks/occlusion_speed.py)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    net = module.net.to(cfg.device, memory_format=memory_format)

    rows: list[dict] = []
    progress = tqdm(total=len(files), desc="explaining", unit="image")
    for start in range(0, len(files), cfg.batch_images):
        batch_files, images = [], []
        for path in files[start:start + cfg.batch_images]:
            try:
                if path.suffix.lower() not in IMAGE_SUFFIXES:
                    raise ImageReadError(path, f"not an image file (suffix {path.suffix or 'none'})")
                images.append(read_grayscale(path))
                batch_files.append(path)
            except ImageReadError as err:
                rows.append({"file": str(path.relative_to(input_dir)), "status": "failed",
                             "reason": err.reason})
        if images:
            batches = pipeline.stage_batches(images)  # preprocess each image once per stage
            pred = pipeline.predict_batches(batches, cfg.device)
            seen, batch = batches[cfg.stage]
            positive = pred.p_pneumonia if cfg.stage == "binary" else pred.p_viral_given_pneumonia
            target = torch.as_tensor((positive >= thresholds[cfg.stage]).astype(np.int64))
            started = time.perf_counter()
            with torch.autocast(torch.device(cfg.device).type, dtype=torch.bfloat16,
                                enabled=cfg.precision == "bf16"):
                maps = attribution_map(cfg.method, net, batch.to(cfg.device, memory_format=memory_format),
                                       target.to(cfg.device), cfg.window, cfg.stride, baseline,
                                       cfg.perturbations_per_eval).float().cpu().numpy()
            seconds = (time.perf_counter() - started) / len(images)
            for i, path in enumerate(batch_files):
                relative = path.relative_to(input_dir)
                report = Path("reports") / relative.with_suffix(".png")
                (output_dir / report).parent.mkdir(parents=True, exist_ok=True)
                decision = CLASSES[pred.decision[i]]
                explained = classes[int(target[i])]
                plot_explanation(
                    output_dir / report, seen[i], maps[i], pred.probabilities[i], CLASSES, decision,
                    f"{cfg.method}, stage {cfg.stage}: evidence for '{explained}'\n"
                    "red supports it, blue speaks against it",
                    f"pneumonia if P >= {thresholds['binary']:.3f}; viral if P(viral | pneumonia) >= "
                    f"{thresholds['subtype']:.3f}\n({pipeline.calibration.operating_point} operating point)")
                rows.append({"file": str(relative), "status": "ok", "reason": "",
                             **{f"p_{c}": f"{pred.probabilities[i][k]:.6f}" for k, c in enumerate(CLASSES)},
                             "decision": decision, "explained_class": explained,
                             "attribution_seconds": f"{seconds:.3f}", "report": str(report)})
        progress.update(len(files[start:start + cfg.batch_images]))
    progress.close()

    rows.sort(key=lambda r: r["file"])
    with (output_dir / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_FIELDS, restval="")
        writer.writeheader()
        writer.writerows(rows)
    (output_dir / "index.html").write_text(_index_html(rows, f"Explanations: {input_dir.name}"))
    failed = sum(r["status"] != "ok" for r in rows)
    run_id = None
    if cfg.log_to_mlflow:
        from pneumonia.tracking import log_folder_run

        run_id = log_folder_run(cfg.paths.tracking_uri, cfg.paths.artifact_dir, cfg.experiment_name,
                                output_dir, {"method": cfg.method, "stage": cfg.stage,
                                             "images": str(len(rows)), "failed": str(failed)})
    return {"output_dir": str(output_dir), "rows": rows, "failed": failed, "run_id": run_id}
