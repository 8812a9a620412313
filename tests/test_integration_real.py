"""Training on real X-rays (../shared/data/kermany224): a subset, a few epochs, from scratch."""

import random
from collections import defaultdict
from pathlib import Path

import pytest

from pneumonia.data.kermany import scan_kermany
from pneumonia.train import train
from tests.conftest import KERMANY224, compose_train, needs_real_data, tree_hashes


def _patient_subset(dest: Path, per_label: dict[str, int], seed: int = 0) -> Path:
    """Symlinks to whole patients of the official train folder, about per_label images each."""
    by_patient = defaultdict(list)
    for record in scan_kermany(KERMANY224, folders=("train",)):
        by_patient[(record.label, record.patient)].append(record)
    rng = random.Random(seed)
    keys = sorted(by_patient)
    rng.shuffle(keys)
    taken = defaultdict(int)
    for label, patient in keys:
        if taken[label] >= per_label[label]:
            continue
        for record in by_patient[(label, patient)]:
            link = dest / "train" / record.path.parent.name / record.path.name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(record.path)
            taken[label] += 1
    return dest


@pytest.mark.slow
@pytest.mark.integration
@needs_real_data
def test_small_cnn_from_scratch_learns_real_xrays(tmp_path):
    root = _patient_subset(tmp_path / "subset", {"normal": 300, "bacterial": 200, "viral": 100})
    before = tree_hashes(root)
    cfg = compose_train(tmp_path, [
        "model=resnet18", "model.pretrained=false", "model.input_size=96", "stage=binary",
        f"data.root={root}", "data.num_workers=2", "data.batch_size=32", "data.val_fraction=0.2",
        "trainer.max_epochs=4", "callbacks.early_stopping=null", "optimizer.lr=3e-3",
    ])
    result = train(cfg)
    assert tree_hashes(root) == before
    print("real-data validation metrics:", result["metrics"])
    # Chance is 0.5; a from-scratch CNN sees pneumonia on real images within a few epochs.
    # (Accuracy at the 0.5 threshold is not asserted: the checkpoint is chosen on AUROC and
    # an early one can rank well while its threshold is off; operating points come later.)
    assert result["metrics"]["val/auroc"] > 0.85
