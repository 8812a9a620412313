"""The two classification stages and how dataset labels map onto their classes."""

from __future__ import annotations

from pneumonia.checks import check_choice

# The pipeline's three classes, in its output order.
CLASSES = ("normal", "bacterial", "viral")
# Class order is the output order of each stage's network; index 1 is the "positive" class.
STAGE_CLASSES: dict[str, tuple[str, str]] = {
    "binary": ("normal", "pneumonia"),
    "subtype": ("bacterial", "viral"),
}
_TARGETS: dict[str, dict[str, int]] = {
    "binary": {"normal": 0, "bacterial": 1, "viral": 1},
    "subtype": {"bacterial": 0, "viral": 1},
}


def check_stage(stage: str) -> str:
    check_choice("stage", stage, tuple(STAGE_CLASSES))
    return stage


def stage_target(stage: str, label: str) -> int | None:
    """The class index of a dataset label in a stage, or None if the stage does not use it."""
    return _TARGETS[check_stage(stage)].get(label)


def stage_targets(stage: str, labels) -> list[int]:
    """Class indices of dataset labels in a stage, -1 for labels the stage does not use."""
    return [-1 if (t := stage_target(stage, label)) is None else t for label in labels]
