"""docs/results.md's table is generated from the MLflow runs, newest run of each row."""

import csv

import pytest

from pneumonia.tracking import log_folder_run
from research.results_page import BEGIN, END, FIGURES, metric_key, recipe_rows, write_page


def _log(uri, artifacts, folder, recipe, row, value, commit):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.md").write_text("the evaluations' reports")
    metrics = {"wall_clock_s": 97.0}
    for i, figure in enumerate(FIGURES):
        for part, delta in (("", 0.0), (" low", -0.02), (" high", 0.02)):
            metrics[metric_key(figure, part)] = value + i / 1000 + delta
    params = {"recipe": recipe, "row": row, "commit": commit, "cpu": "Intel Xeon (avx2)",
              "images": "322", "command": "python -m research.site_adaptation m"}
    return log_folder_run(uri, str(artifacts), "results", folder, params, metrics)


def test_the_table_is_the_newest_run_of_each_row(tmp_path):
    uri, art = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "art"
    _log(uri, art, tmp_path / "a", "pretrained_cpu", "(i) none", 0.5, "0" * 40)
    newest = _log(uri, art, tmp_path / "b", "pretrained_cpu", "(i) none", 0.9, "a" * 40)
    _log(uri, art, tmp_path / "c", "pretrained_cpu", "(iii) labelled calibration", 0.7, "b" * 40)
    page = tmp_path / "results.md"
    page.write_text(f"# Results\n\nintro\n\n{BEGIN}\nold table\n{END}\n\nhow to reproduce\n")
    rows = recipe_rows(uri)
    write_page(rows, tmp_path / "results" / "recipes.csv", page)

    table = list(csv.DictReader((tmp_path / "results" / "recipes.csv").open()))
    assert [(r["row"], r["commit"][0]) for r in table] == [("(i) none", "a"),
                                                            ("(iii) labelled calibration", "b")]
    assert table[0]["run_id"] == newest
    assert float(table[0]["three-class accuracy"]) == pytest.approx(0.905)
    assert float(table[0]["stage 1 AUROC low"]) == pytest.approx(0.881)
    text = page.read_text()
    assert "old table" not in text and text.startswith("# Results\n\nintro\n")
    assert text.endswith(f"{END}\n\nhow to reproduce\n")
    assert "| `pretrained_cpu` | (i) none | 0.900 (0.880-0.920) | 0.901 (0.881-0.921)" in text
    assert "0.500" not in text  # the older run of the same row is not shown
    assert "| 97 s | `aaaaaaa` | Intel Xeon (avx2) |" in text
    # regenerated from the same runs, the page does not change
    before = page.read_text()
    write_page(recipe_rows(uri), tmp_path / "results" / "recipes.csv", page)
    assert page.read_text() == before
