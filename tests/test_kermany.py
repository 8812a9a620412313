from collections import defaultdict

import pytest

from pneumonia.data.kermany import parse_name, read_manifest, scan_kermany, split_records
from pneumonia.data.transforms import ProportionalCrop
from pneumonia.errors import DataError
from tests.conftest import KERMANY224, SHARED_DATA, needs_real_data


@pytest.mark.parametrize(
    "folder, name, label, patient",
    [
        ("NORMAL", "IM-0115-0001.jpeg", "normal", "IM-0115"),
        ("NORMAL", "NORMAL2-IM-1427-0001.jpeg", "normal", "NORMAL2-IM-1427"),
        ("NORMAL", "IM-0429-0001-0002.jpeg", "normal", "IM-0429"),
        ("PNEUMONIA", "person1_bacteria_1.jpeg", "bacterial", "person1"),
        ("PNEUMONIA", "person1000_virus_1681.jpeg", "viral", "person1000"),
        ("PNEUMONIA", "person447_virus_921_1.jpeg", "viral", "person447"),
    ],
)
def test_labels_and_patients_from_kermany_names(folder, name, label, patient):
    assert parse_name(folder, name) == (label, patient)


def test_pneumonia_file_without_subtype_is_an_error_naming_it():
    with pytest.raises(DataError, match="PNEUMONIA/scan_0001.jpeg.*person<ID>_bacteria"):
        parse_name("PNEUMONIA", "scan_0001.jpeg")


def _patients_by_split(records):
    splits = defaultdict(set)
    for r in records:
        splits[r.patient].add(r.split)
    return splits


def test_synthetic_splits_keep_patients_together(synthetic_root):
    for mode in ("official", "random"):
        records = split_records(scan_kermany(synthetic_root), mode, 0.2, 0.2, seed=3)
        assert all(len(s) == 1 for s in _patients_by_split(records).values())
        assert {r.split for r in records} == {"train", "val", "test"}


@needs_real_data
def test_real_data_labels_match_the_data_readme():
    records = scan_kermany(KERMANY224)
    train = [r for r in records if r.folder == "train"]
    counts = {label: sum(r.label == label for r in train)
              for label in ("normal", "bacterial", "viral")}
    assert counts == {"normal": 1341, "bacterial": 2530, "viral": 1345}
    test = [r for r in records if r.folder == "test"]
    assert len(test) == 322


@needs_real_data
@pytest.mark.parametrize("mode", ["official", "random"])
def test_no_patient_in_two_splits_on_real_data(mode, tmp_path):
    records = split_records(scan_kermany(KERMANY224), mode, val_fraction=0.15, test_fraction=0.2,
                            seed=0)
    # The official test folder is kept as published, although 87 of its patient ids also
    # occur in the train folder; our own cuts (val, and random's test) never split a patient.
    checked = [r for r in records if mode == "random" or r.split != "test"]
    shared = {p: s for p, s in _patients_by_split(checked).items() if len(s) > 1}
    assert not shared, f"patients in several splits: {list(shared)[:5]}"
    # stratified: each split keeps about the same label mix as the pool
    for split in ("train", "val"):
        part = [r for r in records if r.split == split]
        viral = sum(r.label == "viral" for r in part) / len(part)
        assert 0.2 < viral < 0.33
    if mode == "official":
        assert {r.split for r in records if r.folder == "test"} == {"test"}
        val = sum(r.split == "val" for r in records) / sum(r.folder != "test" for r in records)
        assert val == pytest.approx(0.15, abs=0.01)
    # same seed, same split; another seed, another one
    again = split_records(scan_kermany(KERMANY224), mode, 0.15, 0.2, seed=0)
    assert [r.split for r in again] == [r.split for r in records]
    other = split_records(scan_kermany(KERMANY224), mode, 0.15, 0.2, seed=1)
    assert sorted(r.path for r in other if r.split == "val") != sorted(
        r.path for r in records if r.split == "val")


@needs_real_data
def test_manifest_round_trip(tmp_path):
    from pneumonia.data.kermany import write_manifest

    records = split_records(scan_kermany(KERMANY224), "official", 0.15, 0.2, seed=0)
    back = read_manifest(write_manifest(records, tmp_path / "m.csv"))
    assert back == records


@needs_real_data
def test_crop_of_full_size_samples_uses_header_sizes():
    from pneumonia.io import image_size, read_grayscale

    samples = sorted((SHARED_DATA / "samples").glob("*.jpeg"))
    sizes = [image_size(p) for p in samples]
    assert (1857, 1317) in sizes
    crop = ProportionalCrop(max(w for w, _ in sizes), max(h for _, h in sizes))
    for path, (w, h) in zip(samples, sizes):
        out = crop(read_grayscale(path))
        assert out.shape == (round((1 - 0.20 * h / 1317) * h), round((1 - 0.35 * w / 1857) * w))
