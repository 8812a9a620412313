"""Typed schemas for the config groups, registered in Hydra's ConfigStore.

Types are checked when Hydra composes the config (a wrong type or an unknown key fails
there, naming the key); `validate(cfg)` then checks values (choices, ranges, the backbone
name) before any data is read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, MissingMandatoryValue, OmegaConf

from pneumonia.attribution import METHODS
from pneumonia.errors import ConfigError
from pneumonia.models.network import ADAPTERS, FREEZE, HEADS, check_backbone
from pneumonia.models.network import check_choice as _choice
from pneumonia.occlusion import MODES as OCCLUSION_MODES
from pneumonia.ood import check_fraction
from pneumonia.pipeline import OPERATING_POINTS
from pneumonia.site import ADAPT_METHODS
from pneumonia.stages import STAGE_CLASSES


def _fraction(key: str, value: float, high_inclusive: bool = False) -> None:
    if not (0.0 <= value < 1.0 or (high_inclusive and value == 1.0)):
        raise ConfigError(f"{key}={value} must be in [0, 1{']' if high_inclusive else ')'}")


@dataclass
class ModelConfig:
    name: str = MISSING
    backbone: str = MISSING
    pretrained: Any = True  # true | false | path to a weights file
    adapter: str = "none"
    head: str = "linear"
    freeze: str = "none"
    input_size: int = 224

    def __post_init__(self) -> None:
        check_backbone(self.backbone)
        _choice("model.adapter", self.adapter, ADAPTERS)
        _choice("model.head", self.head, HEADS)
        _choice("model.freeze", self.freeze, FREEZE)
        if not isinstance(self.pretrained, (bool, str)):
            raise ConfigError(f"model.pretrained={self.pretrained!r} must be true, false or a file path")
        if not 32 <= self.input_size <= 1024:
            raise ConfigError(f"model.input_size={self.input_size} is too "
                              f"{'small' if self.input_size < 32 else 'large'} (32 to 1024 pixels)")


@dataclass
class CropConfig:
    enabled: bool = True
    width: float = 0.35
    height: float = 0.20

    def __post_init__(self) -> None:
        _fraction("data.crop.width", self.width)
        _fraction("data.crop.height", self.height)


@dataclass
class AugmentConfig:
    hflip: float = 0.5
    brightness: Optional[list[float]] = field(default_factory=lambda: [-0.1, 0.1])
    contrast: Optional[list[float]] = field(default_factory=lambda: [0.0, 0.1])
    scale: Optional[list[float]] = None   # zoom [low, high], e.g. [0.9, 1.15]
    rotate: float = 0.0                   # degrees, either way
    translate: float = 0.0                # fraction of the side, either way

    def __post_init__(self) -> None:
        _fraction("data.augment.hflip", self.hflip, high_inclusive=True)
        for key in ("brightness", "contrast", "scale"):
            bounds = getattr(self, key)
            if bounds is not None and (len(bounds) != 2 or bounds[0] > bounds[1]):
                raise ConfigError(f"data.augment.{key}={bounds} must be [low, high] with low <= high")
        if self.scale is not None and self.scale[0] <= 0:
            raise ConfigError(f"data.augment.scale={self.scale} must be positive")
        if not 0 <= self.rotate <= 180:
            raise ConfigError(f"data.augment.rotate={self.rotate} must be in [0, 180] degrees")
        _fraction("data.augment.translate", self.translate)


@dataclass
class SyntheticConfig:
    patients_per_class: int = 40
    images_per_patient: int = 2
    min_size: int = 160
    max_size: int = 320
    seed: int = 0


@dataclass
class DataConfig:
    """The data module's options (train() instantiates `_target_` with them), except
    `normalization` and `synthetic`, which train() resolves itself."""
    _target_: str = "pneumonia.data.KermanyDataModule"
    root: str = MISSING
    split: str = "official"
    split_seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    normalization: str = "backbone"
    crop: CropConfig = field(default_factory=CropConfig)
    augment: Optional[AugmentConfig] = field(default_factory=AugmentConfig)
    batch_size: int = 32
    num_workers: int = 4
    pin_memory: bool = False
    persistent_workers: bool = True
    cache: bool = True
    cache_dir: str = MISSING
    cache_workers: int = 0
    feature_cache: bool = False
    synthetic: Optional[SyntheticConfig] = None
    skip_bad: bool = False

    def __post_init__(self) -> None:
        _choice("data.split", self.split, ("official", "random"))
        _choice("data.normalization", self.normalization, ("backbone", "unit"))
        _fraction("data.val_fraction", self.val_fraction)
        _fraction("data.test_fraction", self.test_fraction)
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size={self.batch_size} must be at least 1")
        for key in ("num_workers", "cache_workers"):
            if getattr(self, key) < 0:
                raise ConfigError(f"data.{key}={getattr(self, key)} must not be negative")


@dataclass
class StageConfig:
    name: str = "binary"

    def __post_init__(self) -> None:
        _choice("stage.name", self.name, ("binary", "subtype"))


PRECISIONS = ("64", "32", "16", "bf16", "64-true", "32-true", "16-true", "bf16-true", "16-mixed",
              "bf16-mixed", "transformer-engine", "transformer-engine-float16")
ACCELERATORS = ("cpu", "gpu", "cuda", "mps", "tpu", "auto")


@dataclass
class TrainerConfig:
    """The Lightning Trainer arguments the configs set or tests override; any other Trainer
    argument needs adding here (the group is closed so that a misspelt key fails)."""
    _target_: str = "lightning.pytorch.Trainer"
    default_root_dir: Optional[str] = None
    accelerator: str = "cpu"
    devices: Any = 1
    strategy: str = "auto"
    num_nodes: int = 1
    precision: Any = "32-true"
    max_epochs: int = 20
    log_every_n_steps: int = 50
    deterministic: Any = False
    sync_batchnorm: bool = False
    fast_dev_run: Any = False
    limit_train_batches: Any = None  # an int (batches) or a fraction
    limit_val_batches: Any = None
    accumulate_grad_batches: int = 1
    gradient_clip_val: Optional[float] = None
    enable_progress_bar: Optional[bool] = None

    def __post_init__(self) -> None:
        _choice("trainer.accelerator", self.accelerator, ACCELERATORS)
        _choice("trainer.precision", str(self.precision), (*PRECISIONS, "auto"))
        if self.max_epochs < 1:
            raise ConfigError(f"trainer.max_epochs={self.max_epochs} must be a positive integer")
        devices = self.devices
        if not (devices == "auto" or devices == -1 or isinstance(devices, list)
                or (isinstance(devices, int) and devices >= 1)):
            raise ConfigError(f"trainer.devices={devices} must be a positive count, -1 (all), auto or a list")
        if self.num_nodes < 1 or self.accumulate_grad_batches < 1:
            raise ConfigError("trainer.num_nodes and trainer.accumulate_grad_batches must be at least 1")


def register() -> None:
    store = ConfigStore.instance()
    store.store(group="model", name="schema", node=ModelConfig)
    store.store(group="data", name="schema", node=DataConfig)
    store.store(group="stage", name="schema", node=StageConfig)
    store.store(group="trainer", name="schema", node=TrainerConfig)


def check_feature_cache(cfg: DictConfig) -> None:
    """data.feature_cache stores the frozen part's features once: only valid when nothing
    before the head trains and no training image is augmented."""
    if not cfg.data.feature_cache:
        return
    changes = []
    if cfg.model.freeze != "features":
        changes.append(f"model.freeze=features (now {cfg.model.freeze})")
    if cfg.model.adapter != "none":
        changes.append(f"model.adapter=none (now {cfg.model.adapter}, which trains)")
    if not cfg.data.cache:
        changes.append("data.cache=true (features are computed from the preprocessed cache)")
    if cfg.data.augment is not None:
        changes.append("data.augment=null (now augmenting: "
                       f"{OmegaConf.to_container(cfg.data.augment)})")
    if changes:
        raise ConfigError(
            "data.feature_cache=true computes the backbone's features once per image, so nothing "
            f"before the head may train and no image may change. Set {', '.join(changes)}; or "
            "data.feature_cache=false."
        )


# What a required option holds, for the one-line error when it is not given.
REQUIRED = {
    "data.root": "the folder of a Kermany data set, <root>/{train,test}/{NORMAL,PNEUMONIA}/*.jpeg "
                 "(data.root=/path/to/chest_xray), or data=synthetic to train on built-in "
                 "synthetic X-rays with no download",
}


def validate(cfg: DictConfig) -> None:
    """Value checks of the typed groups and the optimizer, before any long work."""
    for group in ("model", "data", "stage", "trainer"):
        try:
            OmegaConf.to_object(cfg[group])  # runs each schema's __post_init__
        except MissingMandatoryValue as err:
            key = err.full_key
            raise ConfigError(f"{key} is not set: {REQUIRED.get(key, f'pass {key}=...')}") from None
    check_feature_cache(cfg)
    check_fraction(cfg.ood_fraction)
    lr = cfg.optimizer.get("lr")
    if not isinstance(lr, (int, float)) or lr <= 0:
        raise ConfigError(f"optimizer.lr={lr} must be a positive number")


register()


# --- evaluate.py and explain.py -------------------------------------------------------------
# Their schemas are the first entry of conf/evaluate.yaml's and conf/explain.yaml's defaults;
# `check_values(cfg)` runs the value checks below at start-up, before any checkpoint is read.

DEVICE = re.compile(r"cpu|cuda(:[0-9]+)?|auto")
MAX_WINDOW = 512  # pixels; explain also checks the window against the model's input size


def _at_least(key: str, value: int, low: int, why: str = "") -> None:
    if value < low:
        raise ConfigError(f"{key}={value} must be at least {low}{why}")


def _check_device(device: str) -> None:
    if not DEVICE.fullmatch(device):
        raise ConfigError(f"device={device!r} is not one of: cpu, cuda, cuda:N (N a GPU index), "
                          "auto (the first GPU if there is one, else cpu)")


@dataclass
class BootstrapConfig:
    samples: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        _at_least("bootstrap.samples", self.samples, 1,
                  " (resamples of the split behind each 95 % confidence interval)")
        _at_least("bootstrap.seed", self.seed, 0, " (a numpy random seed)")


@dataclass
class EvaluateConfig:
    """conf/evaluate.yaml: the keys, their types and the values evaluate.py accepts."""
    paths: dict[str, Any] = field(default_factory=dict)
    binary: Any = None   # a checkpoint, run id or latest; or a list of them (an ensemble)
    subtype: Any = None
    sweep: Optional[str] = None
    model_uri: Optional[str] = None  # a logged pipeline model: models:/, runs:/ or a model folder
    register: Optional[str] = None  # register the evaluated model under this name
    register_alias: Optional[str] = "champion"
    # a plain dict, so that callers may assign data={"root": ...}; its keys are checked below
    data: dict[str, Any] = field(default_factory=lambda: {"root": None})
    report_split: str = "test"
    target_sensitivity: float = 0.99
    operating_point: str = "youden"
    tta: bool = False
    calibration: Optional[str] = None  # a site's labelled folder (NORMAL/, PNEUMONIA/)
    adapt: Optional[str] = None  # a site's unlabelled folder
    adapt_method: str = "both"
    transductive: bool = False
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)
    batch_size: int = 32
    num_workers: int = 2
    device: str = "auto"
    overwrite: bool = False
    log_to_mlflow: bool = True
    experiment_name: str = "evaluation"
    compare: bool = False
    compare_experiments: list[str] = field(default_factory=lambda: ["binary", "subtype"])

    def __post_init__(self) -> None:
        if set(self.data) != {"root"} or not isinstance(self.data["root"], (str, type(None))):
            raise ConfigError(f"data={self.data} must be {{root: <a Kermany folder> or null}}")
        _choice("report_split", self.report_split, ("test", "val"))
        if not 0 < self.target_sensitivity <= 1:
            raise ConfigError(f"target_sensitivity={self.target_sensitivity} must be in (0, 1]")
        _choice("operating_point", self.operating_point, OPERATING_POINTS)
        _choice("adapt_method", self.adapt_method, ADAPT_METHODS)
        _at_least("batch_size", self.batch_size, 1)
        _at_least("num_workers", self.num_workers, 0, " (0 loads images in the main process)")
        _check_device(self.device)


@dataclass
class ExplainConfig:
    """conf/explain.yaml: the keys, their types and the values explain.py accepts."""
    paths: dict[str, Any] = field(default_factory=dict)
    input: str = MISSING
    pipeline: Optional[str] = None
    model_uri: Optional[str] = None  # a logged pipeline model: models:/, runs:/ or a model folder
    binary: Any = None
    subtype: Any = None
    operating_point: str = "youden"
    explain_stage: str = "binary"
    method: str = "occlusion"
    window: int = 15
    stride: int = 10
    baseline: float = 0.0
    perturbations_per_eval: int = 32
    occlusion_mode: str = "exact"
    batch_images: int = 1
    channels_last: bool = True
    precision: str = "32"
    accept_any_modality: bool = False
    accept_ood: bool = False
    limit: Optional[int] = None
    device: str = "auto"
    overwrite: bool = False
    log_to_mlflow: bool = True
    experiment_name: str = "explain"

    def __post_init__(self) -> None:
        _choice("operating_point", self.operating_point, OPERATING_POINTS)
        _choice("explain_stage", self.explain_stage, tuple(STAGE_CLASSES))
        _choice("method", self.method, METHODS)
        if not 1 <= self.window <= MAX_WINDOW:
            raise ConfigError(f"window={self.window} must be in [1, {MAX_WINDOW}] pixels")
        _at_least("stride", self.stride, 1, " pixel")
        if not 0 <= self.baseline <= 1:  # also refuses nan
            raise ConfigError(f"baseline={self.baseline} must be in [0, 1] (0 = black, 1 = white)")
        _at_least("perturbations_per_eval", self.perturbations_per_eval, 1)
        _choice("occlusion_mode", self.occlusion_mode, OCCLUSION_MODES)
        _at_least("batch_images", self.batch_images, 1)
        _choice("precision", self.precision, ("32", "bf16", "auto"))
        if self.limit is not None:
            _at_least("limit", self.limit, 1, " (or null: every file)")
        _check_device(self.device)


def check_values(cfg: DictConfig) -> None:
    """Runs the value checks of a composed evaluate or explain config (its schema's
    __post_init__), so a wrong value stops the script before any checkpoint or image is read.

    `paths` is left out: it holds Hydra's runtime interpolations, which resolve only in a run.
    """
    values = cfg.copy()
    values.paths = {}
    missing = sorted(OmegaConf.missing_keys(values))
    if missing:
        raise ConfigError(f"{', '.join(missing)} must be given (e.g. {missing[0]}=...)")
    OmegaConf.to_object(values)


def register_scripts() -> None:
    store = ConfigStore.instance()
    store.store(name="evaluate_schema", node=EvaluateConfig)
    store.store(name="explain_schema", node=ExplainConfig)


register_scripts()
