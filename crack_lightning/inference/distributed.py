"""Prediction spread over processes, GPUs and nodes with Lightning's own machinery.

``predict.py INPUT... --accelerator gpu --devices 4 [--num_nodes 2]`` runs
``Trainer.predict`` under DDP: Lightning starts the processes and gives each a
``DistributedSampler`` share of the files; every process builds its own
:class:`~crack_lightning.inference.predictor.Predictor` on its own device (same engine rule,
preprocessing and threshold as a single-process run), and a
:class:`~lightning.pytorch.callbacks.BasePredictionWriter` stores its rows in a shard.
Global rank 0 merges the shards in input order (the sampler's padding repeats a few
files: each index is kept once), so the CSV is the one a single process writes.
With several nodes the output folder must be shared by all of them.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from crack_lightning.errors import InputError
from crack_lightning.hardware import no_gpu_hint
from crack_lightning.inference.predictor import Predictor, Row, is_photo


class PredictModule(L.LightningModule):
    """Holds the :class:`Predictor` settings; each process builds its own predictor in
    :meth:`setup`, on the device Lightning gave it, and serves the files from
    :meth:`predict_dataloader` (Lightning adds the distributed sampler)."""

    def __init__(self, paths: Sequence[Path], predictor_kwargs: dict[str, Any]):
        super().__init__()
        self.paths = [Path(p) for p in paths]
        self.predictor_kwargs = predictor_kwargs
        self.predictor: Predictor | None = None

    def setup(self, stage: str) -> None:
        device = self.trainer.strategy.root_device
        name = "cpu" if device.type == "cpu" else f"cuda:{device.index or 0}"
        self.predictor = Predictor(**{**self.predictor_kwargs, "device": name})

    def predict_dataloader(self):
        photo = [is_photo(p) for p in self.paths]  # headers only
        return self.predictor.loader(self.paths, PatchesOnly(self.predictor.dataset(self.paths), photo),
                                     PatchesOnly.collate(self.predictor.collate))

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch  # the predictor moves its inputs itself (uint8 to the GPU, or stays on the host for ONNX)

    def predict_step(self, batch, batch_idx):
        """``(index, probability, label)`` of each readable file (a photo's from its tiles, as in one process)."""
        batch, photos = batch
        probs = [] if batch.x is None else self.predictor.probabilities(batch.x).tolist()
        rows = [(i, self.predictor.row(self.paths[i], p)) for i, p in zip(batch.index.tolist(), probs)]
        rows += [(i, self.predictor.photo_row(self.paths[i])) for i in photos]
        done = [(i, row.probability, row.label) for i, row in rows if not row.error]
        return done, list(batch.errors) + [(i, row.error) for i, row in rows if row.error]


class PatchesOnly(torch.utils.data.Dataset):
    """The predictor's dataset, except that a photo is not decoded here (its row comes from its tiles in
    ``predict_step``, which decodes it once): its item is only its index. Batches are ``(Batch, photo indices)``."""

    def __init__(self, dataset, photo: Sequence[bool]):
        self.dataset, self.photo = dataset, list(photo)

    def __len__(self) -> int:
        return len(self.photo)

    def __getitem__(self, i: int):
        return i if self.photo[i] else self.dataset[i]

    @staticmethod
    def collate(collate):
        def split(items: list):
            return collate([it for it in items if not isinstance(it, int)]), [it for it in items if isinstance(it, int)]
        return split


class ShardWriter(BasePredictionWriter):
    """Each process writes its ``(index, probability, label)`` and ``(index, error)`` pairs to ``folder``."""

    def __init__(self, folder: Path):
        super().__init__(write_interval="epoch")
        self.folder = folder

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        good = [pair for batch, _ in predictions for pair in batch]
        bad = [pair for _, errors in predictions for pair in errors]
        self.folder.mkdir(parents=True, exist_ok=True)
        torch.save({"good": good, "bad": bad}, self.folder / f"rank{trainer.global_rank}.pt")


def predict_distributed(paths: Sequence[Path], predictor_kwargs: dict[str, Any], shard_dir: Path,
                        accelerator: str = "cpu", devices: int | str = 1, num_nodes: int = 1,
                        progress: bool = True) -> tuple[list[Row] | None, Predictor]:
    """Rows of ``paths`` in order on global rank 0 (``None`` on the other ranks), and this
    process's predictor. ``shard_dir`` is removed afterwards."""
    from crack_lightning.console import quiet_lightning

    with quiet_lightning():
        strategy = "ddp" if num_nodes > 1 or devices not in (1, "1") else "auto"
        module = PredictModule(paths, predictor_kwargs)
        try:
            trainer = L.Trainer(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy,
                                callbacks=[ShardWriter(shard_dir)], logger=False, enable_checkpointing=False,
                                enable_model_summary=False, enable_progress_bar=progress)
        except (MisconfigurationException, ValueError, TypeError) as exc:
            raise InputError(f"--accelerator {accelerator} --devices {devices}: {exc}"
                             f"{no_gpu_hint(accelerator, '--accelerator')}") from None
        trainer.predict(module, return_predictions=False)
        trainer.strategy.barrier()
        if trainer.global_rank != 0:
            return None, module.predictor
        rows = merge_shards(paths, shard_dir, module.predictor, trainer.world_size)
        remove_shards(shard_dir, trainer.world_size)
        return rows, module.predictor


SHARD = re.compile(r"rank\d+\.pt")


def shards_ours(shard_dir: Path) -> bool:
    """Whether ``shard_dir`` is absent or holds only shard files this module writes (an interrupted run's)."""
    return not shard_dir.exists() or (shard_dir.is_dir() and all(SHARD.fullmatch(p.name) for p in shard_dir.iterdir()))


def remove_shards(shard_dir: Path, world_size: int) -> None:
    """Remove the shard files this run wrote, and the folder once empty: never a file it did not write."""
    for rank in range(world_size):
        (shard_dir / f"rank{rank}.pt").unlink(missing_ok=True)
    try:
        shard_dir.rmdir()
    except OSError:
        pass


def merge_shards(paths: Sequence[Path], shard_dir: Path, predictor: Predictor, world_size: int) -> list[Row]:
    """One row per path, in input order, from every rank's shard."""
    probs: dict[int, tuple[float, str]] = {}
    errors: dict[int, str] = {}
    for rank in range(world_size):
        shard = torch.load(shard_dir / f"rank{rank}.pt", weights_only=True)
        probs.update({i: (p, label) for i, p, label in shard["good"]})
        errors.update(dict(shard["bad"]))
    missing = [i for i in range(len(paths)) if i not in probs and i not in errors]
    if missing:
        raise RuntimeError(f"{len(missing)} file(s) predicted by no process (first: {paths[missing[0]]})")
    # each label as the process that answered it decided (a photo's: at the photo model's threshold)
    rows = []
    for i, p in enumerate(paths):
        prob, label = probs.get(i, (None, None))
        rows.append(predictor.row(Path(p), prob, errors.get(i, ""), label=label))
    return rows
