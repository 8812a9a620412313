"""Typed schemas of train.py's config groups, registered in Hydra's ConfigStore, and the value
checks every entry point runs before reading any data.

The YAML under conf/ holds each default, once; a schema holds the types (no defaults: a key that
no YAML sets is missing) and the value checks. Hydra checks types and unknown keys as it composes
the config; `validate(cfg)` then checks values. evaluate.py's and explain.py's schemas live with
their code and run through `check_values`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, MissingMandatoryValue, OmegaConf

from pneumonia.checks import check_choice, check_fraction_key
from pneumonia.data.transforms import STANDARDIZATIONS
from pneumonia.errors import ConfigError
from pneumonia.models.network import ADAPTERS, FREEZE, HEADS, check_backbone
from pneumonia.ood import check_fraction


@dataclass
class ModelConfig:
    name: str
    backbone: str
    pretrained: Any  # true | false | path to a weights file
    adapter: str
    head: str
    freeze: str
    input_size: int

    def __post_init__(self) -> None:
        check_backbone(self.backbone)
        check_choice("model.adapter", self.adapter, ADAPTERS)
        check_choice("model.head", self.head, HEADS)
        check_choice("model.freeze", self.freeze, FREEZE)
        if not isinstance(self.pretrained, (bool, str)):
            raise ConfigError(f"model.pretrained={self.pretrained!r} must be true, false or a "
                              "file path")
        if not 32 <= self.input_size <= 1024:
            raise ConfigError(f"model.input_size={self.input_size} is too "
                              f"{'small' if self.input_size < 32 else 'large'} (32 to 1024 pixels)")


@dataclass
class CropConfig:
    enabled: bool
    width: float
    height: float

    def __post_init__(self) -> None:
        check_fraction_key("data.crop.width", self.width)
        check_fraction_key("data.crop.height", self.height)


@dataclass
class AugmentConfig:
    hflip: float
    brightness: Optional[list[float]]
    contrast: Optional[list[float]]
    scale: Optional[list[float]]   # zoom [low, high], e.g. [0.9, 1.15]
    rotate: float                   # degrees, either way
    translate: float                # fraction of the side, either way
    acquisition: float              # probability of each acquisition change below
    gamma: Optional[list[float]]
    noise: Optional[list[float]]    # Gaussian std, fraction of 255
    blur: Optional[list[float]]     # Gaussian sigma, px
    sharpen: Optional[list[float]]  # alpha
    jpeg: Optional[list[float]]     # quality
    downscale: Optional[list[float]]  # resolution kept

    def __post_init__(self) -> None:
        check_fraction_key("data.augment.hflip", self.hflip, high_inclusive=True)
        check_fraction_key("data.augment.acquisition", self.acquisition, high_inclusive=True)
        for key in ("brightness", "contrast", "scale", "gamma", "noise", "blur", "sharpen",
                    "jpeg", "downscale"):
            bounds = getattr(self, key)
            if bounds is not None and (len(bounds) != 2 or bounds[0] > bounds[1]):
                raise ConfigError(f"data.augment.{key}={bounds} must be [low, high] with "
                                  "low <= high")
        for key in ("scale", "gamma", "downscale"):
            bounds = getattr(self, key)
            if bounds is not None and bounds[0] <= 0:
                raise ConfigError(f"data.augment.{key}={bounds} must be positive")
        if self.jpeg is not None and not 1 <= self.jpeg[0] <= self.jpeg[1] <= 100:
            raise ConfigError(f"data.augment.jpeg={self.jpeg} must be JPEG qualities in [1, 100]")
        if not 0 <= self.rotate <= 180:
            raise ConfigError(f"data.augment.rotate={self.rotate} must be in [0, 180] degrees")
        check_fraction_key("data.augment.translate", self.translate)


@dataclass
class SyntheticConfig:
    patients_per_class: int
    images_per_patient: int
    min_size: int
    max_size: int
    seed: int


@dataclass
class DataConfig:
    """The data module's options (train() instantiates `_target_` with them), except
    `normalization` and `synthetic`, which train() resolves itself."""
    _target_: str
    root: str
    split: str
    split_seed: int
    val_fraction: float
    test_fraction: float
    normalization: str
    standardize: str
    crop: CropConfig
    augment: Optional[AugmentConfig]
    batch_size: int
    num_workers: int
    pin_memory: bool
    persistent_workers: bool
    cache: bool
    cache_dir: str
    cache_workers: int
    feature_cache: bool
    synthetic: Optional[SyntheticConfig]
    skip_bad: bool

    def __post_init__(self) -> None:
        check_choice("data.split", self.split, ("official", "random"))
        check_choice("data.normalization", self.normalization, ("backbone", "unit"))
        check_choice("data.standardize", self.standardize, STANDARDIZATIONS)
        check_fraction_key("data.val_fraction", self.val_fraction)
        check_fraction_key("data.test_fraction", self.test_fraction)
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size={self.batch_size} must be at least 1")
        for key in ("num_workers", "cache_workers"):
            if getattr(self, key) < 0:
                raise ConfigError(f"data.{key}={getattr(self, key)} must not be negative")


@dataclass
class StageConfig:
    name: str

    def __post_init__(self) -> None:
        check_choice("stage.name", self.name, ("binary", "subtype"))


PRECISIONS = ("64", "32", "16", "bf16", "64-true", "32-true", "16-true", "bf16-true", "16-mixed",
              "bf16-mixed", "transformer-engine", "transformer-engine-float16")
ACCELERATORS = ("cpu", "gpu", "cuda", "mps", "tpu", "auto")


@dataclass
class TrainerConfig:
    """The Lightning Trainer arguments the configs set or tests override; any other Trainer
    argument needs adding here (the group is closed so that a misspelt key fails)."""
    _target_: str
    default_root_dir: Optional[str]
    accelerator: str
    devices: Any
    strategy: str
    num_nodes: int
    precision: Any
    max_epochs: int
    log_every_n_steps: int
    deterministic: Any
    sync_batchnorm: bool
    fast_dev_run: Any
    limit_train_batches: Any  # an int (batches) or a fraction
    limit_val_batches: Any
    accumulate_grad_batches: int
    gradient_clip_val: Optional[float]
    enable_progress_bar: Optional[bool]

    def __post_init__(self) -> None:
        check_choice("trainer.accelerator", self.accelerator, ACCELERATORS)
        check_choice("trainer.precision", str(self.precision), (*PRECISIONS, "auto"))
        if self.max_epochs < 1:
            raise ConfigError(f"trainer.max_epochs={self.max_epochs} must be a positive integer")
        devices = self.devices
        if not (devices == "auto" or devices == -1 or isinstance(devices, list)
                or (isinstance(devices, int) and devices >= 1)):
            raise ConfigError(f"trainer.devices={devices} must be a positive count, -1 (all), "
                              "auto or a list")
        if self.num_nodes < 1 or self.accumulate_grad_batches < 1:
            raise ConfigError("trainer.num_nodes and trainer.accumulate_grad_batches must be at "
                              "least 1")


for group, node in (("model", ModelConfig), ("data", DataConfig), ("stage", StageConfig),
                    ("trainer", TrainerConfig)):
    ConfigStore.instance().store(group=group, name="schema", node=node)


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


def check_values(cfg: DictConfig) -> None:
    """The value checks (its schema's __post_init__) of a composed evaluate or explain config,
    before any checkpoint or image is read; not of `paths`, which resolves only in a run."""
    values = cfg.copy()
    values.paths = {}
    missing = sorted(OmegaConf.missing_keys(values))
    if missing:
        raise ConfigError(f"{', '.join(missing)} must be given (e.g. {missing[0]}=...)")
    OmegaConf.to_object(values)
