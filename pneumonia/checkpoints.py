"""Checkpoints: references resolved to local files, bytes read safely, stage modules built,
files written atomically.

`read_checkpoint` passes `weights_only=True` whatever the environment says (torch honours
TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD only when `weights_only` is not passed), so a crafted file
cannot run code; URLs are never fetched.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pneumonia.data.transforms import Preprocessing
from pneumonia.errors import CheckpointError
from pneumonia.models import StageClassifier
from pneumonia.models.weights import NOT_RECORDED
from pneumonia.stages import STAGE_CLASSES
from pneumonia.tracking import ensure_tracking_store, is_run_id

WEIGHTS_FORMAT = 1  # save_stage_weights' JSON layout


def _mlflow_run(ref: str, stage: str, tracking_uri: str | None):
    """The MLflow run a reference names: an id, or `latest` (the stage's newest finished run)."""
    if not tracking_uri:
        raise CheckpointError(f"{ref}: an MLflow reference needs a tracking URI")
    ensure_tracking_store(tracking_uri)
    client = MlflowClient(tracking_uri)
    if ref == "latest":
        experiment = client.get_experiment_by_name(stage)
        runs = client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'",
                                  order_by=["attributes.start_time DESC"],
                                  max_results=1) if experiment else []
        if not runs:
            raise CheckpointError(f"{stage}=latest: no finished run in MLflow experiment "
                                  f"{stage!r} at {tracking_uri}")
        return client, runs[0]
    try:
        return client, client.get_run(ref)
    except MlflowException as err:
        raise CheckpointError(f"{stage}={ref}: MLflow run not found in {tracking_uri}") from err


def _logged_checkpoint(client, run, stage: str, download_dir: Path) -> Path:
    """A run's best checkpoint: its local file if it is still there, else the logged copy."""
    local = run.data.tags.get("best_checkpoint")
    if local and Path(local).is_file():
        return Path(local)
    try:
        folder = Path(client.download_artifacts(run.info.run_id, "checkpoints", str(download_dir)))
        found = sorted(folder.glob("*.ckpt"))
    except (MlflowException, OSError):
        found = []
    if not found:
        raise CheckpointError(f"{stage}={run.info.run_id}: MLflow run has no logged checkpoint")
    return found[0]


def resolve(ref: Any, stage: str, tracking_uri: str | None, download_dir: Path,
            last: bool = False) -> Path:
    """The local checkpoint file a reference names.

    A checkpoint file is itself; a run folder gives `checkpoints/last.ckpt` (`last`, what a
    resume continues from) or its best checkpoint; an MLflow run id or `latest` gives the run's
    best checkpoint, or with `last` the `last.ckpt` in the run's recorded output folder.
    """
    text = str(ref)
    if text.startswith(("http://", "https://", "ftp://")):
        raise CheckpointError(f"{stage}={text}: checkpoints are not fetched from URLs; "
                              "download the file and pass its path")
    path = Path(text).expanduser()
    if path.is_file():
        return path.resolve()
    if path.is_dir():
        return _from_run_folder(path, stage, last)
    if text != "latest" and not is_run_id(text):
        raise CheckpointError(f"{stage}={text}: no such checkpoint file or run folder, and not an "
                              "MLflow run id or latest")
    client, run = _mlflow_run(text, stage, tracking_uri)
    if not last:
        return _logged_checkpoint(client, run, stage, download_dir)
    folder = run.data.tags.get("output_dir")
    if not folder:
        raise CheckpointError(f"{stage}={text}: the MLflow run records no output folder")
    return _from_run_folder(Path(folder), stage, last)


def _from_run_folder(folder: Path, stage: str, last: bool) -> Path:
    checkpoints = folder / "checkpoints"
    found = [checkpoints / "last.ckpt"] if last else sorted(checkpoints.glob("best*.ckpt"))
    if not found or not found[0].is_file():
        wanted = "last.ckpt" if last else "a best*.ckpt checkpoint"
        raise CheckpointError(f"{stage}={folder}: no {wanted} in {checkpoints}")
    if len(found) > 1:
        raise CheckpointError(f"{stage}={folder}: several best checkpoints in {checkpoints}; "
                              "pass one file")
    return found[0].resolve()


def as_list(refs: Any) -> list:
    """One reference (a string, a path) or a list of them (an ensemble), as a list."""
    return [refs] if isinstance(refs, str) or not hasattr(refs, "__iter__") else list(refs)


def resolve_all(refs: Any, stage: str, tracking_uri: str | None,
                download_dir: Path) -> Path | list[Path]:
    """`resolve` for one reference, or for each of a list (an ensemble)."""
    refs = as_list(refs)
    if not refs:
        raise CheckpointError(f"{stage}=[]: give at least one checkpoint or run id")
    if len(refs) == 1:
        return resolve(refs[0], stage, tracking_uri, download_dir)
    return [resolve(r, stage, tracking_uri, download_dir / str(i)) for i, r in enumerate(refs)]


def local_references(*refs: Any) -> list[Path]:
    """The references (each one or a list) that name files or folders on this machine: inputs
    that an output folder must not overlap."""
    paths = [Path(str(r)).expanduser() for ref in refs for r in as_list(ref) if r is not None]
    return [p for p in paths if p.exists()]


def read_checkpoint(path: Path | str, map_location: Any = "cpu") -> dict:
    """A checkpoint's contents from a local file, unpickled with weights_only=True; a
    CheckpointError names the file and what is wrong with it."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read the checkpoint "
                              f"({err.strerror or err})") from err
    if not data:
        raise CheckpointError(f"{path}: empty file (0 bytes), not a checkpoint")
    try:
        checkpoint = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as err:  # refused pickle globals, truncated zip, not a torch file...
        reason = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
        raise CheckpointError(f"{path}: not a loadable checkpoint ({reason})") from err
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: not a Lightning checkpoint "
                              f"(holds a {type(checkpoint).__name__})")
    return checkpoint


def save_stage_weights(module, stem: Path) -> Path:
    """A stage's weights as `<stem>.safetensors` and what rebuilds the network as `<stem>.json`
    (its hyperparameters: backbone, adapter, head, input size, preprocessing, classes, the
    weights' provenance; the out-of-distribution gate's numbers): no optimizer state, nothing
    that loads by unpickling. Returns the JSON file, which `load_stage` takes."""
    tensors = {f"state_dict.{k}": v.detach().cpu().contiguous()
               for k, v in module.state_dict().items()}
    spec = {"format": WEIGHTS_FORMAT, "hyper_parameters": dict(module.hparams),
            "mlflow_run_id": module.mlflow_run_id, "ood": None}
    if module.ood is not None:
        state = module.ood.state()
        for name in ("means", "precisions"):
            tensors.update({f"ood.{name}.{i}": t.contiguous() for i, t in enumerate(state[name])})
        spec["ood"] = {k: v for k, v in state.items() if k not in ("means", "precisions")}
    save_file(tensors, str(stem.with_suffix(".safetensors")))
    stem.with_suffix(".json").write_text(json.dumps(spec, indent=1))
    return stem.with_suffix(".json")


def read_stage_weights(path: Path) -> dict[str, Any]:
    """The checkpoint-shaped dict of a `save_stage_weights` pair, read without unpickling."""
    try:
        spec = json.loads(path.read_text())
        tensors = load_file(str(path.with_suffix(".safetensors")))
    except (OSError, ValueError, SafetensorError) as err:
        raise CheckpointError(f"{path}: not a readable weights file pair ({err})") from err
    if spec.get("format") != WEIGHTS_FORMAT:
        raise CheckpointError(f"{path}: weights format {spec.get('format')!r}, this version "
                              f"reads {WEIGHTS_FORMAT}")
    checkpoint = {"hyper_parameters": spec["hyper_parameters"],
                  "mlflow_run_id": spec.get("mlflow_run_id"),
                  "state_dict": {k.removeprefix("state_dict."): v for k, v in tensors.items()
                                 if k.startswith("state_dict.")}}
    if spec.get("ood"):
        count = len(spec["ood"]["stages"])
        checkpoint["ood"] = {**spec["ood"], **{name: [tensors[f"ood.{name}.{i}"]
                                                      for i in range(count)]
                                               for name in ("means", "precisions")}}
    return checkpoint


def load_stage(path: Path | str, stage: str):
    """The stage module a checkpoint (or a `save_stage_weights` JSON file) holds, in eval mode,
    checked against the slot it fills."""
    path = Path(path)
    checkpoint = read_stage_weights(path) if path.suffix == ".json" else read_checkpoint(path)
    hparams = checkpoint.get("hyper_parameters")
    if not isinstance(hparams, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path}: not a stage checkpoint (no hyper_parameters or state_dict)")
    found = hparams.get("stage")
    if found != stage:
        raise CheckpointError(f"{stage}={path} is a {found!r} checkpoint; "
                              f"pass it as {found}=... instead")
    if tuple(hparams.get("classes") or ()) != STAGE_CLASSES[stage]:
        raise CheckpointError(f"{path}: classes {hparams.get('classes')} "
                              f"are not {STAGE_CLASSES[stage]}")
    try:
        module = StageClassifier(**{"weights": NOT_RECORDED, **hparams, "pretrained": False})
        module.load_state_dict(checkpoint["state_dict"])
        Preprocessing(**module.hparams.preprocessing)
        module.on_load_checkpoint(checkpoint)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: does not build a stage module ({err})") from err
    broken = [name for name, value in module.state_dict().items()
              if value.is_floating_point() and not torch.isfinite(value).all()]
    if broken:
        raise CheckpointError(f"{path}: non-finite weights (NaN or inf) in {len(broken)} "
                              f"tensor(s), e.g. {broken[0]}; the model cannot give a diagnosis")
    return module.eval()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint plugin: atomic local saves, weights-only local loads.

    Lightning 2.6 saves through a temporary file made in $TMPDIR and then moved onto the
    checkpoint; on another filesystem that move is a copy, and a kill during it leaves a
    truncated checkpoint. Here the temporary file `.<name>.tmp-<pid>` sits beside the
    checkpoint, is fsynced, and `os.replace` makes it the checkpoint in one rename. Remote
    paths (s3://, ...) keep Lightning's own save and load.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path,
                        storage_options: Any = None) -> None:
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

    def load_checkpoint(self, path, map_location: Any = None,
                        weights_only: bool | None = None) -> dict:
        if not isinstance(get_filesystem(path), LocalFileSystem):
            return super().load_checkpoint(path, map_location, weights_only=True)
        return read_checkpoint(path, map_location)


def _remove_leftovers(path: Path) -> None:
    """Delete the temporary files of earlier writes of `path` whose process is gone (a run
    killed mid-write leaves one; its resumed run cleans it up at its first save)."""
    for leftover in path.parent.glob(f".{path.name}.tmp-*"):
        pid = leftover.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            leftover.unlink(missing_ok=True)
        except PermissionError:  # exists, owned by someone else
            pass
