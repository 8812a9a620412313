"""A run killed while it overwrites last.ckpt keeps the previous, complete last.ckpt."""

import hashlib
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO

# Runs train.py with torch.save replaced by one that, on the second write of last.ckpt, puts
# half of the real bytes into the open file, forces them to disk and SIGKILLs the process.
RUNNER = """
import hashlib, io, os, runpy, signal, sys
from pathlib import Path
import torch

real_save, seen, marker = torch.save, [], Path(sys.argv[1])

def save(obj, f, *args, **kwargs):
    name = Path(str(getattr(f, "name", "")))
    if "last.ckpt" in name.name:
        seen.append(name)
        if len(seen) == 2:
            old = (name.parent / "last.ckpt").read_bytes()
            marker.write_text(hashlib.sha256(old).hexdigest())
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            f.write(buffer.getvalue()[: buffer.tell() // 2])
            f.flush()
            os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)

torch.save = save
sys.argv = ["train.py", *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_kill_while_overwriting_last_ckpt_keeps_the_old_one(synthetic_root, tmp_path):
    marker = tmp_path / "old_last.sha256"
    args = ["experiment=demo", "data.synthetic=null", f"data.root={synthetic_root}", "debug=short",
            "model.input_size=64", "data.batch_size=4", "callbacks.early_stopping=null",
            "logger=none", f"paths.cache_dir={tmp_path}/cache", f"hydra.run.dir={tmp_path}/run"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(marker), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, (f"not killed while rewriting last.ckpt "
                                   f"(exit {proc.returncode}):\n{proc.stderr[-3000:]}")

    checkpoints = tmp_path / "run" / "checkpoints"
    last = checkpoints / "last.ckpt"
    # the old file, whole
    assert hashlib.sha256(last.read_bytes()).hexdigest() == marker.read_text()
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["epoch"] == 0 and saved["state_dict"]  # written at the end of the first epoch
    # the interrupted write went to a temporary file beside it, which is half a checkpoint
    partial = [p for p in checkpoints.iterdir() if p.name.startswith(".last.ckpt.tmp-")]
    assert len(partial) == 1 and 0 < partial[0].stat().st_size
    with pytest.raises(Exception):
        torch.load(partial[0], map_location="cpu", weights_only=True)

    from pneumonia.train import resolve_resume

    assert resolve_resume(str(tmp_path / "run"), None)[0] == last  # resume picks the whole one


def test_a_save_removes_the_leftovers_of_dead_writers_only(tmp_path):
    from pneumonia.checkpoints import AtomicCheckpointIO

    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = tmp_path / f".last.ckpt.tmp-{finished.pid}"
        alive = tmp_path / f".last.ckpt.tmp-{running.pid}"
        # another checkpoint's: not ours to touch
        other = tmp_path / f".best.ckpt.tmp-{finished.pid}"
        for leftover in (dead, alive, other):
            leftover.write_bytes(b"half a checkpoint")
        AtomicCheckpointIO().save_checkpoint({"epoch": 3}, tmp_path / "last.ckpt")
        assert torch.load(tmp_path / "last.ckpt", weights_only=True) == {"epoch": 3}
        assert not dead.exists() and alive.exists() and other.exists()
    finally:
        running.kill()
        running.wait()
