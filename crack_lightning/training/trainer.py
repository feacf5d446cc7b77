"""The Trainer every recipe runs under: each ``trainer.*`` key of the config plus what the recipes own
(checkpoints every epoch, early stopping, a history that survives ``--resume``, atomic checkpoint writes,
a progress bar without logger noise, evaluation results handed back)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from crack_lightning.config.parser import trainer_kwargs
from crack_lightning.config.schema import Config
from crack_lightning.errors import ConfigError
from crack_lightning.training.callbacks import (
    AtomicCheckpointIO,
    EpochTimer,
    EvaluationResults,
    HistoryCSVLogger,
    InterruptNotice,
    ProgressBar,
)


def make_trainer(cfg: Config, run_dir: Path, stage: str | None, epochs: int = 1, patience: int = 3,
                 keep_until_epoch: int = -1, monitor: str | None = None) -> L.Trainer:
    """A Trainer with every ``trainer.*`` argument of the config, plus what the recipe owns: its
    checkpoints, early stopping on ``monitor`` (default ``train.monitor``), history logger (beside any
    ``trainer.logger`` given), atomic checkpoint writes, and this stage's epochs."""
    monitor = monitor or cfg.train.monitor
    kwargs = trainer_kwargs(cfg)
    given = kwargs.pop("logger", None)  # None/True/False: Lightning's default or none; the recipe's stays
    extra = [given] if isinstance(given, Logger) else list(given) if isinstance(given, (list, tuple)) else []
    callbacks: list[Any] = [EvaluationResults()]
    if kwargs.get("enable_progress_bar", True) is not False:
        callbacks.append(ProgressBar())
    logger: Any = False
    if stage:
        ckpt_dir = run_dir / "checkpoints" / stage
        mode = "min" if monitor.endswith("loss") else "max"
        callbacks += [
            EpochTimer(),
            ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=monitor, mode=mode, save_last=True,
                            save_top_k=1, enable_version_counter=False),
            EarlyStopping(monitor=monitor, mode=mode, patience=patience),
            InterruptNotice(run_dir),
        ]
        logger = [HistoryCSVLogger(run_dir, name="logs", version=stage, keep_until_epoch=keep_until_epoch), *extra]
    kwargs.update(plugins=[AtomicCheckpointIO()], max_epochs=epochs, callbacks=callbacks, logger=logger,
                  default_root_dir=str(run_dir))
    try:
        return L.Trainer(**kwargs)
    except (MisconfigurationException, ValueError, TypeError) as exc:
        from crack_lightning.hardware import no_gpu_hint

        raise ConfigError(f"trainer: {exc}{no_gpu_hint(str(kwargs.get('accelerator')), '--trainer.accelerator')}") \
            from None
