"""CSV files that are safe to open in a spreadsheet, and read back exactly as they were given."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from pathlib import Path

# A spreadsheet runs a cell that starts with one of these as a formula (OWASP: CSV injection).
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
ESCAPE = "'"  # spreadsheets show a cell that starts with it as text


def _looks_like_formula(text: str) -> bool:
    return text.lstrip(ESCAPE).startswith(FORMULA_PREFIXES)


def neutralise(cell: object) -> object:
    """The cell as written to a CSV file: text that could run as a formula (also after leading
    apostrophes, so that `restore` gives back every text exactly) gets one more leading
    apostrophe; numbers stay numbers (-0.5 from a float is data, "-x.png" is text)."""
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
