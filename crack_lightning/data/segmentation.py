"""Photos with crack masks for segmentation: random crops at several scales for training, whole photos for
validation and test, split by original photo (crops of one photo never straddle splits) and, for
leave-one-source-out, by source.

A data root is a folder of annotated photos (``images/NAME.jpg`` + ``masks/NAME.png``, white = crack);
several roots train together, each one a source named by its folder.
"""
from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import albumentations as A
import cv2
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from crack_lightning.contract import Preprocessing
from crack_lightning.data.images import decode_image, is_image_file, list_images
from crack_lightning.data.loaders import make_loader
from crack_lightning.data.records import Record
from crack_lightning.data.split import split_records
from crack_lightning.data.tiles import find_mask, group_of, is_mask_root, read_mask
from crack_lightning.errors import BadImageError, DataError


@dataclass(frozen=True)
class Photo:
    image: str
    mask: str
    source: str
    group: str


def scan_photos(roots: Sequence[str | Path], group_pattern: str = "") -> list[Photo]:
    """Every annotated photo under ``roots`` (each root a source); a root that is not one is an error."""
    photos = []
    for root in map(Path, roots):
        if not is_mask_root(root):
            raise DataError(f"{root} is not a folder of annotated photos (images/ + masks/)")
        for image in sorted(p for p in (root / "images").iterdir() if is_image_file(p)):
            mask = find_mask(root, image)
            if mask is not None:
                photos.append(Photo(str(image), str(mask), root.name, f"{root.name}/{group_of(image.stem, group_pattern)}"))
    if not photos:
        raise DataError(f"no annotated photos under {', '.join(map(str, roots))}")
    return photos


def split_photos(photos: list[Photo], tiles: list[Record], val_fraction: float, test_fraction: float, seed: int,
                 holdout: Sequence[str] = ()) -> dict[str, list[Photo]]:
    """train / val / test: each photo where its ``tiles`` fall under the classifier's split rule
    (:func:`split_records`: by original photo, per source, stratified, seeded). One rule for both models,
    so a crack map and a tile model trained on the same photos are tested on the same ones: an answer that
    joins them is never scored on a photo either one trained on. ``holdout``: those sources are the whole
    test split and none of their photos is trained on (leave-one-source-out); the rest's test photos train."""
    unknown = set(holdout) - {p.source for p in photos}
    if unknown:
        raise DataError(f"segment.holdout names no data root: {', '.join(sorted(unknown))} (the roots' folder names: "
                        f"{', '.join(sorted({p.source for p in photos}))})")
    of_tiles = {r.path: r.split for r in split_records(tiles, val_fraction, test_fraction, seed)}
    out: dict[str, list[Photo]] = {"train": [], "val": [], "test": []}
    for p in photos:
        name = of_tiles.get(p.image, "train")
        if holdout:
            name = "test" if p.source in holdout else "train" if name == "test" else name
        out[name].append(p)
    for name, part in out.items():
        if not part:
            raise DataError(f"segmentation split '{name}' is empty: add photos or change the fractions")
    return out


def scan_negatives(folders: Sequence[str | Path], limit: int, seed: int) -> list[Photo]:
    """Crack-free training images (an empty crack map each, ``mask`` ""): a seeded subset of at most ``limit``
    of the readable images under ``folders``; an unreadable one is left out with a warning."""
    files = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise DataError(f"segment.negatives: {folder} is not a folder")
        found = list_images(folder)
        if not found:
            raise DataError(f"segment.negatives: no images under {folder}")
        files += [(folder.name, p) for p in found]
    random.Random(seed).shuffle(files)
    out = []
    for name, path in files:
        if limit and len(out) >= limit:
            break
        try:
            decode_image(path)
        except BadImageError as exc:
            print(f"warning: segment.negatives: skipping {path}: {exc}", file=sys.stderr)
            continue
        out.append(Photo(str(path), "", f"negatives/{name}", f"negatives/{name}/{path.stem}"))
    return out


def read_photo_split(path: str | Path) -> dict[str, list[Photo]]:
    """A segmentation run's ``split.csv`` (image, mask, source, group, split) back as its photo splits."""
    import csv

    from crack_lightning.files import path_from_csv

    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return {name: [Photo(path_from_csv(r["image"]), path_from_csv(r["mask"]) if r["mask"] else "", r["source"], r["group"])
                   for r in rows if r["split"] == name] for name in ("train", "val", "test")}


def train_augment(crop: int) -> A.Compose:
    """Random crops at several scales (a crack seen closer or farther), flips and quarter turns, and the
    photometric changes of site photos (light, colour, blur, noise, compression)."""
    return A.Compose([
        A.RandomResizedCrop(size=(crop, crop), scale=(0.15, 1.0), ratio=(0.75, 1.33), interpolation=cv2.INTER_AREA,
                            mask_interpolation=cv2.INTER_NEAREST),
        A.HorizontalFlip(), A.VerticalFlip(), A.RandomRotate90(),
        A.RandomBrightnessContrast(0.3, 0.3, p=0.8), A.HueSaturationValue(10, 20, 15, p=0.5),
        A.OneOf([A.GaussianBlur(blur_limit=(3, 5)), A.MotionBlur(blur_limit=5)], p=0.3),
        A.GaussNoise(std_range=(0.02, 0.08), p=0.3), A.ImageCompression(quality_range=(40, 95), p=0.3),
    ])


def pad_to(image: np.ndarray, multiple: int = 32) -> np.ndarray:
    """Pad the bottom and right edges (reflected) to a multiple of ``multiple``: what the U-Net takes."""
    h, w = image.shape[:2]
    return cv2.copyMakeBorder(image, 0, -h % multiple, 0, -w % multiple, cv2.BORDER_REFLECT_101)


class MaskedPhotos(Dataset):
    """Items ``(normalised image (3,H,W), mask (H,W) float)``; training items are augmented crops."""

    def __init__(self, photos: list[Photo], pre: Preprocessing, augment: A.Compose | None = None):
        self.photos, self.pre, self.augment = photos, pre, augment
        self.mean = np.array(pre.mean, np.float32) * 255
        self.std = np.array(pre.std, np.float32) * 255

    def __len__(self) -> int:
        return len(self.photos)

    def __getitem__(self, i: int):
        p = self.photos[i]
        image = decode_image(p.image)
        mask = read_mask(Path(p.mask), (image.shape[1], image.shape[0])).astype(np.uint8) if p.mask \
            else np.zeros(image.shape[:2], np.uint8)  # a crack-free image (segment.negatives)
        if self.augment is not None:
            out = self.augment(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        else:
            image, mask = pad_to(image), pad_to(mask)
        x = torch.from_numpy(((image.astype(np.float32) - self.mean) / self.std).transpose(2, 0, 1).copy())
        return x, torch.from_numpy(mask.astype(np.float32))


class SegmentationDataModule(L.LightningDataModule):
    def __init__(self, splits: dict[str, list[Photo]], pre: Preprocessing, batch_size: int = 8, num_workers: int = 2):
        super().__init__()
        self.splits, self.pre, self.batch_size, self.num_workers = splits, pre, batch_size, num_workers

    def _loader(self, name: str, train: bool = False) -> DataLoader:
        ds = MaskedPhotos(self.splits[name], self.pre, train_augment(self.pre.size) if train else None)
        return make_loader(ds, self.batch_size if train else 1, self.num_workers, shuffle=train,
                           persistent_workers=True)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
