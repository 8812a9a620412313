"""What the entry points share: a user's mistake ends the run with one line, not a traceback."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig

from pneumonia.errors import UserError

log = logging.getLogger("pneumonia")
EXIT_USER_ERROR = 2


def run(task: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """task(cfg); a user error is logged as one line and the process exits with status 2."""
    try:
        return task(cfg)
    except UserError as err:
        log.error("%s", err)
        sys.exit(EXIT_USER_ERROR)
