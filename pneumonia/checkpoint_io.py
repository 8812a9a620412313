"""Checkpoints written so that a crash never leaves a half-written file under the real name.

Lightning 2.6's own save goes through an fsspec transaction whose temporary file is made by
`tempfile.mkstemp()` in $TMPDIR, then `shutil.move`d onto the checkpoint. When $TMPDIR is on
another filesystem (a tmpfs /tmp, a node-local disk), the move is a copy into the checkpoint's
own name: a kill during that copy leaves a truncated `last.ckpt` and the previous one is gone
(and the temporary copy stays behind in $TMPDIR). Here the temporary file sits beside the
checkpoint, so the final `os.replace` is a rename within one folder: atomic.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save into `.<name>.tmp-<pid>` in the checkpoint's folder, fsync, os.replace.

    Remote paths (s3://, ...) and storage options keep Lightning's own save.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with tmp.open("wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())  # the bytes are on disk before the name points at them
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        _remove_leftovers(path)


def _remove_leftovers(path: Path) -> None:
    """Delete the temporary files of earlier writes of `path` whose process is gone (a run
    killed mid-write leaves one; its resumed run cleans it up at its first save)."""
    for leftover in path.parent.glob(f".{path.name}.tmp-*"):
        pid = leftover.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _running(int(pid)):
            leftover.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
