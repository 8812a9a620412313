"""KermanyDataModule: scans, splits and serves one stage's images."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pneumonia.data.cache import build_cache, cache_key
from pneumonia.data.features import build_feature_cache
from pneumonia.data.kermany import (
    DataError,
    Record,
    scan_with_skipped,
    split_records,
    write_manifest,
    write_skipped,
)
from pneumonia.data.transforms import Preprocessing, build_augmentation
from pneumonia.io import read_grayscale
from pneumonia.stages import STAGE_CLASSES, stage_target, stage_targets


class XrayDataset(Dataset):
    """(1, S, S) float tensor and the class index in `stage` (-1 where the stage has none)."""

    def __init__(self, records: list[Record], stage: str, preprocessing: Preprocessing, augment=None):
        self.records = records
        self.targets = stage_targets(stage, (r.label for r in records))
        self.preprocessing = preprocessing
        self.augment = augment

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.preprocessing(read_grayscale(self.records[index].path))
        if self.augment is not None:
            image = self.augment(image=image)["image"]
        return torch.from_numpy(self.preprocessing.normalize(image)), self.targets[index]


class EpochShuffle(Sampler[int]):
    """A shuffle fixed by (seed, epoch), so a resumed run sees the same order.

    Lightning calls `set_epoch` before each training epoch (and wraps this sampler for DDP).
    """

    def __init__(self, size: int, seed: int = 0):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        yield from torch.randperm(self.size, generator=generator).tolist()


class CachedDataset(Dataset):
    """Rows of a cached array and the class index: preprocessed uint8 images (1, S, S), which
    the module normalises and augments as whole batches (on the GPU when there is one), or
    backbone features (V, C, H, W) from the feature cache."""

    def __init__(self, rows: np.ndarray, records: list[Record], stage: str):
        self.rows = rows
        self.targets = stage_targets(stage, (r.label for r in records))

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(np.array(self.rows[index])), self.targets[index]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        # One fancy-indexed read per batch instead of one per image (DataLoader uses this).
        block = torch.from_numpy(self.rows[np.asarray(indices)])
        return list(zip(block, (self.targets[i] for i in indices)))


class KermanyDataModule(L.LightningDataModule):
    """Kermany-layout data for one stage (binary: all images; subtype: pneumonia only).

    Scanning, validation and the split happen in the constructor, so a bad data folder fails
    before any model is built. The split is assigned on all images before the stage filter,
    so both stages trained with the same seed share one train/val/test partition.
    """

    def __init__(
        self,
        root: str | Path,
        stage: str,
        image_size: int,
        mean: float = 0.0,
        std: float = 1.0,
        split: str = "official",
        val_fraction: float = 0.15,
        test_fraction: float = 0.2,
        seed: int = 0,
        crop: dict | None = None,
        augment: dict | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        cache: bool = False,
        cache_dir: str | Path | None = None,
        cache_workers: int = 0,
        feature_cache: bool = False,
        pin_memory: bool = False,
        persistent_workers: bool = True,
        shuffle_seed: int = 0,
        skip_bad: bool = False,
    ) -> None:
        super().__init__()
        self.shuffle_seed = shuffle_seed
        if cache and not cache_dir:
            raise ValueError("data.cache=true needs data.cache_dir")
        self.cache_dir = Path(cache_dir).expanduser() if cache and cache_dir else None
        if feature_cache and self.cache_dir is None:
            raise ValueError("data.feature_cache=true needs data.cache=true")
        self.feature_cache = feature_cache
        self.cache_workers = cache_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.stage = stage
        self.root = Path(root).expanduser().resolve()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.augment = dict(augment) if augment else None
        # skip_bad: unreadable files are left out before the split, so no epoch ever meets them
        records, self.skipped = scan_with_skipped(self.root, skip_bad=skip_bad)
        self.manifest = split_records(records, split, val_fraction, test_fraction, seed)
        self.splits = {
            name: [r for r in self.manifest if r.split == name and stage_target(stage, r.label) is not None]
            for name in ("train", "val", "test")
        }
        self._check_classes()
        train = self.splits["train"]
        crop_stats = None
        if crop and crop.get("enabled", True):
            crop_stats = {
                "max_width": max(r.width for r in train),
                "max_height": max(r.height for r in train),
                "width_fraction": float(crop.get("width", 0.35)),
                "height_fraction": float(crop.get("height", 0.20)),
            }
        self.preprocessing = Preprocessing(image_size=image_size, mean=mean, std=std, crop=crop_stats)

    def _check_classes(self) -> None:
        classes = STAGE_CLASSES[self.stage]
        for split in ("train", "val"):
            counts = self.class_counts(split)
            missing = [c for c, n in zip(classes, counts) if n == 0]
            if missing:
                raise DataError(
                    f"stage={self.stage} needs {' and '.join(classes)} images in the {split} split, "
                    f"but {self.root} gives none for: {', '.join(missing)}"
                )

    def class_counts(self, split: str = "train") -> list[int]:
        counts = Counter(stage_target(self.stage, r.label) for r in self.splits[split])
        return [counts[i] for i in range(len(STAGE_CLASSES[self.stage]))]

    def class_weights(self) -> list[float]:
        """Inverse-frequency weights n / (k * n_c): the minority error costs n_major / n_minor more."""
        counts = np.asarray(self.class_counts("train"), dtype=np.float64)
        return (counts.sum() / (len(counts) * counts)).tolist()

    def write_manifest(self, path: Path) -> Path:
        return write_manifest(self.manifest, path)

    def write_skipped(self, path: Path) -> Path:
        return write_skipped(self.skipped, path)

    def prepare_data(self) -> None:
        """Build the preprocessed caches once (Lightning calls this on one process per node),
        and the feature cache with the trainer's network on its device."""
        if self.cache_dir is not None:
            for split in ("train", "val", "test"):
                self.cached_images(split)
        if self.feature_cache:
            for split in ("train", "val", "test"):
                self.cached_features(split, self.trainer.lightning_module.net, self.trainer.strategy.root_device)

    def cached_images(self, split: str) -> np.ndarray:
        return build_cache(self.splits[split], self.preprocessing, self.cache_dir, self.cache_workers,
                           desc=f"caching {self.stage}/{split}")

    def cached_features(self, split: str, net, device=None) -> np.ndarray:
        """(N, V, C, H, W) frozen features of `net`; V = 2 (image, mirror) for a flipped train split."""
        views = 2 if split == "train" and self.augment and self.augment.get("hflip") else 1
        return build_feature_cache(
            self.cached_images(split), cache_key(self.splits[split], self.preprocessing), net,
            self.preprocessing.mean, self.preprocessing.std, views, self.cache_dir, self.batch_size,
            device, desc=f"features {self.stage}/{split}")

    def dataset(self, split: str, augment: bool = False) -> Dataset:
        """Cached: uint8 images, augmented later on the batch. Plain: decoded, augmented here.
        Feature cache: the features of the trainer's network (hashed again here, after a
        resumed run's weights are restored, so they always match the weights in use)."""
        if self.feature_cache:
            features = self.cached_features(split, self.trainer.lightning_module.net)
            return CachedDataset(features, self.splits[split], self.stage)
        if self.cache_dir is not None:
            return CachedDataset(self.cached_images(split)[:, None], self.splits[split], self.stage)
        aug = build_augmentation(**self.augment) if augment and self.augment else None
        return XrayDataset(self.splits[split], self.stage, self.preprocessing, aug)

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
