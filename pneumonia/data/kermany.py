"""The Kermany et al. (2018) folder layout: labels, patients and patient-grouped splits."""

from __future__ import annotations

import logging
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

from pneumonia.csvio import read_csv, write_csv
from pneumonia.errors import DataError, ImageReadError
from pneumonia.io import image_size, is_image_file, read_grayscale

LABELS = ("normal", "bacterial", "viral")
CLASS_FOLDERS = ("NORMAL", "PNEUMONIA")
SPLIT_FOLDERS = ("train", "val", "test")
log = logging.getLogger(__name__)

# person1_bacteria_1.jpeg, person447_virus_921_1.jpeg
_PNEUMONIA_NAME = re.compile(r"^(person\d+)_(bacteria|virus)_", re.IGNORECASE)
# IM-0115-0001.jpeg, NORMAL2-IM-1427-0001.jpeg, IM-0429-0001-0002.jpeg
_NORMAL_NAME = re.compile(r"^((?:NORMAL2-)?IM-\d+)-", re.IGNORECASE)


def unreadable_error(root: Path, errors: list[ImageReadError],
                     what: str = "unreadable") -> DataError:
    """One error listing the files (the first 20) that stop a run, and the way around them."""
    shown = "\n  ".join(map(str, errors[:20])) + (f"\n  ... and {len(errors) - 20} more"
                                                  if len(errors) > 20 else "")
    return DataError(f"{len(errors)} {what} image file(s) under {root}:\n  {shown}\n"
                     "Remove or replace them, or pass data.skip_bad=true to train without them.")


@dataclass(frozen=True)
class Record:
    path: Path
    label: str  # normal | bacterial | viral
    patient: str
    folder: str  # the Kermany folder it came from: train | val | test
    width: int
    height: int
    split: str = ""  # train | val | test, set by split_records


def parse_name(class_folder: str, filename: str) -> tuple[str, str]:
    """(label, patient id) from a Kermany class folder and file name."""
    if class_folder.upper() == "NORMAL":
        match = _NORMAL_NAME.match(filename)
        # Normal files that do not follow the IM-<patient>-<n> pattern are their own patient.
        return "normal", match.group(1).upper() if match else Path(filename).stem
    match = _PNEUMONIA_NAME.match(filename)
    if not match:
        raise DataError(
            f"{class_folder}/{filename}: cannot tell bacterial from viral; pneumonia files must be "
            "named person<ID>_bacteria_<n>.jpeg or person<ID>_virus_<n>.jpeg"
        )
    subtype = "bacterial" if match.group(2).lower() == "bacteria" else "viral"
    return subtype, match.group(1).lower()


def scan_kermany(root: Path | str, folders: tuple[str, ...] = SPLIT_FOLDERS,
                 skip_bad: bool = False) -> list[Record]:
    """The readable images of `scan_with_skipped`."""
    return scan_with_skipped(root, folders, skip_bad)[0]


def scan_with_skipped(root: Path | str, folders: tuple[str, ...] = SPLIT_FOLDERS,
                      skip_bad: bool = False) -> tuple[list[Record], list[ImageReadError]]:
    """The readable images under root/{train,val,test}/{NORMAL,PNEUMONIA} and the unreadable ones.

    Reads only file headers. Raises DataError naming the folder or the files that are wrong.
    With skip_bad, every image is also decoded (a file can have a sound header and broken
    pixels), and the files that fail are left out with a warning instead, and returned.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root={root} does not exist or is not a folder")
    present = [f for f in folders if (root / f).is_dir()]
    if "train" not in present:
        raise DataError(
            f"data.root={root} has no train/ folder; expected the Kermany layout "
            "<root>/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg"
        )
    records, bad = [], []
    for folder in present:
        for class_folder in CLASS_FOLDERS:
            class_dir = root / folder / class_folder
            if not class_dir.is_dir():
                raise DataError(f"{class_dir} is missing; expected {folder}/NORMAL and "
                                f"{folder}/PNEUMONIA")
            for path in sorted(filter(is_image_file, class_dir.iterdir())):
                label, patient = parse_name(class_folder, path.name)
                try:
                    width, height = image_size(path)
                    if skip_bad:
                        read_grayscale(path)
                except ImageReadError as err:
                    bad.append(err)
                    continue
                records.append(Record(path, label, patient, folder, width, height))
    if bad and not skip_bad:
        raise unreadable_error(root, bad)
    if bad:
        log.warning("Skipping %d unreadable image file(s) under %s (data.skip_bad=true):\n  %s",
                    len(bad), root, "\n  ".join(map(str, bad)))
    filled = {r.path.parent.name for r in records if r.folder == "train"}
    for class_folder in CLASS_FOLDERS:
        if class_folder not in filled:
            raise DataError(f"{root / 'train' / class_folder} holds no images")
    return records, bad


def write_skipped(skipped: list[ImageReadError], path: Path) -> Path:
    """The files a run left out (data.skip_bad=true), one row each: path, reason."""
    return write_csv(path, ["path", "reason"], ([str(err.path), err.reason] for err in skipped))


def _group_split(records: list[Record], fraction: float, rng: random.Random) -> tuple[list, list]:
    """Move about `fraction` of each label's images out, whole patients at a time."""
    by_patient: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        by_patient[record.patient].append(record)
    by_label: dict[str, list[str]] = defaultdict(list)
    for patient, items in sorted(by_patient.items()):
        label = Counter(r.label for r in items).most_common(1)[0][0]
        by_label[label].append(patient)
    keep, held = [], []
    for label in sorted(by_label):
        patients = by_label[label]
        rng.shuffle(patients)
        target = round(fraction * sum(len(by_patient[p]) for p in patients))
        taken = 0
        for patient in patients:  # held until the target is reached, then kept
            (held if taken < target else keep).extend(by_patient[patient])
            taken += len(by_patient[patient])
    return keep, held


# What a checkpoint records of its data (besides the root), so evaluation can rebuild the split:
# two stages that differ in any of them were not split alike.
SPLIT_KEYS = ("split", "split_seed", "val_fraction", "test_fraction", "skip_bad")


def split_records(
    records: list[Record],
    mode: str = "official",
    val_fraction: float = 0.15,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> list[Record]:
    """Assign train/val/test, stratified by label and grouped by patient.

    official: the test folder is the test split; validation is carved out of train + val
    (the official val folder has only 16 images). random (study B): all folders pooled,
    `test_fraction` held out for test, then `val_fraction` of the rest for validation.
    """
    rng = random.Random(seed)
    if mode == "official":
        test = [r for r in records if r.folder == "test"]
        pool = [r for r in records if r.folder != "test"]
    elif mode == "random":
        pool, test = _group_split(records, test_fraction, rng)
    else:
        raise DataError(f"data.split={mode!r} is not one of: official, random")
    train, val = _group_split(pool, val_fraction, rng)
    out = [replace(r, split=s)
           for s, part in (("train", train), ("val", val), ("test", test)) for r in part]
    return sorted(out, key=lambda r: (r.split, str(r.path)))


def write_manifest(records: list[Record], path: Path) -> Path:
    """One row per image (path, label, patient, split, source folder, size): a run's exact split,
    safe to open in a spreadsheet (`pneumonia.csvio.write_csv`) and read back by `read_manifest`."""
    return write_csv(path, ["path", "label", "patient", "split", "folder", "width", "height"],
                     ([str(r.path), r.label, r.patient, r.split, r.folder, r.width, r.height]
                      for r in records))


def read_manifest(path: Path) -> list[Record]:
    """The records `write_manifest` wrote, paths exactly as they were."""
    return [Record(Path(row["path"]), row["label"], row["patient"], row["folder"],
                   int(row["width"]), int(row["height"]), row["split"])
            for row in read_csv(path)]
