"""The LightningModule: a pretrained timm backbone with a one-logit crack head.

The module also carries what prediction needs to be trustworthy: the
preprocessing contract and the decision threshold chosen on validation data
(a buffer, so it travels inside every checkpoint).
"""
from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from .metrics import binary_metrics, choose_threshold
from .transforms import Preprocessing
from .weights import create_pretrained


def pooled_features(net: nn.Module, size: int) -> int:
    """Width of what ``net`` (classifier removed) really returns.

    ``num_features`` is not it for every family: timm's MobileNetV3 has a 1280-wide
    ``conv_head`` after its 960 pooled channels (``head_hidden_size``). One tiny
    forward pass is the only answer that holds for any timm model.
    """
    was_training = net.training
    net.eval()
    with torch.no_grad():
        width = int(net(torch.zeros(1, 3, size, size)).shape[-1])
    net.train(was_training)
    return width


class CrackClassifier(L.LightningModule):
    """timm backbone (pooled features) -> dropout -> Linear(features, 1) (or, with ``head_hidden``, a
    one-hidden-layer MLP).

    ``freeze_backbone(True)`` gives the seed's transfer-learning recipe (only the
    head learns, backbone BatchNorm statistics stay ImageNet's); ``False`` the
    fine-tuning stage. Lightning's loops get :class:`~crack_lightning.data.Batch` es: images
    (normalised floats ``(B,3,S,S)``, or uint8 ``(B,H,W,3)`` that
    :meth:`on_after_batch_transfer` resizes and normalises on the module's own device) go
    through :meth:`forward`; cached backbone features (``batch.features``, the cached-feature
    frozen stage) go to :meth:`head_logits` alone.
    """

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        pretrained: str = "lite0",
        weights_file: str | None = None,
        drop_rate: float = 0.2,
        image_size: int = 0,
        class_names: tuple[str, str] | list[str] = ("Negative", "Positive"),
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        label_smoothing: float = 0.0,
        threshold_rule: str = "f1",
        target_fpr: float = 0.001,
        head_hidden: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        net = create_pretrained(backbone, pretrained, weights_file)
        self.pre = Preprocessing.from_model(net, image_size)
        net.reset_classifier(0)
        self.backbone = net
        width = pooled_features(net, self.pre.size)
        if head_hidden > 0:  # one hidden layer: room for several sources' looks on a frozen backbone
            self.head = nn.Sequential(nn.Dropout(drop_rate), nn.Linear(width, head_hidden), nn.ReLU(),
                                      nn.Dropout(drop_rate), nn.Linear(head_hidden, 1))
        else:
            self.head = nn.Sequential(nn.Dropout(drop_rate), nn.Linear(width, 1))
        self.register_buffer("threshold", torch.tensor(0.5, dtype=torch.float64))
        self.lr, self.weight_decay = lr, weight_decay
        self.backbone_frozen = False
        self._outputs: dict[str, list[torch.Tensor]] = {}
        self.last_results: dict[str, dict[str, Any]] = {}

    # ---- structure -------------------------------------------------------------
    def freeze_backbone(self, frozen: bool = True) -> None:
        self.backbone_frozen = frozen
        for p in self.backbone.parameters():
            p.requires_grad_(not frozen)
        self.backbone.train(self.training and not frozen)

    def train(self, mode: bool = True) -> "CrackClassifier":
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()  # keep ImageNet BatchNorm statistics while the backbone is frozen
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features of images: normalised floats, or uint8 (finished here, on x's device)."""
        x = self.pre.model_input(x)
        if x.is_cuda:  # channels_last is the fast layout for convolutions on tensor cores
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone(x)

    def on_fit_start(self) -> None:
        if self.device.type == "cuda":
            self.backbone.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B,)`` of images (normalised floats, or uint8 finished here)."""
        return self.head_logits(self.features(x))

    def head_logits(self, feats: torch.Tensor) -> torch.Tensor:
        """Logits ``(B,)`` of pooled backbone features ``(B,C)``: the head alone."""
        return self.head(feats).squeeze(1)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Device-side preprocessing: a uint8 image batch (4x fewer bytes copied to the GPU than
        floats) is resized and normalised here, on the module's device, before any step sees it."""
        if getattr(batch, "x", None) is not None and not batch.features and batch.x.dtype == torch.uint8:
            batch = batch._replace(x=self.pre.model_input(batch.x))
        return batch

    def _logits(self, batch) -> torch.Tensor:
        return self.head_logits(batch.x) if batch.features else self(batch.x)

    @torch.inference_mode()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Crack probabilities ``(B,)``. On a GPU the backbone runs in bf16 autocast (tensor
        cores); the head and sigmoid stay float32 so probabilities near the threshold keep
        their precision."""
        from .engine import gpu_autocast

        with gpu_autocast(x.device):
            feats = self.features(x)
        return torch.sigmoid(self.head(feats.float()).squeeze(1))

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
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        epochs = max(int(self.trainer.max_epochs or 1), 1)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=self.lr * 0.01)
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

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """What the model saw in training is what it sees after loading: the stored preprocessing,
        not whatever timm's pretrained config of the architecture says today."""
        if isinstance(checkpoint.get("preprocessing"), dict):
            self.pre = Preprocessing.from_dict(checkpoint["preprocessing"])

    # ---- evaluation: collect every probability, gather across ranks, compute once --
    def _collect(self, stage: str, batch) -> None:
        probs = torch.sigmoid(self._logits(batch).float())
        self._outputs.setdefault(stage, []).append(torch.stack([probs, batch.y.float(), batch.index.float()], 1))

    def validation_step(self, batch, batch_idx):
        self._collect("val", batch)

    def test_step(self, batch, batch_idx):
        self._collect("test", batch)

    def _gathered(self, stage: str) -> torch.Tensor:
        rows = self._outputs.pop(stage, [])
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
        self.last_results[stage] = {"metrics": m, "index": rows[:, 2].long(), "probs": probs, "labels": labels}
        for k in ("loss", "acc", "precision", "recall", "f1", "auroc", "threshold"):
            self.log(f"{stage}_{k}", float(m[k]), prog_bar=k in ("loss", "acc", "f1"), sync_dist=False,
                     rank_zero_only=False)

    def on_validation_epoch_end(self) -> None:
        self._finish("val")

    def on_test_epoch_end(self) -> None:
        self._finish("test")
