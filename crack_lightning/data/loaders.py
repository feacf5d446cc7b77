"""THE dataset, collate and DataLoader of every path that reads images (training, evaluation, prediction)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import cv2
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from crack_lightning.contract import Preprocessing
from crack_lightning.data.images import decode_image
from crack_lightning.data.records import Record
from crack_lightning.data.transforms import stack_uint8
from crack_lightning.errors import BadImageError
from crack_lightning.hardware import available_cpus
from crack_lightning.limits import MAX_PIXELS


class Batch(NamedTuple):
    """What every loader of the project yields (training, evaluation, prediction, robustness).

    ``x``: images, normalised floats ``(B,3,S,S)`` or uint8 ``(B,H,W,3)`` that the model's device
    finishes (:meth:`CrackClassifier.on_after_batch_transfer`), or cached backbone features
    ``(B,C)`` when ``features`` is true (the head alone trains on them); ``None`` when no item of
    the batch could be read. ``y``: labels (-1 = unknown), ``index``: the items' dataset indices,
    ``errors``: ``(index, reason)`` of items that could not be read (prediction only).
    """

    x: torch.Tensor | None
    y: torch.Tensor
    index: torch.Tensor
    errors: list
    features: bool = False


class ImageDataset(Dataset):
    """THE image dataset: items ``(image or None, label, index, error)`` of records (files, or
    tiles of annotated photos) or plain paths (label -1).

    ``transform`` (albumentations; ``None`` leaves the decoded HWC uint8 array for :class:`Batches`
    to stack and the model's device to finish); ``before(image, index)`` alters the decoded image
    first (robustness shifts); ``tolerant``: a file that is not a usable image becomes an error
    item instead of an exception (prediction goes on past it; training never does).
    """

    def __init__(self, items: Sequence[Record | str | Path], transform: Callable | None = None, *,
                 before: Callable | None = None, tolerant: bool = False, max_pixels: int = MAX_PIXELS):
        self.records = [r if isinstance(r, Record) else Record(str(r), -1, "") for r in items]
        self.transform, self.before, self.tolerant, self.max_pixels = transform, before, tolerant, max_pixels
        self._photo: tuple[str, object] = ("", None)  # the last photo decoded: its tiles come in a row

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        r = self.records[i]
        try:
            if r.box:
                from crack_lightning.data.tiles import crop

                if self._photo[0] != r.path:
                    self._photo = (r.path, decode_image(r.path, self.max_pixels))
                image = crop(self._photo[1], r.box)
            else:
                image = decode_image(r.path, self.max_pixels)
        except BadImageError as exc:
            if not self.tolerant:
                raise
            return None, float(r.label), i, str(exc)
        if self.before is not None:
            image = self.before(image, i)
        if self.transform is not None:
            image = self.transform(image=image)["image"]
        return image, float(r.label), i, ""


@dataclass
class Batches:
    """THE collate: items ``(image or None, label, index, error)`` -> one :class:`Batch`.

    ``uint8``: the images are HWC uint8 arrays, stacked by :func:`stack_uint8` (``defer_resize``:
    the model's device resizes them too); else float tensors (or cached features, ``features``),
    stacked as they are. Unreadable items travel as ``errors``.
    """

    pre: Preprocessing | None = None
    uint8: bool = False
    defer_resize: bool = False
    features: bool = False

    def __call__(self, items: list[tuple]) -> Batch:
        good = [it for it in items if it[0] is not None]
        errors = [(it[2], it[3]) for it in items if it[0] is None]
        if not good:
            x = None
        elif self.uint8:
            x = stack_uint8([it[0] for it in good], self.pre, self.defer_resize)
        else:
            x = torch.stack([torch.as_tensor(it[0]) for it in good])
        y = torch.tensor([float(it[1]) for it in good], dtype=torch.float32)
        index = torch.tensor([int(it[2]) for it in good], dtype=torch.long)
        return Batch(x, y, index, errors, self.features)


def make_loader(ds: Dataset, batch_size: int, num_workers: int, *, shuffle: bool = False, collate_fn=None,
                pin_memory: bool = False, prefetch_factor: int = 2, persistent_workers: bool = False,
                sampler=None) -> DataLoader:
    """Every DataLoader of the project that decodes images.

    The worker processes are the parallelism, so OpenCV runs single-threaded:
    with its default pool (one thread per core) in each of 15 workers on a
    16-core GPU host, the loader delivered ~3,400 img/s where one worker alone
    does ~900. It is set here, in the parent, before the workers fork: a worker
    that reconfigures an OpenCV pool inherited through fork deadlocks.
    """
    num_workers = min(num_workers, available_cpus())  # more workers than cores only contend (and warn)
    if num_workers > 0:
        cv2.setNumThreads(1)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, sampler=sampler, num_workers=num_workers,
                      collate_fn=collate_fn,
                      pin_memory=pin_memory, prefetch_factor=prefetch_factor if num_workers > 0 else None,
                      persistent_workers=persistent_workers and num_workers > 0)


class TensorItems(Dataset):
    """Pre-computed backbone features served like images: ``(feature, label, index, "")``."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor):
        self.features, self.labels = features, labels

    @classmethod
    def concat(cls, parts: Sequence["TensorItems"]) -> "TensorItems":
        return cls(torch.cat([p.features for p in parts]), torch.cat([p.labels for p in parts]))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.features[i], float(self.labels[i]), i, ""


@torch.inference_mode()
def compute_features(extract, loader: DataLoader, desc: str) -> TensorItems:
    """Run the frozen backbone once over ``loader`` (progress bar labelled ``desc``): the features the head
    trains on, or that a release stores as training anchors."""
    feats, labels = [], []
    for b in tqdm(loader, desc=desc, unit="batch"):
        feats.append(extract(b.x))
        labels.append(b.y)
    return TensorItems(torch.cat(feats), torch.cat(labels))
