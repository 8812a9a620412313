"""KermanyDataModule: scans, splits and serves one stage's images."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Callable

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pneumonia.data.cache import build_cache, cache_key
from pneumonia.data.kermany import (
    Record,
    scan_with_skipped,
    split_records,
    write_manifest,
    write_skipped,
)
from pneumonia.data.transforms import Augmentation, Preprocessing, standardize
from pneumonia.errors import ConfigError, DataError
from pneumonia.io import read_grayscale
from pneumonia.stages import STAGE_CLASSES, stage_target, stage_targets

# (cached uint8 images (N, S, S), their cache key, cache folder, device) -> features (N, C, H, W)
FeatureExtractor = Callable[[np.ndarray, str, Path, "torch.device | None"], np.ndarray]


class XrayDataset(Dataset):
    """Normalised images (1, S, S) of one stage and their class index (-1 where it has none).

    The preprocessed uint8 image is decoded, cropped and resized from its file at each access,
    or read from `rows` (N, S, S), the preprocessed cache; both are then augmented and
    normalised the same way. A key is an image index, or an (index, epoch) pair from
    `EpochShuffle`: with an `augmentation`, a pair draws that image's augmentation for that epoch.
    """

    def __init__(self, records: list[Record], stage: str, preprocessing: Preprocessing,
                 augmentation: Augmentation | None = None, rows: np.ndarray | None = None):
        self.records = records
        self.targets = stage_targets(stage, (r.label for r in records))
        self.preprocessing = preprocessing
        self.augmentation = augmentation
        self.rows = rows

    def __len__(self) -> int:
        return len(self.records)

    def image(self, index: int) -> np.ndarray:
        """The preprocessed uint8 image (S, S) of record `index`."""
        if self.rows is not None:
            return np.array(self.rows[index])
        return self.preprocessing(read_grayscale(self.records[index].path))

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, epoch = key if isinstance(key, tuple) else (key, None)
        image = self.image(index)
        if self.augmentation is not None and epoch is not None:
            image = self.augmentation(image, epoch, index)
        return torch.from_numpy(self.preprocessing.normalize(image)), self.targets[index]


class FeatureDataset(Dataset):
    """Frozen-backbone features (C, H, W) from the feature cache and the class index. A key is
    an index or an (index, epoch) pair, as for `XrayDataset`; features are never augmented."""

    def __init__(self, features: np.ndarray, records: list[Record], stage: str):
        self.features = features
        self.targets = stage_targets(stage, (r.label for r in records))

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[int | tuple[int, int]]) -> list[tuple[torch.Tensor, int]]:
        # One fancy-indexed read per batch instead of one per item (DataLoader uses this).
        indices = [key[0] if isinstance(key, tuple) else key for key in keys]
        block = torch.from_numpy(self.features[np.asarray(indices)])
        return list(zip(block, (self.targets[i] for i in indices)))


class EpochShuffle(Sampler[tuple[int, int]]):
    """A shuffle fixed by (seed, epoch), yielding (index, epoch) pairs: a resumed run sees the
    same order, and the dataset draws each image's augmentation from the pair.

    Lightning calls `set_epoch` before each training epoch. Under DDP it wraps this sampler in
    its DistributedSamplerWrapper, which forwards `set_epoch` and hands each rank its share of
    these pairs unchanged.
    """

    def __init__(self, size: int, seed: int = 0):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        for index in torch.randperm(self.size, generator=generator).tolist():
            yield index, self.epoch


class KermanyDataModule(L.LightningDataModule):
    """Kermany-layout data for one stage (binary: all images; subtype: pneumonia only).

    Scanning, validation and the split happen in the constructor, so a bad data folder fails
    before any model is built. The split is assigned on all images before the stage filter,
    so both stages trained with the same seed share one train/val/test partition. Training
    images are augmented in the dataset (`Augmentation`), drawn from (shuffle_seed, epoch,
    index); validation and test images are not. The arguments mirror the `data` config group
    (train() instantiates this class from it), plus what only the run knows: the stage, the
    input size, the backbone's mean, std and interpolation, and the run's seed as
    `shuffle_seed`.
    """

    def __init__(
        self,
        root: str | Path,
        stage: str,
        image_size: int,
        mean: float = 0.0,
        std: float = 1.0,
        split: str = "official",
        split_seed: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.2,
        crop: dict | None = None,
        standardize: str = "none",
        interpolation: str = "bilinear",
        augment: dict | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = True,
        cache: bool = False,
        cache_dir: str | Path | None = None,
        cache_workers: int = 0,
        feature_cache: bool = False,
        skip_bad: bool = False,
        shuffle_seed: int = 0,
    ) -> None:
        super().__init__()
        if cache and not cache_dir:
            raise ConfigError("data.cache=true needs data.cache_dir")
        if feature_cache and (not cache or augment):
            raise ConfigError("data.feature_cache=true needs data.cache=true and "
                              "data.augment=null: features are computed once per cached image, "
                              "so no training image may change")
        self.cache_dir = Path(cache_dir).expanduser() if cache else None
        self.feature_cache, self.extract_features = feature_cache, None
        self.cache_workers, self.pin_memory = cache_workers, pin_memory
        self.persistent_workers, self.shuffle_seed = persistent_workers, shuffle_seed
        self.stage, self.batch_size, self.num_workers = stage, batch_size, num_workers
        self.augment = dict(augment) if augment else None
        self.root = Path(root).expanduser().resolve()
        # skip_bad: unreadable files are left out before the split, so no epoch ever meets them
        records, self.skipped = scan_with_skipped(self.root, skip_bad=skip_bad)
        self.manifest = split_records(records, split, val_fraction, test_fraction, split_seed)
        self.splits = {
            name: [r for r in self.manifest
                   if r.split == name and stage_target(stage, r.label) is not None]
            for name in ("train", "val", "test")
        }
        self._check_classes()
        self.preprocessing = Preprocessing(image_size=image_size, mean=mean, std=std,
                                           crop=self._crop_stats(crop),
                                           interpolation=interpolation, standardize=standardize)

    def _crop_stats(self, crop: dict | None) -> dict | None:
        """ProportionalCrop's fields: the crop fractions and the training split's largest sides."""
        if not crop or not crop.get("enabled", True):
            return None
        train = self.splits["train"]
        return {
            "max_width": max(r.width for r in train),
            "max_height": max(r.height for r in train),
            "width_fraction": float(crop.get("width", 0.35)),
            "height_fraction": float(crop.get("height", 0.20)),
        }

    def _check_classes(self) -> None:
        classes = STAGE_CLASSES[self.stage]
        for split in ("train", "val"):
            missing = [c for c, n in zip(classes, self.class_counts(split)) if n == 0]
            if missing:
                raise DataError(
                    f"stage={self.stage} needs {' and '.join(classes)} images in the {split} "
                    f"split, but {self.root} gives none for: {', '.join(missing)}"
                )

    def class_counts(self, split: str = "train") -> list[int]:
        counts = Counter(stage_target(self.stage, r.label) for r in self.splits[split])
        return [counts[i] for i in range(len(STAGE_CLASSES[self.stage]))]

    def class_weights(self) -> list[float]:
        """Inverse-frequency weights n / (k * n_c): a minority error costs n_major/n_minor more."""
        counts = np.asarray(self.class_counts("train"), dtype=np.float64)
        return (counts.sum() / (len(counts) * counts)).tolist()

    def write_manifest(self, path: Path) -> Path:
        return write_manifest(self.manifest, path)

    def write_skipped(self, path: Path) -> Path:
        return write_skipped(self.skipped, path)

    def use_features(self, extract: FeatureExtractor) -> None:
        """Serve features instead of images (data.feature_cache=true): `extract` turns a split's
        cached images into the frozen part's features. train() hands it in, built from the
        network, so this module needs no model and the model no data module."""
        self.extract_features = extract

    def prepare_data(self) -> None:
        """Build the preprocessed caches once (Lightning calls this on one process per node),
        and the feature caches on the trainer's device."""
        device = self.trainer.strategy.root_device if self.trainer is not None else None
        for split in ("train", "val", "test"):
            if self.feature_cache:  # (features() builds the split's image cache first)
                self.features(split, device)
            elif self.cache_dir is not None:
                self.cached_images(split)

    def cached_images(self, split: str) -> np.ndarray:
        return build_cache(self.splits[split], self.preprocessing, self.cache_dir,
                           self.cache_workers, desc=f"caching {self.stage}/{split}")

    def features(self, split: str, device: torch.device | None = None) -> np.ndarray:
        """(N, C, H, W) features of the split's cached images, from the `use_features` extractor."""
        if self.extract_features is None:
            raise RuntimeError("data.feature_cache=true: hand in the feature extractor with "
                               "use_features() before asking for data (train() does)")
        images = self.cached_images(split)
        if self.preprocessing.standardize != "none":  # features see what Preprocessing.normalize
            images = np.stack([standardize(i, self.preprocessing.standardize) for i in images])
        return self.extract_features(images, cache_key(self.splits[split], self.preprocessing),
                                     self.cache_dir, device)

    def dataset(self, split: str, augment: bool = False) -> Dataset:
        """The split's images (decoded from their files, or read from the preprocessed cache),
        augmented when `augment` and data.augment say so; or their cached features."""
        if self.feature_cache:
            return FeatureDataset(self.features(split), self.splits[split], self.stage)
        augmentation = None
        if augment and self.augment:
            augmentation = Augmentation(self.shuffle_seed, **self.augment)
        rows = self.cached_images(split) if self.cache_dir is not None else None
        return XrayDataset(self.splits[split], self.stage, self.preprocessing, augmentation, rows)

    def _loader(self, split: str, train: bool) -> DataLoader:
        data = self.dataset(split, augment=train)
        sampler = EpochShuffle(len(data), self.shuffle_seed) if train else None
        return DataLoader(
            data,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            pin_memory=self.pin_memory,
            drop_last=train and len(self.splits[split]) > self.batch_size,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)
