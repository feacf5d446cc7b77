"""What every LightningModule of the project shares: Lightning's own ``hparams`` (saved in every checkpoint)
in place of the plain network's, and evaluation results handed to the Trainer's callbacks
(:class:`~crack_lightning.training.callbacks.EvaluationResults`) once a validation or test epoch ends."""
from __future__ import annotations

from typing import Any

import lightning as L


class TrainedWithLightning:
    """Mixed in before a network class (``class M(TrainedWithLightning, Network, L.LightningModule)``): the
    network's constructor calls :meth:`_keep_arguments`; a subclass collects per batch into
    ``self._collected`` and writes ``self._results[stage]`` in its ``_finish(stage)``."""

    hparams = L.LightningModule.hparams

    def _keep_arguments(self, arguments: dict[str, Any]) -> None:
        self.save_hyperparameters(arguments)
        self._collected: dict[str, Any] = {}
        self._results: dict[str, dict[str, Any]] = {}

    def evaluation(self, stage: str) -> dict[str, Any] | None:
        """The last ``val``/``test`` epoch's results (read by the Trainer's ``EvaluationResults``)."""
        return self._results.pop(stage, None)

    def on_validation_epoch_end(self) -> None:
        self._finish("val")

    def on_test_epoch_end(self) -> None:
        self._finish("test")
