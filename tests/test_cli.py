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


def test_console_scripts_are_the_commands_and_retired_options_say_what_replaced_them(tmp_path):
    bin_dir = os.path.dirname(sys.executable)
    for command in ("pneumonia-train", "pneumonia-evaluate", "pneumonia-explain"):
        proc = subprocess.run([os.path.join(bin_dir, command), "--cfg", "hydra"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        # the log file is named for the command, not for pneumonia/cli.py
        assert f"name: {command.split('-')[1]}" in proc.stdout
    proc = subprocess.run([os.path.join(bin_dir, "pneumonia-evaluate"), "compare=true"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == EXIT_USER_ERROR
    assert proc.stderr.strip() == ("evaluate: compare=true is gone: the MLflow UI compares runs "
                                   "(make mlflow-ui)")
    assert not (tmp_path / "outputs").exists()
