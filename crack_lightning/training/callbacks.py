"""What the recipe adds to Lightning's Trainer: a timer per epoch, atomic checkpoints, a history that
survives ``--resume``, a notice on interruption, and a progress bar without logger noise."""
from __future__ import annotations

import csv
import io
import sys
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.plugins.io import TorchCheckpointIO

from crack_lightning.files import atomic_write


class ProgressBar(TQDMProgressBar):
    """Lightning's bar without the logger's version number (``v_num=ozen`` for a stage's folder)."""

    def get_metrics(self, trainer, pl_module):  # noqa: D102 - Lightning's hook
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


class InterruptNotice(Callback):
    """Tell the user how to continue after Ctrl+C / SIGTERM (Lightning then exits)."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def on_exception(self, trainer, pl_module, exception) -> None:
        if isinstance(exception, KeyboardInterrupt) and trainer.is_global_zero:
            print(f"\ninterrupted: checkpoints of finished epochs are in {self.run_dir / 'checkpoints'}; continue with "
                  f"the same command plus --resume --run_name {self.run_dir.name}", file=sys.stderr)


class EpochTimer(Callback):
    """Wall time and images of each training epoch (validation excluded), for ``done.json``.

    What users and benchmarks want to know about speed is the epoch, data
    loading included, not the model alone.
    """

    def __init__(self):
        self.epochs: list[dict[str, float]] = []
        self._t0, self._images, self._open = 0.0, 0, False

    @staticmethod
    def _now(trainer) -> float:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)
        return time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t0, self._images, self._open = self._now(trainer), 0, True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._images += len(batch[1])

    def _close(self, trainer) -> None:
        if self._open:
            self._open = False
            seconds = self._now(trainer) - self._t0
            images = self._images * trainer.world_size
            self.epochs.append({"epoch": trainer.current_epoch, "train_s": round(seconds, 3), "images": images,
                                "images_per_s": round(images / max(seconds, 1e-9), 1)})

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._close(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._close(trainer)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written like every other output: a temporary file in the checkpoint's own
    folder, fsync, rename. Lightning's own atomic save writes the temporary file under $TMPDIR;
    on another file system the rename fails and it falls back to copying over the old file,
    which an interruption or a full disk leaves torn."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        buf = io.BytesIO()  # serialised first: torch's zip writer turns a failing write into a RuntimeError
        torch.save(checkpoint, buf)
        with atomic_write(path, "wb") as f:
            f.write(buf.getbuffer())


class HistoryCSVLogger(CSVLogger):
    """CSVLogger that continues ``metrics.csv`` when a run resumes (Lightning's deletes it):
    rows up to the resumed epoch are kept, later ones (logged after that checkpoint) dropped."""

    def __init__(self, *args, keep_until_epoch: int = -1, **kwargs):
        super().__init__(*args, **kwargs)
        self.keep_until_epoch = keep_until_epoch

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is None:
            path = Path(self.log_dir) / "metrics.csv"
            kept: list[dict] = []
            if self.keep_until_epoch >= 0 and path.is_file():
                with open(path, newline="") as f:
                    kept = [r for r in csv.DictReader(f) if _epoch(r) <= self.keep_until_epoch]
            writer = super().experiment  # deletes the old file
            if kept:
                writer.metrics_keys = sorted({k for r in kept for k in r})
                with atomic_write(path, "w", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=writer.metrics_keys)
                    w.writeheader()
                    w.writerows(kept)
            return writer
        return self._experiment


def _epoch(row: dict) -> int:
    try:
        return int(float(row.get("epoch") or -1))
    except ValueError:
        return -1


class EvaluationResults(Callback):
    """What a validation or test run found (metrics, and each item's probability for
    ``test_predictions.csv``): the Trainer hands them back here once the epoch is done."""

    def __init__(self):
        self.results: dict[str, dict[str, Any]] = {}

    def _take(self, stage: str, trainer, pl_module) -> None:
        found = pl_module.evaluation(stage)
        if found is not None and not trainer.sanity_checking:
            self.results[stage] = found

    def on_validation_end(self, trainer, pl_module) -> None:
        self._take("val", trainer, pl_module)

    def on_test_end(self, trainer, pl_module) -> None:
        self._take("test", trainer, pl_module)
