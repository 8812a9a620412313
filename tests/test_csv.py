"""Every CSV file the project writes is safe to open in a spreadsheet: text that would run as a
formula starts with an apostrophe; numbers stay numbers; the project reads its own files back
exactly."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from omegaconf import OmegaConf

from pneumonia.csvio import read_csv, write_csv
from pneumonia.data.kermany import Record, read_manifest, write_manifest, write_skipped
from pneumonia.errors import ImageReadError
from pneumonia.report import write_predictions
from pneumonia.sweep import SweepSummary

FORMULAS = ['=HYPERLINK("http://evil.example","click")', "+1", "-2", "@SUM(1)", "\tx", "\rx",
            "'=quoted"]
SAFE = ["plain.png", "'apostrophe.png", "a=b", ""]


def _raw(path: Path) -> list[list[str]]:
    with path.open(newline="") as f:
        return list(csv.reader(f))


def test_formula_text_gets_an_apostrophe_and_numbers_stay_numbers(tmp_path):
    path = write_csv(tmp_path / "t.csv", ["text", "number"],
                     [[text, -0.5] for text in FORMULAS] + [[text, 3] for text in SAFE])
    rows = _raw(path)[1:]
    assert [r[0] for r in rows[:len(FORMULAS)]] == ["'" + text for text in FORMULAS]
    assert [r[0] for r in rows[len(FORMULAS):]] == SAFE  # left as they are
    assert [r[1] for r in rows] == ["-0.5"] * len(FORMULAS) + ["3"] * len(SAFE)


def test_read_csv_gives_back_every_text_exactly(tmp_path):
    texts = FORMULAS + SAFE + ["''=two", "-0.5"]
    rows = read_csv(write_csv(tmp_path / "t.csv", ["-header"], [[t] for t in texts]))
    assert [row["-header"] for row in rows] == texts


def test_append_writes_the_header_once(tmp_path):
    path = tmp_path / "scores.csv"
    write_csv(path, ["name", "score"], [["+a", 1.5]], append=True)
    write_csv(path, ["name", "score"], [["b", -2.0]], append=True)
    assert _raw(path) == [["name", "score"], ["'+a", "1.5"], ["b", "-2.0"]]


def test_manifest_paths_round_trip_and_open_safely(tmp_path):
    names = ["=HYPERLINK(\"x\").jpeg", "+1.jpeg", "-2.jpeg", "@SUM(1).jpeg", "'=odd.jpeg",
             "plain.jpeg"]
    records = [Record(Path(n), "viral", f"@patient{i}", "train", 100 + i, 90, "val")
               for i, n in enumerate(names)]
    path = write_manifest(records, tmp_path / "manifest.csv")
    raw = _raw(path)[1:]
    assert [r[0] for r in raw] == ["'" + n for n in names[:5]] + ["plain.jpeg"]
    assert all(r[2].startswith("'@patient") for r in raw)
    assert read_manifest(path) == records


def test_skipped_files_and_predictions_are_neutralised(tmp_path):
    skipped = write_skipped([ImageReadError("-x.png", "=cmd|' /C calc'!A0")], tmp_path / "bad.csv")
    assert _raw(skipped)[1] == ["'-x.png", "'=cmd|' /C calc'!A0"]
    predictions = write_predictions(tmp_path / "p.csv", ["@a.png"], ["normal"], [[0.25, 0.75]],
                                    ["pneumonia"], ("normal", "pneumonia"))
    assert _raw(predictions)[1] == ["'@a.png", "normal", "0.250000", "0.750000", "pneumonia"]


def test_sweep_summary_is_neutralised(tmp_path):
    job = tmp_path / "0"
    job.mkdir()
    (job / "job_result.json").write_text(json.dumps(
        {"job": 0, "overrides": "+trainer.gradient_clip_val=1", "status": "COMPLETED",
         "val/auroc": 0.75, "run_id": "abc"}))
    SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    header, row = _raw(tmp_path / "sweep_summary.csv")
    cells = dict(zip(header, row))
    assert cells["overrides"] == "'+trainer.gradient_clip_val=1" and cells["val/auroc"] == "0.75"
