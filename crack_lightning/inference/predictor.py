"""Batch prediction over any mix of files, folders and globs (what ``predict.py`` runs).

Images go through the same :func:`~crack_lightning.data.images.decode_image` and
:func:`~crack_lightning.data.transforms.eval_transform` as training. A patch (no side over
:data:`~crack_lightning.data.tiles.PATCH_LIMIT`) is answered whole; a larger photo from its tiles
(:meth:`Predictor.answer`), the same evidence ``--localize``, the server's viewer and its table show.
A file that cannot be read becomes an error row; the run goes on.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from crack_lightning.data.images import decode_image, image_size
from crack_lightning.data.loaders import Batches, ImageDataset, make_loader
from crack_lightning.data.tiles import PHOTO_TILES, is_patch
from crack_lightning.data.transforms import eval_transform
from crack_lightning.errors import InputError
from crack_lightning.files import atomic_write, csv_path, csv_text
from crack_lightning.inference.outputs import PREDICTIONS_HEADER, model_files
from crack_lightning.limits import MAX_PIXELS
from crack_lightning.models.metrics import binary_metrics


def is_photo(path: str | Path) -> bool:
    """Whether the file is a photo (answered from its tiles), by its header; an unreadable file is not."""
    size = image_size(path)
    return size is not None and not is_patch(*size)


def label_from_path(path: Path, class_names: Sequence[str]) -> int | None:
    """The true class, when a parent folder is named like one of the classes (nearest wins)."""
    for parent in path.parents:
        if parent.name in class_names:
            return list(class_names).index(parent.name)
    return None


class Prepare:
    """One uploaded image (bytes or a path) -> the model's input item, as :class:`ImageDataset`
    makes it from files with ``transform`` (:attr:`Predictor.transform`): normalised float ``(3,S,S)``,
    or, with none (the PyTorch engine), the decoded ``HxWx3`` uint8 array that :class:`Batches` stacks. Raises :class:`BadImageError`
    for a file that is not a usable image (the server's per-request path)."""

    def __init__(self, transform, max_pixels: int = MAX_PIXELS):
        self.transform, self.max_pixels = transform, max_pixels

    def __call__(self, source: str | Path | bytes):
        image = decode_image(source, self.max_pixels)
        return image if self.transform is None else self.transform(image=image)["image"]


@dataclass
class Row:
    path: str
    probability: float | None
    label: str
    true_label: str = ""
    error: str = ""


@dataclass
class Answer:
    """One input's answer: its crack probability (a photo's: its highest tile's), the class name, and for a
    photo the tiles it came from (what a viewer shows)."""

    probability: float
    label: str
    localization: object | None = None  # a photo's Localization


@dataclass
class Predictor:
    """A loaded model (PyTorch checkpoint or exported ONNX) with its threshold and preprocessing.

    ``checkpoint``: a file, or a shipped model's short name (:data:`~crack_lightning.inference.outputs.MODEL_NAMES`;
    default ``site``: patches by the Mendeley model, photos by the photo model's tiles). ``photos`` is the
    predictor whose tiles answer photos (itself for a single file)."""

    checkpoint: str | Path | None = None
    device: str = "cpu"
    batch_size: int = 0  # 0: 32 on a CPU, 256 on a GPU
    num_workers: int = -1  # -1: 1 decode worker on a CPU; on a GPU enough to keep it busy (cores - 1, at most 16)
    threshold: float | None = None
    engine: str = "auto"  # auto: ONNX Runtime on CPU, PyTorch on GPU; or "torch" / "onnx"
    resize_on_device: bool | None = None  # None: on a GPU (PyTorch engine only; see defer_resize)
    progress: bool = False  # draw a progress bar over long work (the command line asks; a library call does not)
    photo_tiles: tuple[int, ...] = PHOTO_TILES  # a photo's tile sides (see data/tiles.py)
    photo_model: str | Path | None = None  # a file that answers photos instead of the choice's own (a site's)

    def __post_init__(self) -> None:
        self.on_gpu = str(self.device).startswith("cuda")
        kind, _, index = str(self.device).partition(":")
        if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdigit())):
            raise InputError(f"--device must be cpu, cuda or cuda:N, got {self.device!r}")
        if self.on_gpu and not torch.cuda.is_available():
            raise InputError(f"--device {self.device}: no CUDA GPU is available on this machine; use --device cpu")
        if self.on_gpu and index and int(index) >= torch.cuda.device_count():
            raise InputError(f"--device {self.device}: no such GPU (this machine has {torch.cuda.device_count()})")
        if self.batch_size <= 0:
            self.batch_size = 256 if self.on_gpu else 32
        if self.num_workers < 0:
            self.num_workers = min(16, max(1, (os.cpu_count() or 2) - 1)) if self.on_gpu else 1
        self.choice = str(self.checkpoint or "site")
        self._asked_threshold = self.threshold  # the user's override (None: each model's stored one)
        self.checkpoint, self._photo_file = model_files(self.checkpoint)
        self._photo_file = Path(self.photo_model) if self.photo_model else self._photo_file
        self._photos = self if self._photo_file == self.checkpoint else None
        self._model, self._run = None, None
        if self.checkpoint.suffix == ".onnx":
            from crack_lightning.models.runtime import OnnxModel

            self._model = OnnxModel(self.checkpoint)
            self.pre, self.class_names, stored = self._model.pre, self._model.class_names, self._model.threshold
        else:
            from crack_lightning.models.checkpoint import (
                read_checkpoint,
                stored_contract,
            )
            from crack_lightning.models.runtime import use_onnx

            self._ckpt = read_checkpoint(self.checkpoint)
            contract = stored_contract(self._ckpt, self.checkpoint)
            if use_onnx(self.engine, self.device) and contract:
                # ONNX Runtime on a CPU: a cached export of this file runs with no network built (no timm,
                # no weights loaded: most of a one-photo start-up)
                from crack_lightning.models.runtime import (
                    cached_export,
                    file_key,
                    onnx_runner,
                )

                self.pre, self.class_names, stored = contract
                onnx = cached_export(file_key(self.checkpoint, "probability", self.pre.size), self._export)
                self._run = onnx_runner(onnx, self.pre.size)
            else:
                self.pre, self.class_names = self.model.pre, list(self.model.hparams.class_names)
                stored = float(self.model.threshold)
                if use_onnx(self.engine, self.device):
                    from crack_lightning.inference.export import ProbabilityModel
                    from crack_lightning.models.runtime import onnx_runner

                    self._run = onnx_runner(ProbabilityModel(self.model).float(), self.pre.size)
        if self.threshold is None:  # a stored threshold is only used once it is known to be sane
            from crack_lightning.models.checkpoint import check_threshold

            self.threshold = check_threshold(stored, self.checkpoint)

    @property
    def photos(self) -> "Predictor":
        """The predictor whose tiles answer photos (loaded when a photo first comes)."""
        if self._photos is None:
            self._photos = Predictor(self._photo_file, self.device, self.batch_size, self.num_workers, self._asked_threshold,
                                     self.engine, self.resize_on_device, self.progress, self.photo_tiles)
        return self._photos

    @property
    def photo_threshold(self) -> float | None:
        """The threshold photos' tiles were held to, once a photo was answered (None before)."""
        return None if self._photos is None else float(self._photos.threshold)

    @property
    def name(self) -> str:
        """What the outputs name as the model: the file, or both files of a combined choice."""
        if self._photo_file == self.checkpoint:
            return Path(str(self.checkpoint)).name
        return f"{self.choice} ({self.checkpoint.name} for patches, {self._photo_file.name} for photos)"

    def answer(self, image, name: str = "photo", progress: bool = False, should_stop=None) -> Answer:
        """The answer for one decoded ``HxWx3`` image: a patch whole, a photo from its tiles at
        :attr:`photo_tiles` (any tile at the photo model's threshold flags it)."""
        if is_patch(image.shape[1], image.shape[0]):
            p = float(self.probabilities(eval_transform(self.pre)(image=image)["image"][None])[0])
            return Answer(p, self.class_names[int(p >= self.threshold)])
        from crack_lightning.inference.localize import localize_array

        loc = localize_array(image, self.photos, 0, None, name, progress, should_stop)
        return Answer(loc.probability, self.photos.class_names[int(loc.probability >= loc.threshold)], loc)

    @property
    def model(self):
        """The network (built from the checkpoint when first asked: the ONNX path may never need it)."""
        if self._model is None:
            from crack_lightning.models.checkpoint import model_from

            self._model = model_from(self._ckpt, self.checkpoint, self.device).to(memory_format=torch.channels_last)
        return self._model

    def _export(self) -> bytes:
        from crack_lightning.inference.export import ProbabilityModel
        from crack_lightning.models.runtime import exported

        return exported(ProbabilityModel(self.model).float().cpu(), self.pre.size)

    @property
    def device_normalize(self) -> bool:
        """PyTorch engine: the loader ships uint8 and the model normalises on its device
        (on a GPU, 4x fewer bytes to pin and copy)."""
        return self._run is None and isinstance(self._model, torch.nn.Module)

    @property
    def defer_resize(self) -> bool:
        """Whether the model's device also does the resize (:func:`stack_uint8`; same pixels).
        By default on a GPU: the resize is most of a loader worker's time, and the loader is
        what limits prediction there; on a CPU OpenCV does it faster than PyTorch."""
        on = self.on_gpu if self.resize_on_device is None else self.resize_on_device
        return self.device_normalize and on

    @torch.inference_mode()
    def _launch(self, batch: torch.Tensor) -> torch.Tensor:
        """Start the model on a batch; the probabilities stay on its device, not waited for."""
        if self._run is not None:
            return self._run(batch)
        if not isinstance(self.model, torch.nn.Module):
            return self.model(batch)
        return self.model.predict_proba(batch.to(self.device, non_blocking=True))

    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """Crack probabilities for a batch of normalised floats (:func:`eval_transform`) or,
        for the PyTorch engine, uint8 ``(B,H,W,3)`` (:func:`stack_uint8`)."""
        return self._launch(batch).cpu()

    def preparer(self, max_pixels: int = MAX_PIXELS) -> "Prepare":
        """What turns one image file into this model's input item (see :class:`Prepare`)."""
        return Prepare(self.transform, max_pixels)

    @property
    def transform(self):
        """What a worker does to a decoded image: the eval transform into normalised floats, or
        nothing when the model's device finishes uint8 batches (:attr:`device_normalize`)."""
        return None if self.device_normalize else eval_transform(self.pre)

    @property
    def collate(self) -> Batches:
        """Items ``(input or None, label, index, error)`` -> one :class:`Batch` for :meth:`probabilities`."""
        return Batches(self.pre, uint8=self.device_normalize, defer_resize=self.defer_resize)

    def dataset(self, paths: Sequence[Path], max_pixels: int = MAX_PIXELS) -> ImageDataset:
        """``paths`` as this model's input items; an unreadable file becomes an error item."""
        return ImageDataset(paths, self.transform, tolerant=True, max_pixels=max_pixels)

    def loader(self, paths: Sequence[Path], dataset=None, collate_fn=None) -> DataLoader:
        """:class:`Batch` es of ``paths``, in order, ready for :meth:`probabilities` (``dataset`` and ``collate_fn``:
        a wrapper of :meth:`dataset` over the same paths, and its collate)."""
        # one batch or less: a worker process costs more (its start) than it overlaps
        workers = 0 if len(paths) <= self.batch_size else self.num_workers
        return make_loader(dataset or self.dataset(paths), self.batch_size, workers,
                           collate_fn=collate_fn or self.collate, pin_memory=self.on_gpu, prefetch_factor=4)

    def iter_rows(self, paths: Sequence[str | Path] | str | Path, progress: bool | None = None) -> Iterator[Row]:
        """One row per path, in order. One batch stays in flight: a GPU computes it while
        the next one is fetched, instead of idling until the host has written its rows."""
        if isinstance(paths, (str, os.PathLike)):  # one path, not its characters
            paths = [paths]
        paths = [Path(p) for p in paths]
        photo = [is_photo(p) for p in paths]  # headers only
        patch_rows = self._patch_rows([p for p, ph in zip(paths, photo) if not ph], progress)
        bar = self.progress if progress is None else progress
        with tqdm(total=sum(photo), desc="photos (tiles)", unit="photo", disable=not bar or not any(photo)) as done:
            for path, ph in zip(paths, photo):
                if ph:
                    yield self.photo_row(path)
                    done.update()
                else:
                    yield next(patch_rows)

    def photo_row(self, path: Path) -> Row:
        """The row of a photo (:func:`is_photo`): answered from its tiles."""
        from crack_lightning.errors import BadImageError

        try:
            a = self.answer(decode_image(path), str(path))
        except BadImageError as exc:
            return self.row(path, None, str(exc))
        return self.row(path, a.probability, label=a.label)

    def _patch_rows(self, paths: list[Path], progress: bool | None) -> Iterator[Row]:
        pending = None
        bar = self.progress if progress is None else progress
        for b in tqdm(self.loader(paths), desc="predicting", unit="batch", disable=not bar):
            launched = (None if b.x is None else self._launch(b.x), b.index.tolist(), b.errors)
            if pending is not None:
                yield from self._batch_rows(paths, *pending)
            pending = launched
        if pending is not None:
            yield from self._batch_rows(paths, *pending)

    def _batch_rows(self, paths: Sequence[Path], probs: torch.Tensor | None, idx: list[int],
                    errors: list[tuple[int, str]]) -> list[Row]:
        rows = [] if probs is None else [(i, self.row(paths[i], p)) for i, p in zip(idx, probs.cpu().tolist())]
        rows += [(i, self.row(paths[i], None, err)) for i, err in errors]
        return [row for _, row in sorted(rows, key=lambda t: t[0])]

    def row(self, path: Path, prob: float | None, error: str = "", label: str | None = None) -> Row:
        """The output row of one file: its probability (None where it could not be read), the label at
        this predictor's threshold (or ``label``, a photo's answer from its tiles), the label its folder
        names, and the error."""
        truth = label_from_path(path, self.class_names)
        if label is None:
            label = "" if prob is None else self.class_names[int(prob >= self.threshold)]
        return Row(str(path), prob, label, self.class_names[truth] if truth is not None else "", error)



def write_rows(rows: Iterable[Row], path: str | Path) -> list[Row]:
    """Write the prediction CSV atomically (UTF-8; paths and text cells as :func:`~crack_lightning.files.csv_path`
    writes them); return the rows."""
    rows = list(rows)
    with atomic_write(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(PREDICTIONS_HEADER)
        for r in rows:
            correct = "" if not r.true_label or r.probability is None else int(r.label == r.true_label)
            prob = "" if r.probability is None else f"{r.probability:.6f}"
            w.writerow([csv_path(r.path), prob, csv_text(r.label), csv_text(r.true_label), correct,
                        csv_text(r.error)])
    return rows


def compare(rows: Sequence[Row], class_names: Sequence[str], threshold: float) -> dict | None:
    """Metrics of the rows whose true class is known from their folder (None if none is), scored on the
    rows' own labels (a photo's came from its tiles at the photo model's threshold)."""
    known = [r for r in rows if r.true_label and r.probability is not None]
    if not known:
        return None
    probs = torch.tensor([r.probability for r in known])
    labels = torch.tensor([list(class_names).index(r.true_label) for r in known])
    decided = torch.tensor([r.label == class_names[1] for r in known])
    return binary_metrics(probs, labels, threshold, decided)
