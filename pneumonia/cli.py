"""What the entry points share: a user's mistake ends the run with one line, not a traceback."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig

from pneumonia.models.weights import PretrainedWeightsError
from pneumonia.tracking import TrackingServerError

log = logging.getLogger("pneumonia")
# Errors that name what the user gave and how to fix it (bad values, missing or refused files,
# a tracking server that does not answer); anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, TrackingServerError,
               PretrainedWeightsError)
EXIT_USER_ERROR = 2


def run(task: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """task(cfg); a user error is logged as one line and the process exits with status 2."""
    try:
        return task(cfg)
    except USER_ERRORS as err:
        log.error("%s", err)
        sys.exit(EXIT_USER_ERROR)
