"""What a run prints: progress bars, the split, the result, where it went; not library chatter.

Lightning announces its device probe, its cloud products and its reading of
``limit_*_batches`` once per Trainer (a run has several); none of it calls for
action. Warnings that do not apply to this recipe are dropped by message, so
anything new still shows.
"""
from __future__ import annotations

import contextlib
import logging
import re
import warnings
from typing import Iterator

_CHATTER = re.compile(
    r"💡 Tip|GPU available:|TPU available:|HPU available:|IPU available:|was configured so|"
    r"LOCAL_RANK: \d+ - CUDA_VISIBLE_DEVICES|Initializing distributed:|distributed_backend=")

_IGNORED_WARNINGS = (
    # the frozen backbone is kept in eval mode on purpose (ImageNet BatchNorm statistics)
    r"Found \d+ module\(s\) in eval mode",
    # small data sets log every epoch anyway
    r"The number of training batches .* is smaller than the logging interval",
    # a deprecation inside Lightning itself, not in anything this project calls
    r".*LeafSpec.* is deprecated",
    # validation/test metrics are computed from outputs gathered across ranks: equal on every rank
    r"It is recommended to use `self.log\(.*sync_dist=True",
    # evaluation drops DistributedSampler's padding repeats by image index (CrackClassifier._finish)
    r"Using `DistributedSampler` with the dataloaders",
    # a deprecation inside Lightning's all_gather, not in anything this project calls
    r"torch.distributed.nn.functional.all_gather is deprecated",
    # --resume: HistoryCSVLogger keeps the earlier rows; the folders are the run's own
    r"Experiment logs directory .* exists and is not empty",
    r"Checkpoint directory .* exists and is not empty",
    # loaders are sized by data.num_workers, capped at the cores there are
    r"The '\w+_dataloader' does not have many workers",
    # the module, not the DataModule, finishes batches on the device (CrackClassifier.on_after_batch_transfer)
    r"You have overridden `on_after_batch_transfer` in `LightningModule`",
)


class _DropChatter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno <= logging.INFO and _CHATTER.search(record.getMessage()))


_FILTER = _DropChatter()


_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
            "lightning.pytorch.accelerators.cuda", "lightning.fabric.utilities.distributed",
            "lightning.pytorch.strategies.ddp")


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """While the block runs: Lightning's informational banners and the warnings listed above are dropped.
    Afterwards the process's warning filters and loggers are as they were (a library call must not
    silence its caller's warnings)."""
    added = [logging.getLogger(name) for name in _LOGGERS if _FILTER not in logging.getLogger(name).filters]
    for logger in added:
        logger.addFilter(_FILTER)
    try:
        with warnings.catch_warnings():
            for pattern in _IGNORED_WARNINGS:
                warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        for logger in added:
            logger.removeFilter(_FILTER)
