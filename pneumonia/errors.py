"""The problems a user can fix, as one family: the entry points print a `UserError` in one line
and exit with status 2; every other exception is a bug and keeps its traceback.

Each class also derives from the built-in error it refines (ValueError, FileNotFoundError, ...),
so code that handles those, such as a per-file boundary, handles these too.
"""

from __future__ import annotations

import os
from pathlib import Path


class UserError(Exception):
    """A problem in what the user gave, with a message that says what and how to fix it."""


class ConfigError(UserError, ValueError):
    """An option's value is wrong or options contradict each other."""


class MissingInputError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class OutputError(UserError, ValueError):
    """An output folder or file is refused (it holds a result, or is an input folder)."""


class DataError(UserError, ValueError):
    """A data folder's layout or files cannot be used."""


def display_name(path: os.PathLike | str) -> str:
    """The path as printable text, bytes that are not UTF-8 as U+FFFD: Python keeps them as lone
    surrogates, which UTF-8 writers (HTML, CSV, matplotlib, the terminal) refuse. Show this;
    open the Path itself."""
    return os.fsencode(os.fspath(path)).decode("utf-8", errors="replace")


class ImageReadError(UserError, ValueError):
    """A file that should be an X-ray could not be read."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{display_name(path)}: {reason}")
        self.path = Path(path)
        self.reason = reason


class NotChestRadiograph(ImageReadError):
    """A readable DICOM object whose tags say it is not a chest radiograph (another modality, body
    part, or no image at all). A model trained on chest films must not diagnose it."""


class CheckpointError(UserError, ValueError):
    """A checkpoint or model reference cannot be found, read or used where it was given."""


class TrackingError(UserError, RuntimeError):
    """The MLflow tracking server does not answer, or its store cannot be created."""


class PretrainedWeightsError(UserError, RuntimeError):
    """ImageNet weights could not be obtained."""
