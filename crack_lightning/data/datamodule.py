"""The LightningDataModule: scan and split once (``split.csv``), then serve images, or cached backbone features
for the frozen stage."""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Callable

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from crack_lightning.config.schema import DataConfig
from crack_lightning.contract import Preprocessing
from crack_lightning.data.loaders import (
    Batches,
    ImageDataset,
    TensorItems,
    compute_features,
    make_loader,
)
from crack_lightning.data.records import SPLITS, Record, read_split_csv
from crack_lightning.data.split import build_split
from crack_lightning.data.transforms import eval_transform, train_transform
from crack_lightning.errors import DataError
from crack_lightning.files import path_text


class CrackDataModule(L.LightningDataModule):
    """The data of a run: ``prepare_data`` scans and splits once (``split.csv``), ``setup`` reads it,
    the loaders serve it (train with augmentation, val/test with the eval transform). Given
    ``records``, it serves those (tests, benchmarks).

    ``device_normalize``: batches stay uint8 ``(B,H,W,3)`` and the model normalises them on
    the GPU (a quarter of the bytes to pin and copy, which is what starves a fast GPU);
    ``defer_resize`` also leaves the eval resize to the GPU (see :func:`stack_uint8`).
    """

    def __init__(self, cfg: DataConfig, records: list[Record] | None = None, pre: Preprocessing | None = None,
                 device_normalize: bool = False, defer_resize: bool = False, run_dir: str | Path | None = None):
        super().__init__()
        self.cfg, self.records, self.pre = cfg, records, pre
        self.run_dir = Path(run_dir) if run_dir else None
        self.device_normalize = device_normalize
        self.defer_resize = device_normalize and defer_resize
        self.features: dict[str, TensorItems] = {}

    def prepare_data(self) -> None:
        """Once per run (rank 0; Lightning calls it on one process per node): scan, hash and split
        into ``run_dir/split.csv``. A split already there (a resumed run, or the one rank 0 wrote
        before DDP workers started) is kept."""
        if self.records is None and self.run_dir and not (self.run_dir / "split.csv").is_file():
            build_split(self.cfg, self.run_dir)

    def setup(self, stage: str | None = None) -> None:
        """Every process: read the split ``prepare_data`` wrote (once; later calls keep it)."""
        if self.records is None:
            if not self.run_dir or not (self.run_dir / "split.csv").is_file():
                raise DataError("no split to train on: CrackDataModule.prepare_data() has not written split.csv")
            records = read_split_csv(self.run_dir / "split.csv")
            gone = sorted({r.path for r in records if not os.path.isfile(r.path)})
            if gone:  # a resumed run reads the split it was started with: every file must still be there
                raise DataError(f"{len(gone)} image(s) of the run's split.csv are gone, e.g. {path_text(gone[0])}: "
                                "restore them (or point --data.root at where they are now and start a new run)")
            self.records = records

    # ---- the cached-feature frozen stage: what the loaders serve ----------------------------------
    def cache_features(self, make_extractor: Callable[[], Callable], views: int = 0, cache_file: Path | None = None,
                       rank_zero: bool = True) -> None:
        """Run the frozen backbone (``make_extractor()``) once over every split, plus ``views``
        augmented views of the training images; the loaders then serve the stored features
        (``Batch(features=True)``) and the head alone trains on them. Under DDP, rank 0 computes
        and writes ``cache_file``; the other processes read it instead of recomputing."""
        if not rank_zero and cache_file is not None and cache_file.is_file():
            stored = torch.load(cache_file, weights_only=True)
            self.features = {s: TensorItems(f, y) for s, (f, y) in stored.items()}
            return
        extract = make_extractor()
        feats = {s: compute_features(extract, self.eval_loader(s), f"caching features ({s})")
                 for s in SPLITS if self.split(s)}
        extra = [compute_features(extract, self.eval_loader("train", augment=True),
                                  f"caching features (train, augmented view {k + 1})")
                 for k in range(views)]
        feats["train"] = TensorItems.concat([feats["train"], *extra])
        self.features = feats
        if rank_zero and cache_file is not None:  # for DDP workers, if the strategy starts any
            from crack_lightning.files import atomic_write

            with atomic_write(cache_file, "wb") as f:
                torch.save({s: (t.features, t.labels) for s, t in feats.items()}, f)

    def serve_images(self) -> None:
        """Images again (the backbone is about to train: stored features would no longer describe it)."""
        self.features = {}

    @property
    def serves_features(self) -> bool:
        return bool(self.features)

    def split(self, name: str) -> list[Record]:
        return [r for r in self.records if r.split == name]

    def dataset(self, name: str, augment: bool = False) -> Dataset:
        if name in self.features:
            return self.features[name]
        return ImageDataset(self.split(name), self._transform(augment))

    def _transform(self, augment: bool):
        norm = not self.device_normalize
        if augment:
            return train_transform(self.pre, self.cfg.augment, norm)
        return None if self.device_normalize else eval_transform(self.pre)  # uint8: Batches resizes

    def _loader(self, ds: Dataset, shuffle: bool, sampler=None) -> DataLoader:
        images = not isinstance(ds, TensorItems)
        collate = Batches(self.pre, uint8=images and self.device_normalize, defer_resize=self.defer_resize,
                          features=not images)
        return make_loader(ds, self.cfg.batch_size, self.cfg.num_workers if images else 0, shuffle=shuffle,
                           collate_fn=collate, pin_memory=torch.cuda.is_available(),
                           prefetch_factor=self.cfg.prefetch_factor, persistent_workers=True, sampler=sampler)

    def train_dataloader(self) -> DataLoader:
        ds = self.dataset("train", augment=True)
        weights = self.source_weights(len(ds))
        if weights is None:
            return self._loader(ds, shuffle=True)
        from torch.utils.data import WeightedRandomSampler

        sampler = WeightedRandomSampler(weights, num_samples=len(ds), replacement=True)
        return self._loader(ds, shuffle=False, sampler=sampler)

    def source_weights(self, n: int) -> torch.Tensor | None:
        """``data.balance_sources``: per-item weights under which every source is drawn equally often
        (``n`` items: the training records, repeated when cached features hold augmented views)."""
        train = self.split("train")
        sources = [r.source for r in train]
        if not self.cfg.balance_sources or len(set(sources)) < 2 or n % len(train):
            return None
        counts = Counter(sources)
        return torch.tensor([1.0 / counts[s] for s in sources] * (n // len(train)), dtype=torch.double)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("val"), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("test"), shuffle=False)

    def eval_loader(self, name: str, augment: bool = False, records: list[Record] | None = None) -> DataLoader:
        """Images of split ``name`` (or just ``records`` of it) in order, never cached features
        (``augment``: train transform)."""
        return self._loader(ImageDataset(self.split(name) if records is None else records, self._transform(augment)),
                            shuffle=False)
