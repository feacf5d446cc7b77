"""The LightningModule: :class:`~crack_lightning.models.network.CrackNet` with its training.

The two-stage transfer-learning recipe (frozen backbone, then fine-tuning), device-side batch
finishing, and evaluation gathered across DDP ranks, where validation also chooses the decision
threshold that every checkpoint stores.
"""
from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from crack_lightning.models.components.lightning import TrainedWithLightning
from crack_lightning.models.metrics import binary_metrics, choose_threshold
from crack_lightning.models.network import CrackNet
from crack_lightning.tensor_ops import model_input


class CrackClassifier(TrainedWithLightning, CrackNet, L.LightningModule):
    """timm backbone (pooled features) -> dropout -> Linear(features, 1) (or, with ``head_hidden``, a
    one-hidden-layer MLP).

    ``freeze_backbone(True)`` gives the seed's transfer-learning recipe (only the
    head learns, backbone BatchNorm statistics stay ImageNet's); ``False`` the
    fine-tuning stage. Lightning's loops get :class:`~crack_lightning.data.loaders.Batch` es: images
    (normalised floats ``(B,3,S,S)``, or uint8 ``(B,H,W,3)`` that
    :meth:`on_after_batch_transfer` resizes and normalises on the module's own device) go
    through :meth:`forward`; cached backbone features (``batch.features``, the cached-feature
    frozen stage) go to :meth:`head_logits` alone.
    """

    backbone_frozen = False

    # ---- structure -------------------------------------------------------------
    def freeze_backbone(self, frozen: bool = True) -> None:
        self.backbone_frozen = frozen
        for p in self.backbone.parameters():
            p.requires_grad_(not frozen)
        self.backbone.train(self.training and not frozen)

    def configure_stage(self, frozen: bool, lr: float, weight_decay: float) -> None:
        """One stage of the recipe: the backbone frozen or not, and the optimiser's settings, kept in
        ``hparams`` (what :meth:`configure_optimizers` reads; each stage's checkpoints say what trained them)."""
        self.freeze_backbone(frozen)
        self.hparams.update(lr=lr, weight_decay=weight_decay)

    def train(self, mode: bool = True) -> "CrackClassifier":
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()  # keep ImageNet BatchNorm statistics while the backbone is frozen
        return self

    def on_fit_start(self) -> None:
        if self.device.type == "cuda":
            self.backbone.to(memory_format=torch.channels_last)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Device-side preprocessing: a uint8 image batch (4x fewer bytes copied to the GPU than
        floats) is resized and normalised here, on the module's device, before any step sees it."""
        if getattr(batch, "x", None) is not None and not batch.features and batch.x.dtype == torch.uint8:
            batch = batch._replace(x=model_input(self.pre, batch.x))
        return batch

    def _logits(self, batch) -> torch.Tensor:
        return self.head_logits(batch.x) if batch.features else self(batch.x)

    # ---- training ----------------------------------------------------------------
    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        s = self.hparams.label_smoothing
        target = y * (1 - s) + 0.5 * s
        return F.binary_cross_entropy_with_logits(logits.float(), target.float())

    def training_step(self, batch, batch_idx):
        loss = self._loss(self._logits(batch), batch.y)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(batch.y))
        return loss

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        lr = self.hparams.lr
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=self.hparams.weight_decay)
        epochs = max(int(self.trainer.max_epochs or 1), 1)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=lr * 0.01)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A trained checkpoint holds every weight, so loading it must never need the network or
        the weights file the run started from: store ``pretrained: none`` (where they came from
        is kept under ``initial_weights``, for the record)."""
        hp = checkpoint.get("hyper_parameters")
        if hp is not None:
            checkpoint["initial_weights"] = {"pretrained": hp.get("pretrained"), "weights_file": hp.get("weights_file")}
            hp.update(pretrained="none", weights_file=None)
        checkpoint["preprocessing"] = self.pre.to_dict()


    # ---- evaluation: collect every probability, gather across ranks, compute once --
    def _collect(self, stage: str, batch) -> None:
        probs = torch.sigmoid(self._logits(batch).float())
        self._collected.setdefault(stage, []).append(torch.stack([probs, batch.y.float(), batch.index.float()], 1))

    def validation_step(self, batch, batch_idx):
        self._collect("val", batch)

    def test_step(self, batch, batch_idx):
        self._collect("test", batch)

    def _gathered(self, stage: str) -> torch.Tensor:
        rows = self._collected.pop(stage, [])
        local = torch.cat(rows) if rows else torch.zeros(0, 3, device=self.device)
        if self.trainer.world_size > 1:
            local = self.all_gather(local).reshape(-1, 3)
        return local.cpu()

    def _finish(self, stage: str) -> None:
        rows = self._gathered(stage)
        if self.trainer.sanity_checking or len(rows) == 0:
            return
        # DistributedSampler pads with repeats: keep each index once
        idx = rows[:, 2].long()
        keep = torch.zeros(len(rows), dtype=torch.bool)
        seen: set[int] = set()
        for i, v in enumerate(idx.tolist()):
            if v not in seen:
                seen.add(v)
                keep[i] = True
        rows = rows[keep]
        probs, labels = rows[:, 0], rows[:, 1]
        loss = float(F.binary_cross_entropy(probs.clamp(1e-7, 1 - 1e-7).double(), labels.double()))
        if stage == "val" and not self.trainer.testing:
            self.threshold.fill_(choose_threshold(probs, labels, self.hparams.threshold_rule,
                                                 self.hparams.get("target_fpr", 0.001)))
        m = binary_metrics(probs, labels, float(self.threshold))
        m["loss"] = loss
        self._results[stage] = {"metrics": m, "index": rows[:, 2].long(), "probs": probs, "labels": labels}
        for k in ("loss", "acc", "precision", "recall", "f1", "auroc", "threshold"):
            self.log(f"{stage}_{k}", float(m[k]), prog_bar=k in ("loss", "acc", "f1"), sync_dist=False,
                     rank_zero_only=False)

