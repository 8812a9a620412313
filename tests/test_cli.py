"""The entry points end a user's mistake in one line (exit 2) and let a bug keep its traceback."""

import os
import subprocess
import sys

import pytest

from pneumonia.cli import EXIT_USER_ERROR, run
from pneumonia.errors import ConfigError, UserError
from tests.conftest import REPO


def _raise(error: Exception):
    def task(cfg):
        raise error
    return task


def test_a_user_error_exits_2_and_a_bug_keeps_its_traceback(caplog):
    with pytest.raises(SystemExit) as stop:
        run(_raise(ConfigError("optimizer.lr=-1 must be a positive number")), None)
    assert stop.value.code == EXIT_USER_ERROR
    assert caplog.messages == ["optimizer.lr=-1 must be a positive number"]
    with pytest.raises(ValueError, match="operands could not be broadcast"):  # numpy's, say
        run(_raise(ValueError("operands could not be broadcast together")), None)
    assert issubclass(ConfigError, ValueError) and issubclass(ConfigError, UserError)


def test_the_cards_command_without_data_root_says_what_data_root_is(tmp_path):
    proc = subprocess.run(
        [sys.executable, "train.py", "model=vgg16", "stage=binary", "logger=none",
         f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"})
    output = proc.stdout + proc.stderr
    assert proc.returncode == EXIT_USER_ERROR, output[-2000:]
    assert "Traceback" not in output and "MissingMandatoryValue" not in output
    (error,) = [line for line in output.splitlines() if "ERROR" in line]
    assert "data.root is not set" in error and "data=synthetic" in error
