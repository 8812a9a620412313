"""Output folders: one guard decides whether a run may write into a folder, before anything is
written there, and then records how the run was made.

Hydra is configured (conf/*.yaml) not to write its `.hydra/` record or a log file by itself:
`claim_output` writes both, and only after the folder has passed the checks, so a refused run
leaves no trace in the folder it was refused.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from pneumonia.errors import OutputError

_held: dict[Path, int] = {}  # folder -> its open, flocked descriptor, held for the process's life
_created_by_hydra: list[Path] = []  # the first missing ancestor of the run folder, before Hydra


def check_overlap(output_dir: Path, inputs: Iterable[Path | str | None]) -> None:
    """Refuse an output folder that is, contains or lies inside any input (symlinks resolved)."""
    output = Path(output_dir).expanduser().resolve()
    for source in inputs:
        if source is None:
            continue
        resolved = Path(source).expanduser().resolve()
        if output.is_relative_to(resolved) or resolved.is_relative_to(output):
            _remove_refused_folders()
            raise OutputError(f"output folder {output} overlaps the input {resolved}; inputs are "
                              "never written: choose another hydra.run.dir")


def _remove_refused_folders() -> None:
    """Remove the empty folders Hydra made for a run that is refused (never anything else)."""
    for folder in _created_by_hydra:
        if folder.is_dir() and not any(p.is_file() for p in folder.rglob("*")):
            shutil.rmtree(folder)


def _lock(folder: Path) -> None:
    if folder in _held:
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)  # a lock on the folder itself: no file
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OutputError(f"{folder} is in use by another run right now; choose another "
                          "hydra.run.dir or wait for that run to end") from None
    _held[folder] = fd


def release(folder: Path) -> None:
    """Give up a claim (tests; a process's claims end with it)."""
    fd = _held.pop(Path(folder).resolve(), None)
    if fd is not None:
        os.close(fd)


def claim_output(output_dir: Path | str, inputs: Iterable[Path | str | None] = (),
                 results: Iterable[str] = (), overwrite: bool = False,
                 config: DictConfig | None = None, primary: bool = True) -> Path:
    """Check, lock and prepare an output folder; returns it resolved.

    Refused (OutputError, nothing written) when it overlaps an input, when another live run
    holds it, or when it already holds any of `results` and `overwrite` is false; the lock comes
    first, so two runs cannot both pass. Then, under Hydra, the run's `config` and overrides go
    to `.hydra/` and its log to `<job name>.log`. A secondary process (a DDP rank other than 0,
    sharing the folder) only checks the overlap and opens its own log file.
    """
    check_overlap(output_dir, inputs)
    folder = Path(output_dir).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    if primary:
        _lock(folder)
        existing = sorted(name for name in results if _holds(folder / name))
        if existing and not overwrite:
            raise OutputError(f"{folder} already holds results ({', '.join(existing)}); "
                              "nothing was overwritten: choose another hydra.run.dir or pass "
                              "overwrite=true")
    if HydraConfig.initialized():
        _record_run(folder, config if primary else None)
    return folder


def _holds(path: Path) -> bool:
    return path.is_file() or (path.is_dir() and any(path.iterdir()))


def _record_run(folder: Path, config: DictConfig | None) -> None:
    """What Hydra would have written itself: `.hydra/{config,hydra,overrides}.yaml` and the
    job's log file (appended to, so a resumed run keeps its history)."""
    hydra_cfg = HydraConfig.get()
    if config is not None:
        record = folder / ".hydra"
        record.mkdir(exist_ok=True)
        OmegaConf.save(config, record / "config.yaml")
        OmegaConf.save(OmegaConf.create({"hydra": OmegaConf.to_container(hydra_cfg)}),
                       record / "hydra.yaml")
        OmegaConf.save(hydra_cfg.overrides.task, record / "overrides.yaml")
    handler = logging.FileHandler(folder / f"{hydra_cfg.job.name}.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logging.getLogger().addHandler(handler)


class OutputGuard(Callback):
    """Hydra callback: notes which folders Hydra is about to create for a single run, so that a
    run refused for overlapping its input removes exactly those (empty) folders again."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        folder = Path(str(config.hydra.run.dir)).expanduser().absolute()
        missing = [path for path in (folder, *folder.parents) if not path.exists()]
        _created_by_hydra[:] = missing[-1:]  # the top one: removing it removes all
